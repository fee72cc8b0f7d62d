"""Inference modes shared by `predict`, `eval` and `Segmenter`, and the image-side helpers they need.

Modes follow mmsegmentation's test-time semantics:

- "whole": one forward pass over the (resized) image.
- "slide": overlapping `crop_size` windows `stride` apart on mmsegmentation's grid; the logits of
  each window are added into the full map and divided by how many windows covered each pixel
  (`tiles.blend_windows`, the one implementation of windowed inference).
- multi-scale + flip: the input is rescaled by each ratio (typically `MS_RATIOS`), each scale is
  predicted (whole or slide) and resized back to the input size, flipped predictions are flipped
  back, and the softmax probabilities of all passes are averaged.

A model may return one logits tensor, {"out": logits}, or several outputs by name (the multi-task
model): pixel outputs (N, C, H, W) are treated as above, image-level outputs (N, C) are averaged
over windows and passes. Images are loaded with their EXIF orientation applied and pre-processed
by `data.transforms.preprocess` (resize rule, normalisation), the same function eval uses.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image, ImageOps
from torch import nn

from ..errors import MissingFile, UserError
from ..data.datasets import read_image
from ..data.transforms import SizeRule, parse_size, resize_image, resized_shape, to_rgb  # noqa: F401 (re-exported)
from ..ops.resize import resize
from .probabilities import class_probabilities
from .tiles import blend_windows, forward_outputs, window_grid  # noqa: F401 (window_grid re-exported)

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_CROP = (512, 512)
DEFAULT_STRIDE = (341, 341)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---- inference modes -------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then the previous mode back (eval is called during training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def slide_outputs(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: Sequence[int] = DEFAULT_CROP,
    stride: Sequence[int] = DEFAULT_STRIDE,
    autocast_dtype: torch.dtype | None = None,
    window_batch: int = 4,
    weight: str = "uniform",
) -> dict[str, torch.Tensor]:
    """Sliding-window outputs by name: pixel logits (N, C, H, W) blended over the windows (with
    the default "uniform" weight: summed and divided by the counts map, mmsegmentation's slide);
    image-level logits (N, C) averaged over the windows.

    The windows and the blend are `tiles.blend_windows`, the code tiled prediction of huge images
    streams; here its row bands are put together into the whole map. All windows have the same
    size (they are clipped to the image by moving, not cutting), so up to `window_batch` of them
    run in one forward pass.

    Args:
        model: a model returning logits, {"out": logits} or a dict of outputs by name.
        images: normalised float images (N, 3, H, W).
        crop_size: (h, w) of the windows.
        stride: (h, w) step between windows.
        autocast_dtype: run forward passes under autocast with this dtype.
        window_batch: windows per forward pass.
        weight: "uniform" (mmsegmentation) or "cosine" (smooth ramp, see `tiles`).
    """
    height, width = images.shape[-2:]
    names: list[str] = []  # the model's order of outputs

    def forward(windows: list[tuple[int, int, int, int]]) -> dict[str, torch.Tensor]:
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
        outputs = forward_outputs(model, crops, autocast_dtype)
        names[:] = names or list(outputs)
        return outputs

    bands = list(blend_windows(forward, height, width, crop_size, stride, weight, window_batch))
    return {name: bands[-1].images[name] if name in bands[-1].images
            else torch.cat([band.pixels[name] for band in bands], dim=2) for name in names}


def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: Sequence[int] = DEFAULT_CROP,
    stride: Sequence[int] = DEFAULT_STRIDE,
    autocast_dtype: torch.dtype | None = None,
    window_batch: int = 4,
) -> torch.Tensor:
    """Logits (N, C, H, W) of sliding-window inference of a segmentation model (see `slide_outputs`)."""
    return slide_outputs(model, images, crop_size, stride, autocast_dtype, window_batch)["out"]


def infer_outputs(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = DEFAULT_CROP,
    stride: Sequence[int] | None = DEFAULT_STRIDE,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    out_size: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Softmax probabilities of every output of the model, by name ("out" for a segmentation model).
    A one-channel pixel output (a sigmoid model) becomes (background, foreground) probabilities
    split at the model's `meta["binary_threshold"]` (see `binary_probabilities`).

    Pixel outputs come back as (N, C, H, W) at the input size (or `out_size`), image-level outputs
    as (N, C). Each pass's logits are resized to the output size before the softmax,
    mmsegmentation's order (resizing probabilities after the softmax moves the argmax near class
    borders). Pass the original image or label size as `out_size` to get the prediction there.

    Args:
        model: a model returning logits, {"out": logits} or a dict of outputs by name.
        image: normalised float images (N, 3, H, W), or one image (3, H, W).
        mode: "whole" (one forward pass) or "slide" (overlapping windows).
        crop_size: (h, w) of the slide windows; None for the default 512x512.
        stride: (h, w) step between slide windows; None for the default 341x341.
        scales: ratios the input is rescaled by; each scale's probabilities are averaged
            (`MS_RATIOS` for mmsegmentation's multi-scale test).
        flip: also predict the horizontally flipped input and average it in.
        autocast_dtype: run forward passes under autocast with this dtype (e.g. torch.bfloat16 on CPU).
        out_size: (H, W) of the returned pixel probabilities; None for the input size.
    """
    if mode not in ("whole", "slide"):
        raise UserError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if not scales or min(scales) <= 0:
        raise UserError(f"scales must be positive ratios, got {tuple(scales)}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != getattr(model, "in_channels", 3):
        raise ValueError(f"expected a normalised image (N, C, H, W) or (C, H, W), C = the model's in_channels, "
                         f"got shape {tuple(image.shape)}")
    crop_size = tuple(crop_size or DEFAULT_CROP)
    stride = tuple(stride or DEFAULT_STRIDE)
    height, width = image.shape[-2:]
    size = tuple(out_size) if out_size is not None else (height, width)

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if mode == "slide":
            return slide_outputs(model, x, crop_size, stride, autocast_dtype)
        return forward_outputs(model, x, autocast_dtype)

    threshold = float((getattr(model, "meta", None) or {}).get("binary_threshold", 0.5))
    probs: dict[str, torch.Tensor] = {}
    passes = 0
    with _eval_mode(model), torch.no_grad():
        for ratio in scales:
            scaled_size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
            scaled = resize(image, scaled_size)
            for flipped in (False, True) if flip else (False,):
                x = scaled.flip(-1) if flipped else scaled
                for name, logits in forward(x).items():
                    if logits.dim() == 4:
                        logits = logits.flip(-1) if flipped else logits
                        logits = resize(logits, size)
                    # a 1-channel pixel output is a sigmoid model's foreground logit
                    p = class_probabilities(logits, threshold)
                    probs[name] = p if name not in probs else probs[name] + p
                passes += 1
    return {name: p / passes for name, p in probs.items()}


def infer(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = DEFAULT_CROP,
    stride: Sequence[int] | None = DEFAULT_STRIDE,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N, C, H, W) of a segmentation model at the input size (or `out_size`).

    Args:
        model: segmentation model returning {"out": logits at input size} (or the logits).
        image: normalised float images (N, 3, H, W), or one image (3, H, W).
        mode: "whole" (one forward pass) or "slide" (overlapping windows).
        crop_size: (h, w) of the slide windows; None for the default 512x512.
        stride: (h, w) step between slide windows; None for the default 341x341.
        scales: ratios the input is rescaled by; each scale's probabilities are averaged.
        flip: also predict the horizontally flipped input and average it in.
        autocast_dtype: run forward passes under autocast with this dtype (e.g. torch.bfloat16 on CPU).
        out_size: (H, W) of the returned probabilities; None for the input size.
    """
    return infer_outputs(model, image, mode, crop_size, stride, scales, flip, autocast_dtype, out_size)["out"]


def resize_probs(probs: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Probabilities (N, C, h, w) -> (N, C, H, W) (bilinear; still sums to 1).

    Cheaper in memory than `infer(..., out_size=...)` for many classes at large sizes, but not
    mmsegmentation's order (see `infer`).
    """
    return resize(probs.float(), tuple(size))


# ---- images ----------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """An 8-bit RGB image with its EXIF orientation applied, fully decoded: `data.datasets.read_image`.

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not an
    image, truncated or corrupt (PIL decodes lazily, so the pixels are decoded here, not later).
    """
    return Image.fromarray(read_image(path, 3).permute(1, 2, 0).numpy(), mode="RGB")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) tensor of an RGB PIL image."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) -> normalised float (1, 3, H, W), mean and std on the 0-255 scale."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((image.float() - mean_t) / std_t).unsqueeze(0)


def find_images(paths: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Image files given directly or found (recursively, sorted) in folders, as (file, folder it came from).

    A file given directly is kept whatever its suffix (it gets a read error later if it is not an
    image); inside folders only the suffixes in `IMAGE_SUFFIXES` are taken.
    """
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise MissingFile(f"{p}: folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            found += [(f, p) for f in files]
        elif p.is_file():
            found.append((p, p.parent))
        else:
            raise MissingFile(f"{p}: no such image file or folder")
    return found
