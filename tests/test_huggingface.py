"""Hugging Face UperNet folders -> our model: same logits, through load_model and `upernet convert`."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import upernet
from upernet.cli import main as cli
from upernet.convert import convert_checkpoint, detect_format
from upernet.convert.huggingface import convert_huggingface

pytestmark = pytest.mark.peers
STAGES = ["stage1", "stage2", "stage3", "stage4"]
SMALL = {
    "swin": dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7),
    "convnext": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1]),
}
CLASSES = ["sky", "road", "tree", "car", "person"]


@pytest.fixture(autouse=True, scope="module")
def transformers():
    """Every test here compares with (or writes) a Hugging Face UperNet."""
    return pytest.importorskip("transformers")


def hf_backbone_config(family: str, sizes: dict):
    """The transformers config of a Swin or ConvNeXt backbone of the given sizes (SMALL or FULL)."""
    from transformers import ConvNextConfig, SwinConfig

    return {"swin": SwinConfig, "convnext": ConvNextConfig}[family](**sizes[family], out_features=STAGES)


def randomize_(model: torch.nn.Module, classifier_std: float | None) -> None:
    """Make every normalisation and scale matter: random BN statistics, norm affines, biases, layer scales.

    `classifier_std` scales the logits of the narrow test heads to order 1-10 (so that 1e-4 is a tight bound).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
            elif "layer_scale" in name:
                p.uniform_(0.2, 1.0)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "classifier.weight" in name and classifier_std is not None:
                p.normal_(0, classifier_std)


def hf_upernet(backbone_config, num_labels: int = 5, classifier_std: float | None = 1.0,
               **head) -> torch.nn.Module:
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    config = UperNetConfig(backbone_config=backbone_config, num_labels=num_labels, **head)
    if num_labels == len(CLASSES):
        config.id2label = dict(enumerate(CLASSES))
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = UperNetForSemanticSegmentation(config).eval()
    randomize_(model, classifier_std)
    return model


def max_diff(hf, ours, size) -> float:
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = hf(images).logits
        got = ours(images)["out"]
    assert expected.std() > 0.2  # the comparison is not between near-zero maps
    return (expected - got).abs().max().item()


@pytest.fixture(scope="module", params=["swin", "convnext"])
def saved(request, tmp_path_factory):
    """(family, HF model, its save_pretrained folder with model.safetensors)."""
    hf = hf_upernet(hf_backbone_config(request.param, SMALL), hidden_size=32, auxiliary_channels=16)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(folder)
    return request.param, hf, folder


# 333x517: not divisible by the patch, window or any stride; 64x64: Swin's maps (16..2) smaller than the window.
@pytest.mark.parametrize("size", [(512, 512), (333, 517), (64, 64)])
def test_load_model_matches_hf(saved, size):
    family, hf, folder = saved
    ours = upernet.load_model(folder)
    assert not ours.training
    assert ours.config["name"] == f"upernet_{family}_tiny"
    assert ours.meta["class_names"] == CLASSES
    assert max_diff(hf, ours, size) <= 1e-4


def test_cli_convert_then_reload(saved, tmp_path, capsys):
    family, hf, folder = saved
    assert detect_format(folder) == "huggingface"
    out = tmp_path / "ours"
    assert cli(["convert", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "huggingface" in printed and f"upernet_{family}_tiny" in printed and "5 classes" in printed
    assert json.loads((out / "config.json").read_text())["format"] == "upernet"
    reloaded = upernet.load_model(out)
    assert reloaded.meta["class_names"] == CLASSES
    assert max_diff(hf, reloaded, (96, 160)) <= 1e-4


def test_pytorch_model_bin(tmp_path):
    """Older folders hold pickled weights (transformers 5 writes only safetensors, so we re-save them)."""
    hf = hf_upernet(hf_backbone_config("swin", SMALL), hidden_size=32, auxiliary_channels=16, use_auxiliary_head=False)
    hf.save_pretrained(tmp_path)
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    ours = convert_checkpoint(tmp_path, "huggingface")
    assert ours.aux_head is None
    assert max_diff(hf, ours, (333, 517)) <= 1e-4


def test_module_names_of_transformers_5(tmp_path):
    """A state_dict() written as is (q_proj, mlp.fc1, backbone.swin.*) converts too."""
    hf = hf_upernet(hf_backbone_config("swin", SMALL), hidden_size=32, auxiliary_channels=16, auxiliary_num_convs=2,
                    pool_scales=[1, 3])
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    assert any(".q_proj." in k for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ours = upernet.load_model(tmp_path)
    assert ours.config["args"]["pool_scales"] == [1, 3] and ours.config["args"]["aux_num_convs"] == 2
    assert max_diff(hf, ours, (128, 96)) <= 1e-4


def test_wrong_layout_lists_missing_and_unexpected_keys(saved, tmp_path, caplog):
    _, _, folder = saved
    state = load_file(str(folder / "model.safetensors"))
    state.pop("decode_head.classifier.bias")
    state["decode_head.fpn_convs.7.conv.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        upernet.load_model(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "missing keys (1): decode_head.classifier.bias" in message
    assert "unexpected keys (1): decode_head.fpn_convs.7.conv.weight" in message
    # Not strict: everything that fits is loaded and the rest is listed, not dropped silently.
    with caplog.at_level(logging.WARNING, logger="upernet.convert"):
        convert_huggingface(tmp_path, strict=False)
    assert "missing key decode_head.classifier.bias" in caplog.text
    assert "unexpected key decode_head.fpn_convs.7.conv.weight" in caplog.text


def test_unknown_key_is_an_error(saved, tmp_path):
    _, _, folder = saved
    state = load_file(str(folder / "model.safetensors"))
    state["backbone.something_new.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys\): backbone.something_new.weight"):
        upernet.load_model(tmp_path)


def test_incomplete_qkv_is_an_error(tmp_path):
    hf = hf_upernet(hf_backbone_config("swin", SMALL), hidden_size=32, auxiliary_channels=16)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("backbone.encoder.layers.1.blocks.0.attention.self.key.bias")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing backbone\.stages\.1\.blocks\.0\.attn\.k\.bias"):
        upernet.load_model(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"auxiliary_concat_input": True}, "auxiliary_concat_input"),
    ({"auxiliary_in_channels": 7}, "auxiliary_in_channels 7"),
    ({"backbone_config": {"model_type": "resnet"}}, "backbone model_type 'resnet'"),
    ({"backbone_config": {"model_type": "swin", "use_absolute_embeddings": True}}, "use_absolute_embeddings"),
])
def test_unsupported_configs_are_clear_errors(saved, tmp_path, change, message):
    _, _, folder = saved
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        upernet.load_model(tmp_path)


def test_folder_without_weights(tmp_path):
    from transformers import UperNetConfig

    UperNetConfig(backbone_config=hf_backbone_config("convnext", SMALL)).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="without weights"):
        upernet.load_model(tmp_path)
    assert cli(["convert", str(tmp_path), str(tmp_path / "out")]) == 2


FULL = {
    "swin": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
    "convnext": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_full_size_tiny(family, tmp_path):
    """Swin-T / ConvNeXt-T UPerNet as published (150 classes, 512 channels): same logits, ~60M parameters."""
    hf = hf_upernet(hf_backbone_config(family, FULL), num_labels=150, classifier_std=None, auxiliary_in_channels=384)
    hf.save_pretrained(tmp_path)
    ours = upernet.load_model(tmp_path)
    assert ours.config["name"] == f"upernet_{family}_tiny"
    assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - 60) < 0.5
    assert max_diff(hf, ours, (256, 320)) <= 1e-4
