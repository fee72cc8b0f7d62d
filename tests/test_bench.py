"""`upernet bench` smoke runs on tiny models: the JSON has every field; times are never asserted."""
import json

import pytest
import torch

from upernet.cli import main


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    """A tiny transformers UperNet saved in its own format: our bench converts it and runs both."""
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


def test_bench_inference_against_transformers_json(tiny_hf_folder, capsys):
    result = _run_json(capsys, ["bench", str(tiny_hf_folder), "--against", "transformers", "--shape", "64", "64",
                                "--runs", "1", "--dtype", "bf16", "--onnx", "--json"])
    names = {r["name"] for r in result["rows"]}
    assert {"upernet bf16", "transformers fp32", "transformers bf16 channels_last", "onnxruntime fp32"} <= names
    for row in result["rows"]:
        assert row["latency_s"] > 0 and row["images_per_s"] > 0 and row["gflops"] > 0
        assert 0 < row["peak_fraction"]
    assert result["model_gflop"] > 0
    assert "upernet bf16 / transformers best bf16" in result["ratios"]


def test_bench_train_json(tiny_hf_folder, capsys):
    result = _run_json(capsys, ["bench", str(tiny_hf_folder), "--train", "--against", "transformers",
                                "--shape", "64", "64", "--runs", "1", "--dtype", "fp32", "--checkpointing", "--json"])
    names = {r["name"] for r in result["rows"]}
    assert names == {"upernet fp32", "upernet fp32 checkpointing", "transformers fp32"}
    assert "upernet fp32 / transformers fp32" in result["ratios"]


def test_bench_against_unknown_variant_is_a_clear_error(capsys):
    assert main(["bench", "upernet_r50", "--against", "transformers"]) == 2
    assert "Hugging Face UperNet folder" in capsys.readouterr().err
