"""Paired image/mask transforms with mmsegmentation's training and test semantics.

Training (the published UPerNet recipes): RandomResize (keep ratio, ratio range 0.5-2.0) ->
RandomCrop (`cat_max_ratio`, up to 10 tries) -> RandomFlip -> PhotoMetricDistortion ->
Normalize -> pad to the crop size (image 0 after normalisation, mask 255). Test time (eval,
predict and `Segmenter` alike, one function: `preprocess`): decode -> resize rule -> normalise; the
label stays at its original size, the metric is computed there.

Images are uint8 tensors (C, H, W) between steps (C = 3, or `model.in_channels`: as many as the
normalisation's mean has entries), masks int64 `tv_tensors.Mask` (1, H, W), so
torchvision.transforms.v2 resizes masks with nearest. Every random draw comes from the
`generator` passed to `__call__`, or from the global torch RNG when it is None; in DataLoader
workers that RNG is seeded from the loader's base seed, so restoring the loader's generator
restores the augmentations.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..config import ConfigNote
from ..errors import UserError
from ..ops.resize import resize
from .classes import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255

# A resize rule: None (keep the size), an int (short side), or (a, b) (keep ratio: long side <= max,
# short side <= min, mmsegmentation's `Resize(scale=(2048, 512), keep_ratio=True)`).
SizeRule = Union[None, int, tuple[int, int]]
# PIL modes of 16/32-bit grey images: their values are on 0..65535, not 0..255.
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# ---- conversions --------------------------------------------------------------------------------
# Said once per process (`note_once`), not once per image.
NOTES_GIVEN: set[str] = set()
ALPHA_NOTE = ("the images have an alpha channel, which is dropped (the model takes {channels} channel(s); "
              "set model.in_channels=4 to keep RGBA as 4 bands)")


def note_once(message: str) -> None:
    """A `ConfigNote` the first time `message` comes up in this process (the CLI prints it as one line)."""
    if message not in NOTES_GIVEN:
        NOTES_GIVEN.add(message)
        warnings.warn(message, ConfigNote, stacklevel=3)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit values of an integer array: uint8 as it is, 16-bit (0..65535) scaled to 0..255, rounded
    (65535 -> 255, 257 -> 1). Floats have no agreed range and are refused."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"a {values.dtype} image has no known value range; save it as an 8- or 16-bit image")
    wide = values.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise UserError(f"a {values.dtype} image with values {wide.min()}..{wide.max()} outside 0..65535; "
                        f"save it as an 8- or 16-bit image")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def image_bands(image: Image.Image | np.ndarray) -> np.ndarray:
    """The uint8 (H, W, C) bands of a decoded image, all it stores: grey 1, grey+alpha 2, RGB 3,
    RGBA 4, multi-band arrays C. 16-bit values are scaled to 8 bits (`to_uint8`); palette, CMYK and
    other colour modes become RGB. PIL's own `convert("RGB")` would clip 16-bit values at 255,
    which turns nearly every pixel white. Float images (mode F) are refused."""
    if isinstance(image, Image.Image):
        if image.mode == "F":
            raise UserError("a floating-point (mode F) image has no known value range; save it as an 8- or 16-bit "
                            "image")
        if image.mode in WIDE_GREY_MODES:
            image = np.asarray(image)
        elif image.mode == "1":
            image = np.asarray(image.convert("L"))
        elif image.mode == "PA":
            image = np.asarray(image.convert("RGBA"))
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = np.asarray(image.convert("RGB"))
        else:
            image = np.asarray(image)
    bands = to_uint8(np.asarray(image))
    if bands.ndim == 2:
        bands = bands[:, :, None]
    if bands.ndim != 3:
        raise UserError(f"expected an (H, W) or (H, W, C) image, got shape {bands.shape}")
    return bands


def select_channels(bands: np.ndarray, channels: int = 3) -> np.ndarray:
    """(H, W, C) bands -> (H, W, `channels`): grey repeated to RGB, an alpha channel dropped (said once);
    any other difference is a UserError naming `model.in_channels`."""
    stored = bands.shape[2]
    if stored == channels:
        return bands
    if (stored == 2 and channels in (1, 3)) or (stored == 4 and channels == 3):  # grey+alpha, RGBA
        note_once(ALPHA_NOTE.format(channels=channels))
        bands = bands[:, :, :stored - 1]
        stored -= 1
    if stored == 1 and channels == 3:
        return np.repeat(bands, 3, axis=2)
    if stored == channels:
        return bands
    kind = {1: "a grey", 3: "an RGB"}.get(stored, f"a {stored}-band")
    raise UserError(f"{kind} image, but the model takes {channels} channel(s) (model.in_channels={channels}); "
                    f"use images with {channels} band(s) or a model built with in_channels={stored}")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB PIL image (see `image_bands`: 16-bit grey scaled from 0..65535 to 0..255, alpha dropped)."""
    if image.mode == "RGB":
        return image
    return Image.fromarray(np.ascontiguousarray(select_channels(image_bands(image), 3)), mode="RGB")


def to_image_tensor(image: Image.Image | np.ndarray | torch.Tensor, channels: int = 3) -> torch.Tensor:
    """A uint8 (channels, H, W) tensor from a PIL image or an (H, W) / (H, W, C) array (`image_bands`,
    `select_channels`), or a (channels, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != channels:
            raise UserError(f"expected a ({channels}, H, W) image tensor, got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise UserError(f"expected a uint8 image tensor (0-255), got {image.dtype}")
        return image.as_subclass(torch.Tensor)
    if isinstance(image, np.ndarray) and image.dtype.kind not in "uib":
        raise UserError(f"expected a uint8 image array (0-255), got {image.dtype}")
    if isinstance(image, (Image.Image, np.ndarray)):
        bands = select_channels(image_bands(image), channels)
        return torch.from_numpy(np.require(bands, requirements=["C", "W"])).permute(2, 0, 1).contiguous()
    raise TypeError(f"unsupported image type {type(image).__name__}")


def to_mask(mask: Image.Image | np.ndarray | torch.Tensor) -> tv_tensors.Mask:
    """An int64 (1, H, W) `tv_tensors.Mask` from a PIL image, an (H, W) array or tensor."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask.astype(np.int64, copy=False))
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise UserError(f"expected an (H, W) mask, got shape {tuple(mask.shape)}")
    return tv_tensors.Mask(mask.long().unsqueeze(0))


# ---- test-time pre-processing (eval, predict, Segmenter) -------------------------------------
def parse_size(text: str | int | Sequence[int] | None) -> SizeRule:
    """A size value -> resize rule: None/"none", 512 or "512" (short side), (2048, 512) or "2048x512" (keep ratio)."""
    error = UserError(f"size {text!r}: use 'none', a short side like '512' or a keep-ratio scale like '2048x512'")
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
    """Resize a uint8 (3, H, W) image by a resize rule: bilinear without antialiasing on float values,
    rounded to uint8. Of the resizes at hand this is the closest to mmsegmentation's cv2 INTER_LINEAR
    on uint8 (1 off on ~12% of values, where torchvision's uint8 kernel is 1 off on ~22%)."""
    shape = resized_shape(image.shape[-2], image.shape[-1], size)
    if shape == tuple(image.shape[-2:]):
        return image
    out = resize(image[None].float(), shape)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def preprocess(image: Image.Image | np.ndarray | torch.Tensor, size: SizeRule,
               mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The one test-time pre-processing: decoded image -> resize rule -> normalised float32 (C, h, w),
    C = len(mean) channels."""
    return normalize(resize_image(to_image_tensor(image, len(mean)), size), mean, std)


# ---- steps, in pipeline order -----------------------------------------------------------------
def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio size: the largest (H, W) whose long side <= max(scale), short <= min(scale)."""
    return resized_shape(height, width, tuple(scale))


def resize_pair(image: torch.Tensor, mask: tv_tensors.Mask | None, size: tuple[int, int]):
    """Bilinear (no antialias, as cv2 INTER_LINEAR) for the image, nearest for the mask."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=False)
        if mask is not None:
            mask = TF.resize(mask, list(size))
    return image, mask


def random_resize(image, mask, scale: Sequence[int], ratio_range: Sequence[float], generator=None):
    """RandomResize: scale (long, short) multiplied by a ratio uniform in `ratio_range`, keep ratio."""
    ratio = ratio_range[0] + torch.rand((), generator=generator).item() * (ratio_range[1] - ratio_range[0])
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize_pair(image, mask, rescale_size(*image.shape[-2:], target))


def random_crop(image, mask, crop_size: Sequence[int], cat_max_ratio: float = 1.0,
                ignore_index: int = IGNORE_INDEX, generator=None):
    """RandomCrop of at most `crop_size` (H, W); with `cat_max_ratio` < 1 retried up to 10 times.

    A crop is accepted when it holds at least two classes (ignoring `ignore_index`) and the most
    frequent one covers less than `cat_max_ratio` of the labelled pixels; after 10 refusals the
    next random crop is used unchecked (mmsegmentation's rule).
    """
    height, width = image.shape[-2:]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int]:
        top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
        return top, left

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = mask[..., top:top + crop_h, left:left + crop_w].flatten()
            counts = torch.bincount(window[window != ignore_index])
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            top, left = draw()
    return TF.crop(image, top, left, crop_h, crop_w), TF.crop(mask, top, left, crop_h, crop_w)


def random_flip(image, mask, prob: float = 0.5, generator=None):
    """Horizontal flip of both with probability `prob`."""
    if torch.rand((), generator=generator).item() < prob:
        return TF.horizontal_flip(image), TF.horizontal_flip(mask)
    return image, mask


def _coin(generator) -> bool:
    return bool(torch.randint(0, 2, (), generator=generator))


def _uniform(low: float, high: float, generator) -> float:
    return low + torch.rand((), generator=generator).item() * (high - low)


def _affine(image: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """image * alpha + beta, clipped and truncated to uint8 as mmsegmentation's `convert`."""
    return (image.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)


def _scale_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply HSV saturation by `alpha` (clipped at 1), keeping hue and value.

    With hue and value fixed every channel is V - (V - c) * S'/S, so the HSV round trip reduces to
    one factor per pixel: `alpha`, or V / (V - min) where the saturation would pass 1.
    """
    x = image.float()
    value = x.amax(0, keepdim=True)
    spread = value - x.amin(0, keepdim=True)
    limit = torch.where(spread > 0, value / spread.clamp(min=1e-6), torch.full_like(spread, alpha))
    factor = torch.minimum(torch.full_like(limit, alpha), limit)
    return (value - (value - x) * factor).clamp_(0, 255).to(torch.uint8)


def photometric_distortion(image: torch.Tensor, brightness_delta: int = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18,
                           generator=None) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion: each step applied with probability 1/2.

    Order: brightness (+delta), then contrast (x alpha) either second or last (a coin decides),
    saturation (x alpha in HSV), hue (+delta on OpenCV's 0-180 uint8 hue scale, i.e. +-36 degrees).
    Images of other than 3 channels get brightness and contrast only (same random draws).
    """
    if _coin(generator):
        image = _affine(image, beta=_uniform(-brightness_delta, brightness_delta, generator))
    contrast_first = _coin(generator)

    def contrast(img):
        if _coin(generator):
            return _affine(img, alpha=_uniform(*contrast_range, generator))
        return img

    if contrast_first:
        image = contrast(image)
    colour = image.shape[-3] == 3  # saturation and hue mean nothing for grey or multi-band images
    if _coin(generator):
        alpha = _uniform(*saturation_range, generator)
        image = _scale_saturation(image, alpha) if colour else image
    if _coin(generator):
        shift = int(torch.randint(-hue_delta, hue_delta + 1, (), generator=generator))
        image = TF.adjust_hue(image, shift / 180.0) if colour else image
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(image - mean) / std per channel, with mean/std on the 0-255 scale; returns float32."""
    if not len(mean) == len(std) == image.shape[-3]:
        raise UserError(f"normalisation mean {list(mean)} / std {list(std)} for a {image.shape[-3]}-channel image: "
                        f"give one value per channel (data.mean, data.std)")
    return TF.normalize(image.float(), list(mean), list(std))


def pad_pair(image: torch.Tensor, mask, size: Sequence[int], ignore_index: int = IGNORE_INDEX):
    """Pad bottom/right to at least `size` (H, W): image with 0, mask with `ignore_index`."""
    pad_h, pad_w = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    if pad_h or pad_w:
        image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
        mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=ignore_index)
    return image, mask


# ---- pipelines ------------------------------------------------------------------------------------
class TrainTransform:
    """The training pipeline of the published recipes; see `build_train_transform`."""

    def __init__(self, crop_size: Sequence[int] | None, scale: Sequence[int] | None,
                 ratio_range: Sequence[float] | None, cat_max_ratio: float, flip_prob: float,
                 photometric: bool, mean: Sequence[float], std: Sequence[float],
                 ignore_index: int = IGNORE_INDEX):
        self.crop_size = tuple(crop_size) if crop_size else None
        self.scale = tuple(scale) if scale else None
        self.ratio_range = tuple(ratio_range) if ratio_range else (1.0, 1.0)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __call__(self, image, mask, generator: torch.Generator | None = None):
        """(image, mask) -> (float32 (3, h, w) normalised image, int64 (h, w) label)."""
        image, mask = to_image_tensor(image, len(self.mean)), to_mask(mask)
        if image.shape[-2:] != mask.shape[-2:]:
            raise UserError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} sizes differ")
        if self.scale:
            image, mask = random_resize(image, mask, self.scale, self.ratio_range, generator)
        if self.crop_size:
            image, mask = random_crop(image, mask, self.crop_size, self.cat_max_ratio, self.ignore_index, generator)
        if self.flip_prob > 0:
            image, mask = random_flip(image, mask, self.flip_prob, generator)
        if self.photometric:
            image = photometric_distortion(image, generator=generator)
        image = normalize(image, self.mean, self.std)
        if self.crop_size:
            image, mask = pad_pair(image, mask, self.crop_size, self.ignore_index)
        return image, mask.as_subclass(torch.Tensor)[0]

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric})")


class EvalTransform:
    """`preprocess` of the image (resize rule, normalisation); the label keeps its original size."""

    def __init__(self, scale: SizeRule, mean: Sequence[float], std: Sequence[float]):
        self.scale = scale
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, mask=None, generator: torch.Generator | None = None):
        """(image, mask) -> (float32 (3, h, w) normalised image, int64 (H, W) label at original size).

        `mask` may be None (prediction without labels); the second output is then None.
        """
        label = None if mask is None else to_mask(mask).as_subclass(torch.Tensor)[0]
        return preprocess(image, self.scale, self.mean, self.std), label

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale})"


def build_train_transform(
    crop_size: Sequence[int] | None = (512, 512),
    scale: Sequence[int] | None = (2048, 512),
    ratio_range: Sequence[float] | None = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> TrainTransform:
    """The mmsegmentation training pipeline as one callable `(image, mask, generator=None)`.

    Args:
        crop_size: (H, W) of the random crop and of the padded output; None keeps the whole image.
        scale: (long, short) base scale of RandomResize; None skips resizing.
        ratio_range: range of the uniform factor applied to `scale`; None means exactly `scale`.
        cat_max_ratio: largest share one class may take of an accepted crop (1.0 disables retries).
        flip_prob: probability of a horizontal flip.
        photometric: apply PhotoMetricDistortion.
        mean: per-channel mean on the 0-255 scale (RGB).
        std: per-channel std on the 0-255 scale (RGB).
        ignore_index: label of unlabelled pixels, also the mask padding value.
    """
    if crop_size is not None and len(crop_size) != 2:
        raise UserError(f"crop_size must be (H, W), got {crop_size}")
    if scale is not None and len(scale) != 2:
        raise UserError(f"scale must be (long, short), got {scale}")
    return TrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric, mean, std, ignore_index)


def build_eval_transform(
    scale: str | int | Sequence[int] | None = (2048, 512),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> EvalTransform:
    """The mmsegmentation test pipeline (`preprocess`): resize rule on the image, label at original size.

    Args:
        scale: resize rule (see `parse_size`): (long, short) keep-ratio bound, a short side, "2048x512",
            or None to keep the image size.
        mean: per-channel mean on the 0-255 scale (RGB).
        std: per-channel std on the 0-255 scale (RGB).
    """
    return EvalTransform(parse_size(scale), mean, std)
