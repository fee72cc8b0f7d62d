"""Paired transforms: alignment of image and mask, mmsegmentation's crop/pad/resize rules, RNG use."""
import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from upernet.data.transforms import (_scale_saturation, build_eval_transform, build_train_transform, pad_pair,
                                     photometric_distortion, random_crop, rescale_size, to_mask)

# Colours far apart, so every pixel's class can be read back from its colour.
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0]], dtype=torch.float32)


def _blocky_pair(h: int, w: int, block: int, seed: int):
    """A mask of random `block`-sized squares and an image painting each class in its colour."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, len(COLOURS), (h // block, w // block), generator=g)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = COLOURS[mask].permute(2, 0, 1).to(torch.uint8)
    return image, mask


def _interior(label: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one label (bilinear and nearest may differ at edges)."""
    padded = torch.nn.functional.pad(label[None, None].float(), (1, 1, 1, 1), mode="replicate")
    windows = torch.nn.functional.unfold(padded, 3)[0]
    return (windows == windows[4:5]).all(0).view(label.shape)


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_image_and_mask_aligned(seed):
    image, mask = _blocky_pair(96, 128, 16, seed)
    transform = build_train_transform(crop_size=(64, 80), scale=(128, 96), ratio_range=(0.5, 2.0),
                                      cat_max_ratio=0.75, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    out, label = transform(image, mask, generator=torch.Generator().manual_seed(seed))
    assert out.shape == (3, 64, 80) and label.shape == (64, 80) and label.dtype == torch.int64
    keep = _interior(label) & (label != 255)
    assert keep.float().mean() > 0.3
    nearest = torch.cdist(out.permute(1, 2, 0).reshape(-1, 3), COLOURS).argmin(1).view(label.shape)
    assert (nearest[keep] == label[keep]).float().mean() > 0.99


def test_flip_moves_image_and_mask_together():
    image, mask = _blocky_pair(32, 32, 8, 0)
    transform = build_train_transform(crop_size=None, scale=None, flip_prob=1.0, photometric=False,
                                      mean=(0, 0, 0), std=(1, 1, 1))
    out, label = transform(image, mask)
    assert torch.equal(label, mask.flip(-1))
    assert torch.equal(out, image.flip(-1).float())


def test_same_generator_same_output_and_global_rng_is_used():
    image, mask = _blocky_pair(64, 64, 8, 1)
    transform = build_train_transform(crop_size=(48, 48), scale=(128, 64))
    a = transform(image, mask, generator=torch.Generator().manual_seed(5))
    b = transform(image, mask, generator=torch.Generator().manual_seed(5))
    c = transform(image, mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = transform(image, mask)
    torch.manual_seed(3)
    e = transform(image, mask)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_pad_image_with_zero_and_mask_with_ignore():
    image = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    mask = torch.ones(20, 30, dtype=torch.int64)
    transform = build_train_transform(crop_size=(32, 48), scale=None, flip_prob=0.0, photometric=False)
    out, label = transform(image, mask)
    assert out.shape == (3, 32, 48) and label.shape == (32, 48)
    assert (out[:, 20:] == 0).all() and (out[:, :, 30:] == 0).all()
    assert (label[20:] == 255).all() and (label[:, 30:] == 255).all()
    assert (label[:20, :30] == 1).all() and (out[:, :20, :30] != 0).all()
    padded_img, padded_mask = pad_pair(image, to_mask(mask), (24, 30))
    assert padded_img.shape == (3, 24, 30) and (padded_mask[0, 20:] == 255).all()


def test_random_resize_keeps_ratio_within_range():
    image, mask = _blocky_pair(20, 40, 4, 0)
    transform = build_train_transform(crop_size=None, scale=(64, 16), ratio_range=(0.5, 2.0), flip_prob=0.0,
                                      photometric=False)
    shorts = []
    for seed in range(20):
        out, label = transform(image, mask, generator=torch.Generator().manual_seed(seed))
        h, w = out.shape[-2:]
        assert label.shape == (h, w) and abs(w - 2 * h) <= 1
        shorts.append(h)
    assert 8 <= min(shorts) and max(shorts) <= 32 and len(set(shorts)) > 5


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # ADE20K-sized image: unchanged
    assert rescale_size(1024, 2048, (2048, 512)) == (512, 1024)  # short side bound
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound wins


def test_cat_max_ratio_prefers_crops_with_several_classes():
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[:12, :12] = 1
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)

    def rate(ratio: float) -> float:
        g = torch.Generator().manual_seed(0)
        hits = 0
        for _ in range(200):
            _, crop = random_crop(image, to_mask(mask), (16, 16), ratio, generator=g)
            counts = torch.bincount(crop.flatten(), minlength=2)
            hits += int(counts.max() / counts.sum() < 0.75)
        return hits / 200

    # ~12% of crop positions pass; with 10 retries ~75% of crops do.
    assert rate(1.0) < 0.25
    assert rate(0.75) > 0.5


def test_cat_max_ratio_ignores_the_ignore_index():
    # Class 0 and ignore only: no crop holds two real classes, so every try is refused and the
    # 11th draw is returned; with ignore counted as a class most crops would pass at the first try.
    mask = torch.full((32, 32), 255, dtype=torch.int64)
    mask[:, :16] = 0
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    random_crop(image, to_mask(mask), (16, 16), 0.75, generator=g1)
    for _ in range(11):  # one first draw + 10 redraws, two numbers each
        torch.randint(0, 17, (), generator=g2), torch.randint(0, 17, (), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_saturation_matches_hsv_round_trip():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 1, 200), generator=g, dtype=torch.uint8)
    for alpha in (0.5, 1.4):
        ours = _scale_saturation(pixels, alpha)[:, 0].T.tolist()
        for (r, gg, b), got in zip(pixels[:, 0].T.tolist(), ours):
            h, s, v = colorsys.rgb_to_hsv(r / 255, gg / 255, b / 255)
            want = [c * 255 for c in colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v)]
            assert max(abs(x - y) for x, y in zip(got, want)) <= 1.0


def test_photometric_distortion_changes_colours_not_shape():
    image, _ = _blocky_pair(32, 32, 8, 0)
    outs = [photometric_distortion(image, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert sum(not torch.equal(o, image) for o in outs) >= 6


def test_eval_transform_resizes_image_only():
    image = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))
    mask = np.arange(300).reshape(10, 30) % 7
    out, label = build_eval_transform(scale=(64, 32))(image, mask)
    assert out.shape == (3, 21, 64) and out.dtype == torch.float32
    assert label.shape == (10, 30) and torch.equal(label, torch.from_numpy(mask))
    out, label = build_eval_transform(scale=None, mean=(0, 0, 0), std=(1, 1, 1))(image, None)
    assert out.shape == (3, 10, 30) and label is None


def test_normalise_uses_mean_std_on_0_255_scale():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    out, _ = build_eval_transform(scale=None, mean=(100, 50, 0), std=(1, 2, 4))(image, torch.zeros(4, 4))
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.0, 25.0, 25.0]))
