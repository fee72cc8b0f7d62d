"""Inference modes shared by `predict` and `eval`, and the image-side helpers they both need.

Modes follow mmsegmentation's test-time semantics:

- "whole": one forward pass over the (resized) image.
- "slide": overlapping `crop_size` windows `stride` apart on mmsegmentation's grid; the logits of
  each window are added into the full map and divided by how many windows covered each pixel.
- multi-scale + flip: the input is rescaled by each ratio (typically `MS_RATIOS`), each scale is
  predicted (whole or slide) and resized back to the input size, flipped predictions are flipped
  back, and the softmax probabilities of all passes are averaged.

Images are loaded with their EXIF orientation applied, resized with mmsegmentation's keep-ratio
rule and normalised with the model's mean/std (0-255 scale).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from PIL import Image, ImageOps
from torch import nn

from ..ops.resize import resize

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_CROP = (512, 512)
DEFAULT_STRIDE = (341, 341)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# A resize rule: None (keep the size), an int (short side), or (a, b) (keep ratio: long side <= max,
# short side <= min, mmsegmentation's `Resize(scale=(2048, 512), keep_ratio=True)`).
SizeRule = Union[None, int, tuple[int, int]]


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


def _logits(model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One forward pass -> float32 logits; accepts models returning {"out": ...} or a tensor."""
    context = (torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
    with context:
        out = model(images)
    out = out["out"] if isinstance(out, dict) else out
    return out.float()


def window_grid(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows of mmsegmentation's slide inference.

    `max(H - crop + stride - 1, 0) // stride + 1` rows (and columns likewise); the last window is
    moved back to end at the image border, and a window larger than the image becomes the image.
    """
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise ValueError(f"crop size {tuple(crop_size)} and stride {tuple(stride)} must be positive")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {tuple(stride)} larger than the crop {tuple(crop_size)} would leave pixels "
                         f"that no window covers; use a stride <= the crop size")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride_h + crop_h, height)
            x2 = min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: Sequence[int] = DEFAULT_CROP,
    stride: Sequence[int] = DEFAULT_STRIDE,
    autocast_dtype: torch.dtype | None = None,
    window_batch: int = 4,
) -> torch.Tensor:
    """Logits (N, C, H, W) of sliding-window inference: window logits summed, divided by the counts map.

    All windows have the same size (they are clipped to the image by moving, not cutting), so up
    to `window_batch` of them run in one forward pass.
    """
    n, _, height, width = images.shape
    windows = window_grid(height, width, crop_size, stride)
    total: torch.Tensor | None = None
    counts = torch.zeros(1, 1, height, width, device=images.device)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start:start + window_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = _logits(model, crops, autocast_dtype)
        if total is None:
            total = logits.new_zeros(n, logits.shape[1], height, width)
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            total[:, :, y1:y2, x1:x2] += logits[i * n:(i + 1) * n]
            counts[:, :, y1:y2, x1:x2] += 1
    return total / counts


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
    """Softmax probabilities (N, C, H, W) at the input size (or `out_size`), for a normalised image batch.

    Each pass's logits are resized to the output size before the softmax, mmsegmentation's order
    (resizing probabilities after the softmax moves the argmax near class borders). Pass the
    original image or label size as `out_size` to get the prediction there directly.

    Args:
        model: segmentation model returning {"out": logits at input size} (or the logits).
        image: normalised float images (N, 3, H, W), or one image (3, H, W).
        mode: "whole" (one forward pass) or "slide" (overlapping windows).
        crop_size: (h, w) of the slide windows; None for the default 512x512.
        stride: (h, w) step between slide windows; None for the default 341x341.
        scales: ratios the input is rescaled by; each scale's probabilities are averaged
            (`MS_RATIOS` for mmsegmentation's multi-scale test).
        flip: also predict the horizontally flipped input and average it in.
        autocast_dtype: run forward passes under autocast with this dtype (e.g. torch.bfloat16 on CPU).
        out_size: (H, W) of the returned probabilities; None for the input size.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive ratios, got {tuple(scales)}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected a normalised image (N, 3, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    crop_size = tuple(crop_size or DEFAULT_CROP)
    stride = tuple(stride or DEFAULT_STRIDE)
    height, width = image.shape[-2:]
    size = tuple(out_size) if out_size is not None else (height, width)

    def predict(x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_logits(model, x, crop_size, stride, autocast_dtype)
        return _logits(model, x, autocast_dtype)

    probs: torch.Tensor | None = None
    passes = 0
    with _eval_mode(model), torch.no_grad():
        for ratio in scales:
            scaled_size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
            scaled = resize(image, scaled_size)
            for flipped in (False, True) if flip else (False,):
                x = scaled.flip(-1) if flipped else scaled
                logits = predict(x)
                logits = logits.flip(-1) if flipped else logits
                p = resize(logits, size).softmax(dim=1)
                probs = p if probs is None else probs + p
                passes += 1
    return probs / passes


def resize_probs(probs: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Probabilities (N, C, h, w) -> (N, C, H, W) (bilinear; still sums to 1).

    Cheaper in memory than `infer(..., out_size=...)` for many classes at large sizes, but not
    mmsegmentation's order (see `infer`).
    """
    return resize(probs.float(), tuple(size))


# ---- images ----------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied, fully decoded.

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not an
    image, truncated or corrupt (PIL decodes lazily, so the pixels are decoded here, not later).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) tensor of an RGB PIL image."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def parse_size(text: str | int | Sequence[int] | None) -> SizeRule:
    """A `--size` value -> resize rule: "none", "512" (short side) or "2048x512" (keep-ratio scale)."""
    error = ValueError(f"size {text!r}: use 'none', a short side like '512' or a keep-ratio scale like '2048x512'")
    if text is None or str(text).strip().lower() in ("none", "original"):
        return None
    if isinstance(text, str):
        parts = text.strip().lower().split("x")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise error
        values = tuple(int(p) for p in parts)
    else:
        values = (int(text),) if isinstance(text, int) else tuple(int(v) for v in text)
    if len(values) not in (1, 2) or min(values) <= 0:
        raise error
    return values[0] if len(values) == 1 else values


def resized_shape(height: int, width: int, size: SizeRule) -> tuple[int, int]:
    """The (H, W) an image gets under a resize rule, rounded as mmcv's `rescale_size` does."""
    if size is None:
        return height, width
    if isinstance(size, int):
        factor = size / min(height, width)
    else:
        factor = min(max(size) / max(height, width), min(size) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: torch.Tensor, size: SizeRule) -> torch.Tensor:
    """Resize a uint8 (3, H, W) image by a resize rule; bilinear without antialiasing, rounded to uint8
    (what mmsegmentation's cv2 resize does)."""
    shape = resized_shape(image.shape[-2], image.shape[-1], size)
    if shape == tuple(image.shape[-2:]):
        return image
    out = resize(image[None].float(), shape)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


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
                raise FileNotFoundError(f"{p}: folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            found += [(f, p) for f in files]
        elif p.is_file():
            found.append((p, p.parent))
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    return found
