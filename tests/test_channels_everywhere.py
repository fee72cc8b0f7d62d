"""N-channel and one-channel (sigmoid) models everywhere a model runs: the multi-task model, ONNX
export through `Segmenter`, `upernet serve` and `upernet eval` (issue #16 follow-up)."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

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


# ---- serve ---------------------------------------------------------------------------------------
def tiff_bytes(array: np.ndarray, **options) -> bytes:
    tifffile = pytest.importorskip("tifffile")
    out = io.BytesIO()
    tifffile.imwrite(out, array, **{"planarconfig": "contig", **options})
    return out.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def serve_client(segmenter, max_batch: int = 4):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from upernet.serve.app import Limits, create_app

    return TestClient(create_app(segmenter, Limits(max_pixels=200 * 200, max_batch=max_batch), name="tiny"))


def post(client, body: bytes, query: str = "format=map", kind: str = "image/tiff"):
    return client.post(f"/predict?{query}", content=body, headers={"Content-Type": kind})


def map_labels(answer: dict) -> np.ndarray:
    dtype = np.dtype(answer["dtype"])
    return np.frombuffer(base64.b64decode(answer["labels"]), dtype=dtype).reshape(answer["height"], answer["width"])


def test_serve_a_four_band_model_reads_tiff_uploads_as_predict_does(tmp_path):
    model = tiny_model("upernet_convnext_tiny", num_classes=3, in_channels=4).eval()
    model.meta = {"class_names": ["a", "b", "c"], **FOUR_BANDS}
    segmenter = Segmenter(model, device="cpu", precision="fp32", size="none")
    image = bands()
    tifffile = pytest.importorskip("tifffile")
    planes = np.ascontiguousarray(image.transpose(2, 0, 1))  # bands stored as planes
    tifffile.imwrite(tmp_path / "four.tif", planes, planarconfig="separate", photometric="minisblack")
    expected = segmenter(tmp_path / "four.tif").labels  # read_image, as `upernet predict` reads it
    wide = (image.astype(np.uint16) * 257)  # 16-bit: scaled to 8 bits as read_image does
    with serve_client(segmenter) as client:
        assert client.get("/info").json()["protocol"]["in_channels"] == 4
        for body in (tiff_bytes(planes, planarconfig="separate", photometric="minisblack"),
                     tiff_bytes(image, planarconfig="contig"),
                     tiff_bytes(wide, planarconfig="contig")):
            response = post(client, body)
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(map_labels(response.json()), expected)
        overlay = post(client, tiff_bytes(image), "format=overlay&legend=false")
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"

        # a 3-band upload (TIFF or PNG) and a broken TIFF: 400 with one line, and the server still serves
        for body, kind, message in ((tiff_bytes(bands(channels=3)), "image/tiff", "model.in_channels=4"),
                                    (png_bytes(bands(channels=3)), "image/png", "model.in_channels=4"),
                                    (tiff_bytes(image)[:200], "image/tiff", "cannot be read as a TIFF")):
            response = post(client, body, kind=kind)
            assert response.status_code == 400, response.text
            detail = response.json()["detail"]
            assert message in detail and "\n" not in detail
        too_big = post(client, tiff_bytes(np.zeros((300, 300, 4), np.uint8)))
        assert too_big.status_code == 413 and "300x300 = 90000 pixels" in too_big.json()["detail"]
        assert client.get("/health").json()["status"] == "ok"


def test_serve_an_rgb_model_still_takes_rgb_tiffs_and_refuses_five_bands():
    model = tiny_model("upernet_convnext_tiny", num_classes=3).eval()
    segmenter = Segmenter(model, device="cpu", precision="fp32", size="none")
    image = bands(channels=3, seed=2)
    with serve_client(segmenter) as client:
        response = post(client, tiff_bytes(image, photometric="rgb"))
        assert response.status_code == 200
        np.testing.assert_array_equal(map_labels(response.json()), segmenter(image).labels)
        refused = post(client, tiff_bytes(bands(channels=5)))
        assert refused.status_code == 400 and "a 5-band image" in refused.json()["detail"]


def test_serve_a_sigmoid_model_answers_two_classes():
    image = bands(channels=3, seed=3)
    model = binary_model(0.7, image=image)
    segmenter = Segmenter(model, device="cpu", precision="fp32", size="none")
    expected = segmenter(image).labels
    assert set(np.unique(expected)) == {0, 1}
    with serve_client(segmenter) as client:
        info = client.get("/info").json()
        assert info["classes"] == ["background", "object"] and len(info["palette"]) == 2
        assert info["protocol"]["binary_threshold"] == 0.7
        items = post(client, png_bytes(image), "format=json", "image/png").json()
        assert [item["label"] for item in items] == ["background", "object"]
        foreground = np.array(Image.open(io.BytesIO(base64.b64decode(items[1]["mask"]))))
        np.testing.assert_array_equal(foreground == 255, expected == 1)
        labels = post(client, png_bytes(image), "format=labels", "image/png")
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(labels.content))), expected)


def test_serve_batches_same_size_uploads_of_a_sigmoid_four_band_model():
    """Several queued images share one forward pass: the batch path too splits at the threshold and
    draws its overlays from the first three bands."""
    pytest.importorskip("fastapi")
    from conftest import segment_in_one_batch

    images = [bands(seed=seed) for seed in (4, 5, 6)]
    model = binary_model(0.7, channels=4, image=images[0])
    segmenter = Segmenter(model, device="cpu", precision="fp32", size="none")
    batch_sizes, results = segment_in_one_batch(segmenter, images)
    assert batch_sizes == {3: 1}
    for image, result in zip(images, results):
        expected = segmenter(image)
        np.testing.assert_array_equal(result.labels, expected.labels)
        np.testing.assert_array_equal(result.image, expected.image)  # the first three bands
        assert result.class_names == ["background", "object"]
    assert set(np.unique(results[0].labels)) == {0, 1}


# ---- eval ----------------------------------------------------------------------------------------
def write_binary_folder(root, images: list[np.ndarray]) -> list[np.ndarray]:
    """A 2-class folder dataset (val split = train split): a bright square is the foreground; returns the masks."""
    rng = np.random.default_rng(7)
    masks = []
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
    for i, image in enumerate(images):
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        y, x = rng.integers(0, 16, 2)
        mask[y:y + 16, x:x + 16] = 1
        mask[0, :4] = 255
        masks.append(mask)
        for split in ("train", "val"):
            Image.fromarray(image).save(root / "img_dir" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")
    return masks


def test_eval_cli_of_a_sigmoid_model_scores_two_classes(tmp_path, capsys):
    import csv
    import json

    import yaml

    from upernet.cli import main

    images = [bands(32, 48, channels=3, seed=seed) for seed in (8, 9)]
    masks = write_binary_folder(tmp_path / "data", images)
    model = binary_model(0.7, image=images[0])
    model.save(str(tmp_path / "model"))
    recipe = {"data": {"kind": "folder", "root": str(tmp_path / "data"), "scale": [48, 32],
                       "options": {"classes": ["background", "object"]}}, "val": {"mode": "whole"}}
    (tmp_path / "binary.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "binary.yaml"), "--checkpoint", str(tmp_path / "model"), "--out", str(out),
                 "--precision", "fp32", "--worst", "1"]) == 0
    assert "object" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [row["class"] for row in rows] == ["background", "object"]
    # the confusion matrix of the predictions split at the model's 0.7, not 0.5 (nor a softmax over one channel)
    segmenter = Segmenter(tmp_path / "model", device="cpu", precision="fp32", size="48x32")
    expected = np.zeros((2, 2), dtype=np.int64)
    for image, mask in zip(images, masks):
        labels = segmenter(image).labels
        with torch.no_grad():  # 48x32 keeps a 48x32 image as it is: the logit is at the label's size
            logit = model(segmenter.preprocessor(image)[1])["out"][0, 0]
        assert (labels == (torch.sigmoid(logit) > 0.7).numpy()).mean() > 0.999
        assert set(np.unique(labels)) == {0, 1}
        valid = mask != 255
        np.add.at(expected, (mask[valid].astype(np.int64), labels[valid]), 1)
    counts = [list(map(int, row[1:])) for row in list(csv.reader((out / "confusion_matrix.csv").open()))[1:]]
    np.testing.assert_array_equal(np.asarray(counts), expected)
    iou = [expected[c, c] / (expected[c].sum() + expected[:, c].sum() - expected[c, c]) * 100 for c in (0, 1)]
    assert metrics["mIoU"] == pytest.approx(np.mean(iou), abs=0.01)  # metrics.json rounds to 2 decimals
