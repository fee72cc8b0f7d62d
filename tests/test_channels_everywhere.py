"""N-channel and one-channel (sigmoid) models everywhere a model runs: the multi-task model, ONNX
export through `Segmenter`, `upernet serve` and `upernet eval` (issue #16 follow-up)."""
import numpy as np
import pytest
import torch

import upernet
from conftest import tiny_model
from upernet import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

FOUR_BANDS = {"mean": [100.0, 110.0, 120.0, 130.0], "std": [50.0, 55.0, 60.0, 65.0]}


def bands(height: int = 40, width: int = 48, channels: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# ---- multi-task ----------------------------------------------------------------------------------
def test_multitask_model_with_four_input_channels(tmp_path):
    model = tiny_model("upernet_multitask", in_channels=4).eval()
    assert model.in_channels == 4
    with torch.no_grad():
        outputs = model(torch.randn(1, 4, 32, 32))
    assert outputs["object"].shape == (1, 5, 32, 32) and outputs["scene"].shape == (1, 6)
    model.save(str(tmp_path / "m"))
    loaded = upernet.load_model(tmp_path / "m")
    assert loaded.in_channels == 4
    torch.testing.assert_close(loaded.eval()(torch.ones(1, 4, 32, 32))["object"],
                               model(torch.ones(1, 4, 32, 32))["object"])
    assert tiny_model("upernet_multitask").in_channels == 3


def test_multitask_segmenter_reads_four_band_images():
    model = tiny_model("upernet_multitask", in_channels=4).eval()
    model.meta.update(FOUR_BANDS)
    result = Segmenter(model, device="cpu", precision="fp32")(bands())
    assert result.tasks["object"].labels.shape == (40, 48)
    assert result.tasks["object"].image.shape == (40, 48, 3)  # the first three bands, for overlays
    with pytest.raises(upernet.UserError, match="model.in_channels=4"):
        Segmenter(model, device="cpu", precision="fp32")(bands(channels=3))


# ---- ONNX ----------------------------------------------------------------------------------------
def binary_model(threshold: float = 0.7, channels: int = 3, image: np.ndarray | None = None):
    """A tiny one-channel (sigmoid) model whose foreground logit straddles `threshold` on `image`
    (its classifier bias shifted so that about half the pixels are above it)."""
    model = tiny_model("upernet_convnext_tiny", num_classes=1, in_channels=channels).eval()
    model.meta = {"class_names": ["background", "object"], "binary_threshold": threshold}
    if channels == 4:
        model.meta.update(FOUR_BANDS)
    if image is not None:
        seg = Segmenter(model, device="cpu", precision="fp32", size="none")
        with torch.no_grad():
            logit = model(seg.preprocessor(image)[1])["out"]
            model.decode_head.classifier.bias -= logit.median() - np.log(threshold / (1 - threshold))
    return model


def test_onnx_export_of_a_four_band_model_runs_through_the_segmenter(tmp_path):
    pytest.importorskip("onnxruntime")
    from upernet.inference.export import OnnxModel, export_onnx

    model = tiny_model("upernet_convnext_tiny", num_classes=3, in_channels=4).eval()
    model.meta = {"class_names": ["a", "b", "c"], **FOUR_BANDS}
    path = export_onnx(model, tmp_path / "four.onnx", shape=(32, 32))
    assert OnnxModel(path).in_channels == 4
    image = bands()
    onnx_result = Segmenter(path, size="none")(image)
    torch_result = Segmenter(model, device="cpu", precision="fp32", size="none")(image)
    assert (onnx_result.labels == torch_result.labels).mean() > 0.999
    assert onnx_result.class_names == ["a", "b", "c"]
    with pytest.raises(upernet.UserError, match="model.in_channels=4"):
        Segmenter(path, size="none")(bands(channels=3))

    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from upernet.cli import main

    tifffile.imwrite(tmp_path / "four.tif", image, planarconfig="contig")
    assert main(["predict", str(tmp_path / "four.tif"), "--model", str(path), "--out", str(tmp_path / "pred"),
                 "--size", "none", "--batch-workers", "0"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred" / "four_labels.png")), onnx_result.labels)


def test_onnx_export_of_a_sigmoid_model_splits_at_its_threshold(tmp_path):
    pytest.importorskip("onnxruntime")
    from upernet.inference.export import OnnxModel, export_onnx

    image = bands(channels=3, seed=1)
    model = binary_model(0.7, image=image)
    path = export_onnx(model, tmp_path / "binary.onnx", shape=(32, 32))
    onnx_model = OnnxModel(path)
    assert onnx_model.num_classes == 1 and onnx_model.meta["binary_threshold"] == 0.7
    seg = Segmenter(path, size="none")
    result = seg(image)
    assert result.class_names == ["background", "object"]
    with torch.no_grad():
        logit = model(seg.preprocessor(image)[1])["out"][0, 0]
    expected = (torch.sigmoid(logit) > 0.7).numpy()
    assert 0.2 < expected.mean() < 0.8  # both classes present: the threshold decides
    assert (result.labels == expected).mean() > 0.999  # a pixel exactly at the threshold may differ
    assert set(np.unique(result.labels)) == {0, 1}
