"""Inference modes (whole, slide, multi-scale + flip), image loading and resizing, class metadata."""
import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import upernet
from upernet.data.classes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, DATASET_META,
                                  VOC_CLASSES, VOC_PALETTE, default_palette, resolve_meta, set_meta)
from upernet.inference.modes import (MS_RATIOS, infer, load_image, normalize, parse_size, resize_image, resize_probs,
                                      resized_shape, slide_logits, window_grid)


class Pointwise(nn.Module):
    """Logits that depend on each pixel alone: slide must then equal whole exactly."""

    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class CropMean(nn.Module):
    """Logits = the mean of the whole input crop, broadcast: depends on which window a pixel is in."""

    def forward(self, x):
        m = x[:, :1].mean(dim=(2, 3), keepdim=True)
        return {"out": torch.cat([m, -m], 1).expand(-1, -1, *x.shape[-2:]).clone()}


class Asymmetric(nn.Module):
    """A 3x3 conv with a left-right asymmetric kernel, plus dropout to catch train-mode inference."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return {"out": self.drop(self.conv(x))}


def tiny_upernet(num_classes=5):
    torch.manual_seed(0)
    return upernet.build_model("upernet_convnext_tiny", num_classes=num_classes, channels=16, aux_channels=8,
                               backbone_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}).eval()


# ---- slide -----------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(512, 683), (100, 100), (37, 300), (512, 512)])
def test_window_grid_covers_image_with_crop_sized_windows(h, w):
    crop, stride = (64, 96), (40, 50)
    windows = window_grid(h, w, crop, stride)
    rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    assert len(windows) == rows * cols
    covered = torch.zeros(h, w, dtype=torch.int64)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop[0], h), min(crop[1], w))
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_window_grid_rejects_gaps():
    with pytest.raises(ValueError, match="stride"):
        window_grid(100, 100, (32, 32), (40, 20))


def test_slide_equals_whole_for_pointwise_model():
    model = Pointwise()
    x = torch.randn(2, 3, 70, 93)
    whole = model(x)["out"]
    slide = slide_logits(model, x, crop_size=(32, 40), stride=(20, 25))
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_averages_windows_with_counts_map():
    model = CropMean()
    x = torch.randn(1, 3, 50, 70)
    crop, stride = (30, 40), (20, 25)
    out = slide_logits(model, x, crop_size=crop, stride=stride, window_batch=3)
    # Brute force: at each pixel, the mean over the windows containing it of that window's mean.
    expected = torch.zeros(50, 70)
    counts = torch.zeros(50, 70)
    for y1, y2, x1, x2 in window_grid(50, 70, crop, stride):
        expected[y1:y2, x1:x2] += x[0, 0, y1:y2, x1:x2].mean()
        counts[y1:y2, x1:x2] += 1
    assert counts.max() > 1  # overlapping windows, so the division matters
    torch.testing.assert_close(out[0, 0], expected / counts)


def test_window_larger_than_image_runs_on_whole_image():
    model = CropMean()
    x = torch.randn(1, 3, 37, 53)
    assert window_grid(37, 53, (512, 512), (341, 341)) == [(0, 37, 0, 53)]
    torch.testing.assert_close(slide_logits(model, x, (512, 512), (341, 341)), model(x)["out"])
    probs = infer(model, x, mode="slide", crop_size=(512, 512), stride=(341, 341))
    torch.testing.assert_close(probs, model(x)["out"].softmax(1))


def test_slide_on_upernet_matches_whole_when_one_window():
    model = tiny_upernet()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(infer(model, x, "slide", (64, 64), (48, 48)), infer(model, x, "whole"))
    out = infer(model, x, "slide", (48, 48), (32, 32))
    assert out.shape == (1, 5, 64, 64)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 64, 64))


# ---- multi-scale + flip ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multiscale_flip_shapes_and_probabilities(mode):
    model = tiny_upernet(num_classes=6)
    x = torch.randn(1, 3, 64, 81)  # at ratio 0.5 still >= 32 pixels, what ConvNeXt's 4 downsamplings need
    probs = infer(model, x, mode=mode, crop_size=(64, 64), stride=(48, 48), scales=MS_RATIOS, flip=True)
    assert probs.shape == (1, 6, 64, 81)
    assert probs.min() >= 0
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 81))


def test_flip_averaging_is_mirror_symmetric():
    model = Asymmetric()
    x = torch.randn(1, 3, 33, 47)
    a = infer(model, x, scales=(0.75, 1.0), flip=True)
    b = infer(model, x.flip(-1), scales=(0.75, 1.0), flip=True)
    torch.testing.assert_close(a, b.flip(-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(infer(model, x), infer(model, x.flip(-1)).flip(-1), atol=1e-3)  # the model itself is not


@pytest.mark.parametrize("out_size", [None, (53, 71)])
def test_multiscale_averages_softmax_of_each_scale(out_size):
    model = Asymmetric()
    x = torch.randn(1, 3, 40, 60)
    size = out_size or (40, 60)
    model.eval()
    with torch.no_grad():
        parts = []
        for ratio in (0.5, 1.5):
            scaled = F.interpolate(x, size=(int(40 * ratio + 0.5), int(60 * ratio + 0.5)), mode="bilinear")
            # mmsegmentation's order: logits resized to the output size, then the softmax
            logits = F.interpolate(model(scaled)["out"], size=size, mode="bilinear")
            parts.append(logits.softmax(1))
    model.train()
    torch.testing.assert_close(infer(model, x, scales=(0.5, 1.5), out_size=out_size), (parts[0] + parts[1]) / 2)


def test_infer_restores_training_mode_and_disables_dropout():
    model = Asymmetric().train()
    x = torch.randn(3, 20, 20)  # one unbatched image
    a, b = infer(model, x), infer(model, x)
    assert model.training
    assert a.shape == (1, 3, 20, 20)
    torch.testing.assert_close(a, b)


def test_autocast_bf16_close_to_fp32():
    model = tiny_upernet()
    x = torch.randn(1, 3, 48, 48)
    full = infer(model, x)
    half = infer(model, x, autocast_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert (full - half).abs().max() < 0.1


def test_resize_probs_to_label_size_still_sums_to_one():
    probs = torch.rand(1, 7, 30, 40).softmax(1)
    out = resize_probs(probs, (61, 83))
    assert out.shape == (1, 7, 61, 83)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 61, 83))


def test_bad_mode_and_shape_are_errors():
    with pytest.raises(ValueError, match="mode"):
        infer(Pointwise(), torch.randn(1, 3, 8, 8), mode="tiles")
    with pytest.raises(ValueError, match="shape"):
        infer(Pointwise(), torch.randn(1, 4, 8, 8))


# ---- images ----------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    r, g, b = loaded.getpixel((10, 2))  # the left strip is now on top
    assert r > 200 and b < 60
    assert loaded.mode == "RGB"


def test_truncated_image_error_names_file(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(path)


def test_non_image_and_missing_file_errors(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_size_rules():
    assert parse_size("none") is None and parse_size(None) is None
    assert parse_size("512") == 512 and parse_size("2048x512") == (2048, 512)
    # keep ratio: the smaller of long-side and short-side factors (mmcv rescale_size)
    assert resized_shape(240, 320, (2048, 512)) == (512, 683)
    assert resized_shape(512, 4096, (2048, 512)) == (256, 2048)
    assert resized_shape(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert resized_shape(240, 320, 120) == (120, 160)
    assert resized_shape(240, 320, None) == (240, 320)
    for bad in ("0", "big", "1x2x3", "-3"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_resize_and_normalize():
    img = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    out = resize_image(img, 12)
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 16)
    assert resize_image(img, None) is img
    x = normalize(torch.full((3, 2, 2), 128, dtype=torch.uint8), (100, 110, 120), (2, 3, 4))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([14.0, 6.0, 2.0]))


# ---- class metadata --------------------------------------------------------------------------
def test_builtin_class_tables():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert len(VOC_CLASSES) == len(VOC_PALETTE) == 21
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert VOC_CLASSES[0] == "background" and VOC_PALETTE[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert VOC_PALETTE[20] == (0, 64, 128)
    for meta in DATASET_META.values():
        assert len(set(meta["class_names"])) == len(meta["class_names"])


def test_default_palette_distinct_and_deterministic():
    p = default_palette(300)
    assert len({tuple(c) for c in p}) == 300 and p == default_palette(300)
    assert all(0 <= v <= 255 for c in p for v in c)


def test_meta_defaults_and_set_meta(tmp_path):
    meta = resolve_meta({}, 4)
    assert meta["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert len(meta["palette"]) == 4 and meta["mean"] == [123.675, 116.28, 103.53]
    model = tiny_upernet(num_classes=19)
    set_meta(model, dataset="cityscapes")
    assert model.meta["class_names"][13] == "car" and model.meta["std"] == [58.395, 57.12, 57.375]
    model.save(tmp_path / "m")
    assert upernet.load_model(tmp_path / "m").meta == model.meta  # stored in config.json
    with pytest.raises(ValueError, match="150 entries but the model has 19"):
        set_meta(model, dataset="ade20k")


def test_resize_in_stripes_matches_interpolate():
    from upernet.ops.resize import resize_in_stripes

    for (h, w), size in (((30, 40), (61, 83)), ((61, 83), (30, 40)), ((17, 5), (100, 7))):
        x = torch.randn(1, 4, h, w)
        stripes = list(resize_in_stripes(x, size, rows=7))
        assert [s.stop - s.start for s, _ in stripes][:-1] == [7] * (len(stripes) - 1)
        out = torch.cat([t for _, t in stripes], dim=2)
        torch.testing.assert_close(out, F.interpolate(x, size=size, mode="bilinear"), rtol=1e-4, atol=1e-4)


def test_meta_recognises_builtin_class_names():
    names = list(VOC_CLASSES)
    names[3] = names[3] + " "  # converted checkpoints may carry mmsegmentation's stray spaces
    meta = resolve_meta({"class_names": names}, 21)
    assert meta["palette"] == [list(c) for c in VOC_PALETTE]
    assert resolve_meta({"class_names": ["a", "b"]}, 2)["palette"] == default_palette(2)
