"""Built-in synthetic scenes: no download, deterministic from a seed, small enough for 2 CPU cores.

A lake scene with 7 classes whose identity colour alone cannot give away:
  - sky / water: one shared colour and texture field; a pixel is sky above the shore and water below
    it, so deciding needs context from far away (what pyramid pooling provides);
  - reeds / pier: striped patches from the same colour and size distribution; only the stripe
    orientation differs (vertical vs horizontal), which survives flips and rescaling;
  - boat / buoy: flat shapes from the same colour distribution; boats are long ellipses, buoys
    small discs;
  - shore: a speckled band of varying height and thickness between sky and water.
Sample `i` of a split is generated from its own torch.Generator seeded by (seed, split, i).
"""
from __future__ import annotations

import colorsys
import contextlib
import math
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..errors import UserError
from ..io import atomic_write
from ..ops.resize import resize
from .datasets import SegmentationDataset

SYNTHETIC_CLASSES = ("sky", "water", "shore", "reeds", "pier", "boat", "buoy")
SYNTHETIC_PALETTE = ((135, 206, 235), (30, 80, 170), (200, 180, 120), (40, 150, 60), (150, 90, 40),
                     (220, 40, 40), (250, 200, 0))
SKY, WATER, SHORE, REEDS, PIER, BOAT, BUOY = range(7)


def sample_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The random stream of one sample: the same (seed, split, index) draws the same sample anywhere."""
    key = (seed * 1_000_003 + zlib.crc32(split.encode()) * 7_919 + index) % (2**63)
    return torch.Generator().manual_seed(key)


def uniform(g: torch.Generator, low: float, high: float) -> float:
    """A float drawn uniformly from [low, high)."""
    return low + torch.rand((), generator=g).item() * (high - low)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=g))


def _colour(g: torch.Generator, hue: Sequence[float], sat: Sequence[float], val: Sequence[float]) -> torch.Tensor:
    rgb = colorsys.hsv_to_rgb(uniform(g, *hue), uniform(g, *sat), uniform(g, *val))
    return torch.tensor(rgb).view(3, 1, 1) * 255


def _smooth_noise(g: torch.Generator, size: tuple[int, int], cells: int) -> torch.Tensor:
    """(H, W) noise in [-1, 1] varying over about `cells` blobs per side."""
    coarse = torch.rand(1, 1, cells, cells, generator=g) * 2 - 1
    return resize(coarse, size)[0, 0]


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (several times slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def synthetic_sample(index: int, seed: int = 0, split: str = "train",
                     image_size: int | Sequence[int] = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene `index` of `split`: uint8 image (3, H, W) and uint8 label (H, W) with the classes above.

    Args:
        index: sample number within the split.
        seed: dataset seed; the same (seed, split, index) always gives the same scene.
        split: split name; different splits give different scenes.
        image_size: H = W, or (H, W).
    """
    with _one_thread():
        return _scene(index, seed, split, image_size)


def _scene(index: int, seed: int, split: str, image_size: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    g = sample_generator(seed, split, index)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)

    # Sky and water: one colour, one texture; the shore band decides which is which.
    image = _colour(g, (0.5, 0.7), (0.2, 0.6), (0.55, 0.95)).expand(3, h, w).clone()
    image += 25 * _smooth_noise(g, (h, w), 5) + 10 * _smooth_noise(g, (h, w), 16)
    top = uniform(g, 0.2, 0.75) * h + uniform(g, 1, 0.04 * h) * torch.sin(
        2 * math.pi * _randint(g, 1, 3) * xs / w + uniform(g, 0, 2 * math.pi))
    bottom = top + uniform(g, 0.06, 0.14) * h + 1.5 * torch.sin(xs / uniform(g, 3, 8))
    label = torch.where(ys < top, SKY, WATER)
    shore = (ys >= top) & (ys < bottom)
    speckle = _colour(g, (0.05, 0.18), (0.3, 0.6), (0.4, 0.7)) + 18 * torch.randn(3, h, w, generator=g)
    image = torch.where(shore, speckle, image)
    label[shore] = SHORE

    # Reeds and pier: same colours and sizes, vertical vs horizontal stripes.
    for _ in range(_randint(g, 0, 3)):
        cls = REEDS if _randint(g, 0, 1) else PIER
        ph, pw = int(uniform(g, 0.1, 0.25) * h), int(uniform(g, 0.1, 0.25) * w)
        y0, x0 = _randint(g, 0, h - ph), _randint(g, 0, w - pw)
        period = 2 * _randint(g, 2, 4)
        along = xs if cls == REEDS else ys
        stripes = torch.where((along + _randint(g, 0, period)) % period < period // 2, 1.0, -1.0)
        colour = _colour(g, (0.0, 1.0), (0.3, 0.7), (0.35, 0.75)) + 30 * stripes
        region = (ys >= y0) & (ys < y0 + ph) & (xs >= x0) & (xs < x0 + pw)
        image = torch.where(region, colour, image)
        label[region] = cls

    # Boats and buoys on the water: same colours, long ellipses vs small discs.
    water_top = int(bottom.max().item()) + 1
    shapes = [BOAT] * _randint(g, 0, 2) + [BUOY] * _randint(g, 0, 4)
    for cls in shapes:
        if cls == BOAT:
            a = uniform(g, 0.12, 0.2) * w
            b = a / uniform(g, 2.5, 3.5)
        else:
            a = b = uniform(g, 0.03, 0.05) * w
        if water_top + b >= h - b:
            continue
        cy, cx = uniform(g, water_top + b, h - b), uniform(g, 0, w)
        region = ((ys - cy) / b) ** 2 + ((xs - cx) / a) ** 2 <= 1
        colour = _colour(g, (0.0, 1.0), (0.6, 1.0), (0.7, 1.0))
        image = torch.where(region, colour, image)
        label[region] = cls

    image += 3 * torch.randn(3, h, w, generator=g)
    return image.clamp(0, 255).round().to(torch.uint8), label.to(torch.uint8)


def synthetic_sample_image(seed: int = 0, image_size: int | Sequence[int] = 160) -> Image.Image:
    """One synthetic scene as a PIL image, e.g. to try `upernet predict` without any data."""
    image, _ = synthetic_sample(0, seed, "sample", image_size)
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def write_synthetic_images(folder: str | Path, split: str = "val", count: int = 4,
                           image_size: int | Sequence[int] = 128, seed: int = 0) -> list[Path]:
    """The first `count` scenes of `split` as PNG files `<split>_<i>.png` in `folder` (kept when present).

    Args:
        folder: output folder (created).
        split: split name of the scenes.
        count: number of scenes.
        image_size: H = W, or (H, W).
        seed: dataset seed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{split}_{i:05d}.png"
        if not path.is_file():
            image, _ = synthetic_sample(i, seed, split, image_size)
            picture = Image.fromarray(image.permute(1, 2, 0).numpy())
            atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
        paths.append(path)
    return paths


class SyntheticDataset(SegmentationDataset):
    """The synthetic scenes as a dataset, generated on first access and cached in memory.

    Args:
        split: split name ("train", "val", ...); each split has its own scenes.
        transform: callable (image, label) -> (image, label); default: normalise only.
        num_samples: number of scenes; default 2000 for "train", 200 otherwise.
        image_size: H = W, or (H, W).
        seed: dataset seed.
        cache: keep generated scenes in memory (about 50 KB each at 128x128).
    """

    def __init__(self, split: str = "train", transform: Callable | None = None, num_samples: int | None = None,
                 image_size: int | Sequence[int] = 128, seed: int = 0, cache: bool = True):
        super().__init__(SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, transform, name=f"synthetic {split} (seed {seed})")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.num_samples = num_samples if num_samples is not None else 2000 if split == "train" else 200
        if self.num_samples <= 0:
            raise UserError(f"{self.name}: the split is empty (num_samples={self.num_samples})")
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name}: index {index} out of range for {self.num_samples} samples")
        sample = self._cache.get(index) if self._cache is not None else None
        if sample is None:
            sample = synthetic_sample(index, self.seed, self.split, self.image_size)
            if self._cache is not None:
                self._cache[index] = sample
        image, label = sample
        return image, label.long(), f"synthetic/{self.split}/{index:06d}.png"


def write_synthetic_folder(root: str | Path, num_train: int = 64, num_val: int = 16,
                           image_size: int | Sequence[int] = 128, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic scenes as a generic folder dataset (`img_dir/`, `ann_dir/`, PNG files).

    Returns the options that open it again: `build_dataset("folder", root, split, t, **options)`.

    Args:
        root: output folder (created).
        num_train: scenes in `train` (the same as `SyntheticDataset("train")`'s first ones).
        num_val: scenes in `val`.
        image_size: H = W, or (H, W).
        seed: dataset seed.
    """
    root = Path(root)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = synthetic_sample(i, seed, split, image_size)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "img_dir" / split / f"{i:05d}.png")
            Image.fromarray(label.numpy()).save(root / "ann_dir" / split / f"{i:05d}.png")
    return {"classes": list(SYNTHETIC_CLASSES), "palette": [list(c) for c in SYNTHETIC_PALETTE],
            "img_suffix": ".png", "seg_suffix": ".png"}
