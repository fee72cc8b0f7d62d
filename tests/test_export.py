"""Dynamic-size ONNX export: onnxruntime matches PyTorch at sizes other than the traced one."""
import json

import pytest
import torch

import upernet
from upernet.cli import main
from upernet.inference.export import OnnxModel, check_onnx, export_onnx

TINY = dict(backbone_args={"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48]}, channels=32)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = upernet.build_model("upernet_convnext_tiny", num_classes=4, **TINY).eval()
    model.meta = {"class_names": ["a", "b", "c", "d"]}
    return model


def test_dynamic_onnx_matches_pytorch_at_two_other_sizes(tiny_model, tmp_path):
    path = export_onnx(tiny_model, tmp_path / "m.onnx", shape=(64, 64), dynamic=True)
    # neither size is the traced one, and the PPM bins differ (16 = 6 * 2 + 4 is not divisible by 6)
    diffs = check_onnx(tiny_model, path, [(96, 128), (130, 70)], batch=2)
    assert max(diffs) <= 1e-4, diffs


def test_onnx_model_carries_meta_and_config(tiny_model, tmp_path):
    path = export_onnx(tiny_model, tmp_path / "m.onnx", shape=(64, 64), dynamic=True)
    onnx_model = OnnxModel(path)
    assert onnx_model.meta == tiny_model.meta
    assert onnx_model.config["name"] == "upernet_convnext_tiny"
    out = onnx_model(torch.randn(1, 3, 64, 96))["out"]
    assert out.shape == (1, 4, 64, 96)


def test_export_cli_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    tiny = upernet.build_model("upernet_convnext_tiny", num_classes=3, **TINY)
    tiny.save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--dynamic", "--shape", "64", "64"]) == 0
    text = capsys.readouterr().out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "max abs diff" in line]
    assert out.is_file() and len(diffs) == 2 and max(diffs) <= 1e-4


def test_export_into_missing_folder_names_it(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tiny_model, tmp_path / "nope" / "m.onnx", shape=(64, 64))


def test_onnx_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")


def test_predict_cli_runs_an_onnx_model(tiny_model, tmp_path):
    from PIL import Image

    path = export_onnx(tiny_model, tmp_path / "m.onnx", shape=(64, 64), dynamic=True)
    Image.new("RGB", (72, 56), (120, 60, 30)).save(tmp_path / "img.png")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "img.png"), "--model", str(path), "--out", str(out), "--size", "none",
                 "--batch-workers", "0"]) == 0
    labels = Image.open(out / "img_labels.png")
    assert labels.size == (72, 56)
