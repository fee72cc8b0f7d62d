"""Tiled inference streamed in row bands: the blend rule, no seams, bands in order, the streaming
PNG writer, and `upernet predict --tile`."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import upernet
from upernet.data.classes import resolve_meta
from conftest import tiny_model
from upernet.cli import main
from upernet.inference.modes import slide_logits
from upernet.inference.segmenter import label_image
from upernet.inference.tiles import (ArraySource, PngLabelWriter, TiledModel, blend_windows, predict_tiled, ramp,
                                     tiled_probabilities, window_grid, window_weight)

pytestmark = pytest.mark.usefixtures("one_thread")


class PositionBias(nn.Module):
    """Per-pixel logits plus a bias that grows across each window: the output depends on where a
    pixel lies in its window, as a real network's does (padding, receptive field)."""

    def __init__(self, classes=3, strength=4.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.strength = strength

    def forward(self, x):
        h, w = x.shape[-2:]
        ys = torch.linspace(-1, 1, h).view(h, 1)
        xs = torch.linspace(-1, 1, w).view(1, w)
        out = self.conv(x).clone()
        out[:, 0] += self.strength * xs
        out[:, 1] += self.strength * ys
        return {"out": out}


def dense_blend(model, x, tile, overlap, weight):
    """Reference: every window's softmax, times its weight, added into whole-image maps."""
    _, _, h, w = x.shape
    total = torch.zeros(1, 3, h, w)
    weights = torch.zeros(1, 1, h, w)
    for y1, y2, x1, x2 in window_grid(h, w, (tile, tile), (tile - overlap, tile - overlap)):
        ww = window_weight(weight, (y2 - y1, x2 - x1), (overlap, overlap))
        ww = torch.ones(y2 - y1, x2 - x1) if ww is None else ww
        total[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])["out"].softmax(1) * ww
        weights[:, :, y1:y2, x1:x2] += ww
    return total / weights


def largest_step(probs):
    """The largest change of any class probability between neighbouring pixels (rows or columns)."""
    return max((probs[..., 1:, :] - probs[..., :-1, :]).abs().max().item(),
               (probs[..., :, 1:] - probs[..., :, :-1]).abs().max().item())


def stream(model, image, tile, overlap, window_batch=4):
    """Bands of `tiled_probabilities` on an (H, W, 3) float image, put together."""
    tiled = TiledModel(model, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    bands = list(tiled_probabilities(tiled, ArraySource(image), tile, overlap, window_batch))
    return bands, torch.cat([b.pixels["out"] for b in bands], dim=2)


def test_cosine_ramps_of_neighbouring_windows_sum_to_one():
    r = ramp(64, 16)
    assert r.min() > 0 and r.max() == 1
    torch.testing.assert_close(r[48:] + r[:16], torch.ones(16))  # next window 48 px on: partition of unity
    assert torch.equal(ramp(64, 0), torch.ones(64))


def test_tiles_equal_the_dense_smooth_blend_and_have_no_seams():
    model = PositionBias().eval()
    image = np.full((96, 130, 3), 0.3, dtype=np.float32)  # flat: any step comes from the windows
    with torch.no_grad():
        bands, tiled = stream(model, image, tile=48, overlap=16)
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        torch.testing.assert_close(tiled, dense_blend(model, x, 48, 16, "cosine"), rtol=1e-5, atol=1e-6)
        hard = dense_blend(model, x, 48, 16, "uniform")  # mmseg's mean: jumps where a window ends
    # Inside a window the bias moves probabilities by ~0.1 per pixel at most; a window edge jumps more.
    assert largest_step(tiled) < 0.12
    assert largest_step(hard) > 0.3


def test_bands_stream_top_to_bottom_before_the_image_is_done():
    model = PositionBias().eval()
    image = np.random.default_rng(0).random((200, 64, 3), dtype=np.float32)
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return model(x)

    with torch.no_grad():
        tiled = TiledModel(counting, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        progress = []
        rows = []
        for band in tiled_probabilities(tiled, ArraySource(image), 32, 8, window_batch=2):
            progress.append(sum(calls))
            rows.append((band.rows.start, band.rows.stop))
    windows = len(window_grid(200, 64, (32, 32), (24, 24)))
    assert rows[0][0] == 0 and rows[-1][1] == 200 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert progress[0] < windows / 3  # the first rows come out long before the last window runs
    assert max(stop - start for start, stop in rows) <= 32


def test_uniform_weight_is_mmseg_slide_bit_for_bit():
    model = PositionBias().eval()
    x = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        slide = slide_logits(model, x, (32, 32), (20, 20), window_batch=3)
        expected = torch.zeros(2, 3, 70, 50)
        counts = torch.zeros(1, 1, 70, 50)
        for y1, y2, x1, x2 in window_grid(70, 50, (32, 32), (20, 20)):
            expected[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])["out"]
            counts[:, :, y1:y2, x1:x2] += 1
    torch.testing.assert_close(slide, expected / counts)


def test_blend_windows_rejects_an_unknown_weight():
    with pytest.raises(ValueError, match="window weight 'hann'"):
        next(blend_windows(lambda w: {}, 10, 10, (4, 4), (2, 2), "hann"))


@pytest.mark.parametrize("classes", [5, 300])
def test_streaming_png_equals_pil_label_image(tmp_path, classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, (37, 23))
    palette = [[int(v) for v in rng.integers(0, 256, 3)] for _ in range(classes)]
    writer = PngLabelWriter(tmp_path / "x.png", 37, 23, palette)
    for top in range(0, 37, 10):
        writer.write(slice(top, min(top + 10, 37)), labels[top:top + 10])
    writer.close()
    ours, pils = Image.open(tmp_path / "x.png"), label_image(labels, palette)
    assert ours.mode == pils.mode and np.array_equal(np.asarray(ours), np.asarray(pils))
    if classes <= 256:
        assert ours.getpalette()[:3 * classes] == pils.getpalette()[:3 * classes]
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left


def test_failed_prediction_leaves_no_output(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("out of memory (simulated)")
            return torch.zeros(x.shape[0], 3, *x.shape[-2:])

    image = np.zeros((100, 100, 3), dtype=np.uint8)
    writer = PngLabelWriter(tmp_path / "y.png", 100, 100, [[0, 0, 0]] * 3)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_tiled(TiledModel(Broken(), 3, (0, 0, 0), (1, 1, 1)), ArraySource(image), writer, 32, 8, window_batch=1)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles") / "model"
    upernet.save_model(tiny_model("upernet_r50"), folder)
    return folder


def test_cli_predict_tile_writes_blended_labels(tmp_path, capsys, model_dir):
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                 "--tile", "32", "--overlap", "8", "--precision", "fp32", "--device", "cpu"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    loaded = upernet.load_model(model_dir).eval()
    meta = resolve_meta(dict(loaded.meta or {}), 5)
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(meta["mean"]).view(3, 1, 1))
         / torch.tensor(meta["std"]).view(3, 1, 1))[None]
    with torch.no_grad():
        out = loaded(x[:, :, :32, :32])
    classes = (out["out"] if isinstance(out, dict) else out).shape[1]
    with torch.no_grad():
        total = torch.zeros(1, classes, 70, 90)
        weights = torch.zeros(1, 1, 70, 90)
        for y1, y2, x1, x2 in window_grid(70, 90, (32, 32), (24, 24)):
            ww = window_weight("cosine", (32, 32), (8, 8))
            o = loaded(x[:, :, y1:y2, x1:x2])
            total[:, :, y1:y2, x1:x2] += (o["out"] if isinstance(o, dict) else o).softmax(1) * ww
            weights[:, :, y1:y2, x1:x2] += ww
    expected = (total / weights).argmax(1)[0].numpy()
    assert (written == expected).mean() > 0.999  # prepared (fused) model: float rounding may flip a tie
    assert "a_labels.png" in capsys.readouterr().out


def test_cli_tile_refuses_options_it_cannot_honour(tmp_path, capsys, model_dir):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                 "--tile", "32", "--flip", "--device", "cpu"]) == 2
    assert "--save-probs" in capsys.readouterr().err


class LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the most elements of any tensor a torch call returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


@pytest.mark.parametrize("width", [400, 1200])
def test_tiled_prediction_buffers_are_bounded_by_tile_and_overlap_rows(tmp_path, width):
    # The carry holds classes x overlap x width floats; the open block and the window outputs
    # classes x tile x tile. Before, a band buffer of classes x (tile + stride) x width existed.
    # 90 rows: the slide grid moves its last row of windows back to row 58, 22 rows into the one
    # above (not 8): those rows must not be carried over the whole width either.
    classes, tile, overlap, batch = 3, 32, 8, 2
    image = np.random.default_rng(0).random((90, width, 3), dtype=np.float32)
    writer = PngLabelWriter(tmp_path / "z.png", 90, width, [[0, 0, 0], [9, 9, 9], [99, 99, 99]])
    with torch.no_grad(), LargestTensor() as tracker:
        counts = predict_tiled(TiledModel(PositionBias(classes).eval(), classes, (0.0,) * 3, (1.0,) * 3),
                               ArraySource(image), writer, tile, overlap, window_batch=batch)
    assert sum(counts.values()) == 90 * width
    assert 0 < tracker.largest <= max(classes * overlap * width, batch * classes * tile * tile)
    assert tracker.largest < classes * tile * width  # not one row of windows over the image width


@pytest.mark.parametrize("window_batch", [1, 3])
def test_blocks_blend_bit_for_bit_like_a_whole_image_buffer(window_batch):
    # Same terms added in the same order as into whole-image maps: equal, not just close (70 rows:
    # the last grid row is moved back and interleaved with the one above).
    model = PositionBias().eval()
    image = np.random.default_rng(1).random((70, 93, 3), dtype=np.float32)
    with torch.no_grad():
        _, tiled = stream(model, image, tile=32, overlap=12, window_batch=window_batch)
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        assert torch.equal(tiled, dense_blend(model, x, 32, 12, "cosine"))


def test_serve_slide_mode_runs_the_tiling_code(monkeypatch):
    # One implementation (issue #18): serve's slide mode reaches `tiles.blend_blocks`, as eval's does.
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io

    from fastapi.testclient import TestClient

    import upernet.inference.tiles as tiles
    from upernet.serve.app import create_app

    segmenter = upernet.Segmenter(tiny_model("upernet_r50", num_classes=3).eval(), device="cpu", precision="fp32",
                                  mode="slide", size="none", crop_size=(32, 32), stride=(24, 24))
    image = (np.random.default_rng(2).random((40, 56, 3)) * 255).astype(np.uint8)
    expected = segmenter(image).labels
    calls = []
    blend_blocks = tiles.blend_blocks

    def spy(forward, height, width, crop_size, stride, *args, **kwargs):
        calls.append((height, width, tuple(crop_size), tuple(stride)))
        yield from blend_blocks(forward, height, width, crop_size, stride, *args, **kwargs)

    monkeypatch.setattr(tiles, "blend_blocks", spy)
    upload = io.BytesIO()
    Image.fromarray(image).save(upload, format="PNG")
    with TestClient(create_app(segmenter)) as client:
        response = client.post("/predict?format=labels", content=upload.getvalue(),
                               headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert calls == [(40, 56, (32, 32), (24, 24))]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), expected)


def test_a_grey_model_segments_a_grey_png_in_tiles(tmp_path):
    """Tiled PNG input goes through the one image reader: a 1-band model gets the grey band itself
    (not RGB), so the labels equal those of the same array streamed from memory."""
    from upernet.inference.tiles import predict_file

    grey = np.random.default_rng(3).integers(0, 255, (70, 90), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    model = TiledModel(nn.Conv2d(1, 3, 3, padding=1).eval(), 3, (100.0,), (50.0,))
    out = predict_file(model, tmp_path / "grey.png", tmp_path / "grey", [(0, 0, 0), (9, 9, 9), (99, 99, 99)], 32, 8)
    expected = tmp_path / "expected.png"
    predict_tiled(model, ArraySource(grey), PngLabelWriter(expected, 70, 90, [(0, 0, 0)] * 3), 32, 8)
    assert out.name == "grey_labels.png"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(expected)))


def test_cli_window_batch_reaches_the_blend_and_keeps_the_labels(tmp_path, monkeypatch, model_dir):
    # `--window-batch 1` bounds the forward pass's outputs to one window; the labels stay those of the default.
    import upernet.inference.tiles as tiles

    image = (np.random.default_rng(4).random((70, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    batches = []
    blend_blocks = tiles.blend_blocks

    def spy(*args, **kwargs):
        batches.append(kwargs.get("window_batch", args[6] if len(args) > 6 else None))
        yield from blend_blocks(*args, **kwargs)

    monkeypatch.setattr(tiles, "blend_blocks", spy)
    labels = {}
    for option in ([], ["--window-batch", "1"]):
        out = tmp_path / f"out{len(option)}"
        assert main(["predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(out), "--tile", "32",
                     "--overlap", "8", "--precision", "fp32", "--device", "cpu", *option]) == 0
        labels[len(option)] = np.asarray(Image.open(out / "a_labels.png"))
    assert batches == [4, 1]
    assert np.array_equal(labels[0], labels[2])
