"""`upernet bench` smoke runs on tiny models: the JSON has every field; times are never asserted."""
import json

import pytest
import torch

from upernet.cli import main


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    """A tiny transformers UperNet saved in its own format: our bench converts it and runs both."""
    pytest.importorskip("transformers")
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, num_labels=5, hidden_size=32, auxiliary_in_channels=32,
                           auxiliary_channels=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf")
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    return folder


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.peers
@pytest.mark.slow
def test_bench_inference_against_transformers_json(tiny_hf_folder, capsys):
    pytest.importorskip("onnxruntime")  # --onnx
    result = _run_json(capsys, ["bench", str(tiny_hf_folder), "--against", "transformers", "--shape", "64", "64",
                                "--runs", "1", "--dtype", "bf16", "--onnx", "--json"])
    names = {r["name"] for r in result["rows"]}
    assert {"upernet bf16", "transformers fp32", "transformers bf16 channels_last", "onnxruntime fp32"} <= names
    for row in result["rows"]:
        assert row["latency_s"] > 0 and row["images_per_s"] > 0 and row["gflops"] > 0
        assert 0 < row["peak_fraction"]
    assert result["model_gflop"] > 0
    assert "upernet bf16 / transformers best bf16" in result["ratios"]


@pytest.mark.peers
@pytest.mark.slow
def test_bench_train_json(tiny_hf_folder, capsys):
    result = _run_json(capsys, ["bench", str(tiny_hf_folder), "--train", "--against", "transformers",
                                "--shape", "64", "64", "--runs", "1", "--dtype", "fp32", "--checkpointing", "--json"])
    names = {r["name"] for r in result["rows"]}
    assert names == {"upernet fp32", "upernet fp32 checkpointing", "transformers fp32"}
    assert "upernet fp32 / transformers fp32" in result["ratios"]


@pytest.mark.peers
def test_bench_against_unknown_variant_is_a_clear_error(capsys):
    pytest.importorskip("transformers")  # bench imports it before it looks at the model
    assert main(["bench", "upernet_r50", "--against", "transformers"]) == 2
    assert "Hugging Face UperNet folder" in capsys.readouterr().err


@pytest.mark.peers
@pytest.mark.slow
def test_bench_against_smp_on_the_same_weights(tmp_path, capsys):
    """A tiny smp UPerNet folder: bench converts it, checks nothing itself, so the pair is checked here."""
    smp = pytest.importorskip("segmentation_models_pytorch")

    from upernet.inference.peers import smp_pair

    smp.UPerNet("resnet18", encoder_weights=None, classes=3, decoder_channels=16).save_pretrained(tmp_path / "smp")
    ours, peer = smp_pair(str(tmp_path / "smp"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours.eval()(images)["out"] - peer(images)).abs().max() <= 1e-4
    capsys.readouterr()  # what smp printed while saving and loading
    result = _run_json(capsys, ["bench", str(tmp_path / "smp"), "--against", "smp", "--shape", "64", "64",
                                "--runs", "1", "--dtype", "fp32", "--json"])
    assert {r["name"] for r in result["rows"]} == {"upernet fp32", "smp fp32"}
    assert result["ratios"]["upernet fp32 / smp fp32"] > 0
    train = _run_json(capsys, ["bench", str(tmp_path / "smp"), "--against", "smp", "--train", "--shape", "64", "64",
                               "--runs", "1", "--dtype", "fp32", "--json"])
    assert {r["name"] for r in train["rows"]} == {"upernet fp32", "smp fp32"}
    assert main(["bench", "upernet_r50", "--against", "smp"]) == 2
    assert "--against smp needs a segmentation-models-pytorch UPerNet folder" in capsys.readouterr().err


def test_grad_checkpointing_gives_the_same_gradients():
    """`UPerNet.set_grad_checkpointing` (what `bench --train --checkpointing` times) changes memory, not numbers."""
    from conftest import tiny_model

    model = tiny_model("upernet_convnext_tiny", dropout=0.0).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))

    def gradients():
        torch.manual_seed(0)  # the same stochastic-depth draws each time
        model.zero_grad()
        model(images, labels=labels)["loss"].backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.set_grad_checkpointing()
    assert model.backbone.body.grad_checkpointing  # timm's switch: its forward now recomputes the stages
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b)
    model.set_grad_checkpointing(False)
    assert not model.backbone.body.grad_checkpointing


def test_grad_checkpointing_refused_by_a_backbone_without_it():
    from conftest import tiny_model

    from upernet.errors import UserError

    model = tiny_model("upernet_swin_tiny")
    with pytest.raises(UserError, match="does not support activation checkpointing"):
        model.set_grad_checkpointing()
    model.set_grad_checkpointing(False)  # switching off what is not there is fine
