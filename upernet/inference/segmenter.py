"""`Segmenter`: a model and its test-time protocol behind one call.

    seg = upernet.Segmenter("runs/demo/model")       # any source `load_model` takes, a module, or a .onnx file
    result = seg("street.jpg")                       # a path, a PIL image, an (H, W, 3) uint8 array, or a list
    result.labels, result.areas(), result.overlay()  # labels at the image's size
    seg("street.jpg", output="pipeline")             # Hugging Face pipeline("image-segmentation") format

The protocol comes from `model.meta` unless an argument overrides it: the resize rule
(`test_size`), the normalisation (`mean`, `std`) and the inference settings (`inference`: mode,
crop_size, stride). Pre-processing is `data.transforms.preprocess`, the function eval uses, so a
label map here equals the prediction eval scores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..data.classes import IMAGENET_MEAN, IMAGENET_STD, default_palette, resolve_meta
from ..data.datasets import read_image
from ..data.transforms import SizeRule, normalize, parse_size, resize_image, to_image_tensor
from ..errors import UserError
from ..io import atomic_write
from ..loading import load_model
from ..models.multitask import part_map
from ..ops.resize import resize_in_stripes
from .modes import DEFAULT_CROP, DEFAULT_STRIDE, infer_outputs
from .probabilities import predicted_classes
from .prepare import autocast_dtype_for, prepare_for_inference

DEFAULT_SIZE = "2048x512"  # mmsegmentation's ADE20K / VOC test scale (keep ratio), for models whose meta has none
MAX_FULL_SIZE = 2 ** 27  # classes x pixels (512 MB of float32) held at once at the original size
PIXEL_TASKS = ("object", "part", "material")
IMAGE_TASKS = (("scene", "scenes"), ("texture", "textures"))

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


# ---- pictures -----------------------------------------------------------------------------------
def _font(height: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(10, height // 40))
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay_image(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    max_legend: int = 8,
) -> Image.Image:
    """The image blended with the colour map; with `class_names`, a legend of the largest classes
    present in a panel to the right of the picture (which stays whole, however small it is)."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blend = ((1 - alpha) * image.astype(np.float32) + alpha * colours).round().clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(blend)
    if class_names is None:
        return picture
    present, counts = np.unique(labels, return_counts=True)
    order = present[np.argsort(-counts, kind="stable")][:max_legend]
    font = _font(picture.height)
    measure = ImageDraw.Draw(picture)
    line = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 4
    width = max(int(measure.textlength(str(class_names[c]), font=font)) for c in order) + line + 12
    out = Image.new("RGB", (picture.width + width, max(picture.height, line * len(order) + 6)), (32, 32, 32))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    left = picture.width + 4
    for row, c in enumerate(order):
        y = 3 + row * line
        draw.rectangle((left, y + 1, left + line - 4, y + line - 3), fill=tuple(int(v) for v in palette[c]))
        draw.text((left + line, y), str(class_names[c]), fill=(255, 255, 255), font=font)
    return out


def label_image(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Class indices as a palette-mode image: the pixel values are the classes, the colours the palette.

    More than 256 classes do not fit a palette; those maps are 16-bit grey images.
    """
    if len(palette) > 256:
        return Image.fromarray(labels.astype(np.uint16))
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [int(v) for colour in palette for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def save_label_png(labels: np.ndarray, palette: Sequence[Sequence[int]], path: str | os.PathLike) -> None:
    """`label_image` written as a PNG (atomically)."""
    save_png(label_image(labels, palette), path)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a .npy file atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


# ---- results ------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """One image's segmentation: `labels` (H, W) int64 at the image's size, and what explains them."""

    labels: np.ndarray
    class_names: list[str]
    palette: list[list[int]]
    image: np.ndarray  # the input, uint8 (H, W, 3), for `overlay`
    probs: np.ndarray | None = None  # float32 (C, H, W) when asked for

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The image blended with the colour map, a legend of the largest classes beside it."""
        return overlay_image(self.image, self.labels, self.palette, self.class_names if legend else None, alpha)

    def areas(self) -> dict[str, float]:
        """Share of the pixels (0-1) of each class present, largest first."""
        present, counts = np.unique(self.labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[present[i]]: float(counts[i]) / self.labels.size for i in order}

    def to_pipeline(self) -> list[dict[str, Any]]:
        """Hugging Face `pipeline("image-segmentation")`'s semantic output: per class present (by
        index), {"score": None, "label": name, "mask": mode "L" image, 255 inside, 0 outside}."""
        return [{"score": None, "label": self.class_names[c],
                 "mask": Image.fromarray(((self.labels == c) * 255).astype(np.uint8), mode="L")}
                for c in np.unique(self.labels)]


@dataclass
class MultiTaskSegmentation:
    """A multi-task model's result: one `Segmentation` per pixel task (object, part, material) and
    the image-level labels (scene, texture) by task."""

    tasks: dict[str, Segmentation] = field(default_factory=dict)
    image_labels: dict[str, str] = field(default_factory=dict)
    image_top5: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # (class, probability), best first

    def to_pipeline(self) -> list[dict[str, Any]]:
        """The object task in the Hugging Face pipeline format (see `Segmentation.to_pipeline`)."""
        return self.tasks["object"].to_pipeline()


def display_picture(image: torch.Tensor) -> np.ndarray:
    """The (H, W, 3) uint8 picture overlays are drawn on: RGB as it is, a grey band repeated, the first
    three bands of a multi-band image (there is no one true colour rendering of those)."""
    bands = image.permute(1, 2, 0).numpy()
    if bands.shape[2] < 3:
        bands = np.repeat(bands[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(bands[:, :, :3])


# ---- the pre-processing a worker process can run ----------------------------------------------
@dataclass(frozen=True)
class Preprocessor:
    """Decode -> resize rule -> normalise; picklable, so that DataLoader workers can run it.

    Images get as many channels as `mean` has entries (the model's `in_channels`).
    """

    size: SizeRule
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def decode(self, image: ImageInput | torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) of a path or a file's bytes (`data.datasets.read_image`), a PIL image, an
        (H, W, C) array or tensor."""
        channels = len(self.mean)
        if isinstance(image, (str, os.PathLike, bytes)):
            return read_image(image, channels)
        if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
            return to_image_tensor(image, channels)
        raise UserError(f"cannot segment a {type(image).__name__}: give a path, a PIL image or an (H, W, 3) "
                        f"uint8 array")

    def __call__(self, image: ImageInput | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(original uint8 (C, H, W), normalised float32 (1, C, h, w) at the inference size)."""
        original = self.decode(image)
        return original, normalize(resize_image(original, self.size), self.mean, self.std)[None]


# ---- loading and devices ------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> CUDA when available, else CPU; a CUDA device without a GPU is a UserError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r}: this machine has no CUDA GPU that PyTorch can use; "
                        f"use device 'cpu' or 'auto'")
    return device


def load_source(source: str | os.PathLike | nn.Module) -> Any:
    """The model `source` names: a module (or `OnnxModel`) as it is, a .onnx file, or anything
    `upernet.loading.load_model` takes."""
    if not isinstance(source, (str, os.PathLike)):
        if not callable(source) or not hasattr(source, "num_classes") and not hasattr(source, "tasks"):
            raise UserError(f"cannot segment with a {type(source).__name__}: give a model, a path or a name")
        return source
    if Path(source).suffix == ".onnx" and Path(source).is_file():
        from .export import OnnxModel

        return OnnxModel(source)
    return load_model(source)


def is_multitask(model: Any) -> bool:
    """True for the multi-task model: several outputs by task."""
    return hasattr(model, "tasks")


def multitask_names(model: Any) -> dict[str, list[str]]:
    """Class names of each task of a multi-task model (its `meta["tasks_meta"]`, else the indices)."""
    meta = (getattr(model, "meta", None) or {}).get("tasks_meta", {})
    layout = model.tasks.get("part")
    parts = ["(none)"] + [f"{obj}:{p}" for obj, names in meta.get("parts", {}).items() for p in names]
    names = {"object": meta.get("objects"), "material": meta.get("materials"),
             "part": parts if len(parts) > 1 else None, "scene": meta.get("scenes"), "texture": meta.get("textures")}
    sizes = {task: (1 + sum(layout["num_parts"]) if task == "part" else int(n))
             for task, n in model.tasks.items() if task != "part" or layout}
    return {task: [str(n) for n in names[task]] if names.get(task) and len(names[task]) >= sizes[task]
            else [str(i) for i in range(sizes[task])] for task in sizes}


class Segmenter:
    """A model and its test-time protocol; call it on images.

    Args:
        source: a registered name, model folder, Hugging Face folder, training checkpoint, run
            folder, foreign checkpoint (anything `load_model` takes), a .onnx file of `upernet
            export`, or a built model.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bf16 where the hardware runs it natively), "fp32", "bf16", "fp16", or a
            torch dtype to autocast to (None: float32).
        mode: "whole" or "slide"; None: the model's `meta["inference"]["mode"]`, else "whole".
        size: resize rule ("none", "512", "2048x512", 512, (2048, 512)); None: the model's
            `meta["test_size"]`, else 2048x512 (multi-task models: no resize).
        crop_size: slide window (h, w); None: the meta's, else 512x512.
        stride: slide step (h, w); None: the meta's, else 341x341.
        scales: ratios for multi-scale inference (e.g. `inference.MS_RATIOS`).
        flip: also average the horizontally flipped prediction.
        max_full_size: classes x pixels up to which probabilities are computed at the image's size
            in one piece; larger images are resized after the softmax, in stripes of rows.
    """

    def __init__(
        self,
        source: str | os.PathLike | nn.Module,
        device: str | torch.device | None = "auto",
        precision: str | torch.dtype | None = "auto",
        mode: str | None = None,
        size: str | int | Sequence[int] | None = None,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        max_full_size: int = MAX_FULL_SIZE,
    ):
        model = load_source(source)
        onnx = not isinstance(model, nn.Module)
        self.device = torch.device("cpu") if onnx and device in (None, "auto") else resolve_device(device)
        self.model = model.to(self.device)
        self.multitask = is_multitask(model)
        raw = dict(getattr(model, "meta", None) or {})
        if self.multitask:
            self.names = multitask_names(model)
            self.meta = {**raw, "mean": raw.get("mean", list(IMAGENET_MEAN)), "std": raw.get("std", list(IMAGENET_STD))}
        else:
            self.meta = resolve_meta(raw, predicted_classes(model))
        settings = self.meta.get("inference") or {}
        self.mode = mode or settings.get("mode", "whole")
        if self.mode not in ("whole", "slide"):
            raise UserError(f"mode {self.mode!r}: use 'whole' or 'slide'")
        self.crop_size = tuple(crop_size or settings.get("crop_size") or DEFAULT_CROP)
        self.stride = tuple(stride or settings.get("stride") or DEFAULT_STRIDE)
        default = self.meta.get("test_size", "none" if self.multitask else DEFAULT_SIZE)
        self.size = parse_size(size if size is not None else default)
        self.scales, self.flip, self.max_full_size = tuple(scales), flip, max_full_size
        if isinstance(precision, str):
            dtype = autocast_dtype_for(precision, self.device)
        else:
            dtype = precision
        # folded BNs, Winograd head convs; bf16 as real bf16 weights rather than autocast
        self.runner = prepare_for_inference(self.model, "bf16" if dtype == torch.bfloat16 else "fp32")
        self.autocast_dtype = None if dtype == torch.bfloat16 else dtype
        channels = int(getattr(model, "in_channels", len(self.meta["mean"])))
        if not len(self.meta["mean"]) == len(self.meta["std"]) == channels:
            raise UserError(f"the model takes {channels} input channel(s) but its normalisation has mean "
                            f"{list(self.meta['mean'])} and std {list(self.meta['std'])}: set model.meta['mean'] "
                            f"and ['std'] to one value per channel (training with data.mean/data.std does)")
        self.preprocessor = Preprocessor(self.size, tuple(self.meta["mean"]), tuple(self.meta["std"]))

    @property
    def class_names(self) -> list[str]:
        """Class names (multi-task models: the object task's)."""
        return self.names["object"] if self.multitask else list(self.meta["class_names"])

    def __call__(self, image: ImageInput | Sequence[ImageInput], probs: bool = False, output: str = "result"):
        """Segment one image (a path, a PIL image, an (H, W, 3) uint8 array) or a list of them.

        Args:
            image: the image, or a list of images (then a list of results is returned).
            probs: also return the probabilities (float32 (C, H, W), `result.probs`).
            output: "result" (a `Segmentation`, or `MultiTaskSegmentation`) or "pipeline" (the Hugging
                Face image-segmentation format, see `Segmentation.to_pipeline`).
        """
        if output not in ("result", "pipeline"):
            raise UserError(f"output {output!r}: use 'result' or 'pipeline'")
        if isinstance(image, (list, tuple)):
            return [self(item, probs, output) for item in image]
        result = self.segment(*self.preprocessor(image), probs=probs)
        return result.to_pipeline() if output == "pipeline" else result

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `inference.modes.infer_outputs` this segmenter runs with."""
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride, "scales": self.scales,
                "flip": self.flip, "autocast_dtype": self.autocast_dtype}

    @torch.no_grad()
    def segment(self, original: torch.Tensor, image: torch.Tensor, probs: bool = False,
                probs_file: str | os.PathLike | None = None) -> Segmentation | MultiTaskSegmentation:
        """The result for a pre-processed image (see `Preprocessor`), labels at `original`'s size.

        Args:
            original: the decoded image, uint8 (C, H, W).
            image: the normalised image at the inference size, float (1, C, h, w).
            probs: keep the probabilities in the result.
            probs_file: also write them there as float16 (C, H, W) .npy (memory-bounded for large images).
        """
        picture = display_picture(original)
        if self.multitask:
            return self._multitask(picture, image, probs)
        size = tuple(original.shape[-2:])
        num_classes = predicted_classes(self.model)
        x = image.to(self.device)
        kept = None
        if num_classes * size[0] * size[1] <= self.max_full_size:
            p = infer_outputs(self.runner, x, out_size=size, **self.options())["out"][0].cpu()
            labels = p.argmax(dim=0).numpy()
            if probs_file is not None:
                with open(probs_file, "wb") as f:
                    np.save(f, p.to(torch.float16).numpy())
            kept = p.numpy() if probs else None
        else:  # probabilities at the inference size, resized in stripes of rows (a 150-class photo: GBs)
            p = infer_outputs(self.runner, x, **self.options())["out"].cpu()
            labels = np.empty(size, dtype=np.int64)
            store = (np.lib.format.open_memmap(probs_file, mode="w+", dtype=np.float16, shape=(num_classes, *size))
                     if probs_file is not None else None)
            kept = np.empty((num_classes, *size), dtype=np.float32) if probs else None
            for rows, stripe in resize_in_stripes(p, size):
                labels[rows] = stripe[0].argmax(dim=0).numpy()
                if store is not None:
                    store[:, rows] = stripe[0].to(torch.float16).numpy()
                if kept is not None:
                    kept[:, rows] = stripe[0].numpy()
            if store is not None:
                store.flush()
                del store
        return Segmentation(labels, list(self.meta["class_names"]), [list(c) for c in self.meta["palette"]],
                            picture, kept)

    def _multitask(self, picture: np.ndarray, image: torch.Tensor, probs: bool) -> MultiTaskSegmentation:
        outputs = infer_outputs(self.runner, image.to(self.device), out_size=picture.shape[:2], **self.options())
        outputs = {task: value.cpu() for task, value in outputs.items()}
        maps = {task: outputs[task].argmax(1) for task in ("object", "material") if task in outputs}
        if "part" in outputs and "object" in maps:
            maps["part"] = part_map(outputs["part"], maps["object"], self.model.tasks["part"])
        result = MultiTaskSegmentation()
        for task in PIXEL_TASKS:
            if task in maps:
                names = self.names[task]
                kept = outputs[task][0].numpy() if probs and task != "part" else None  # part: per-object groups
                result.tasks[task] = Segmentation(maps[task][0].numpy(), names, default_palette(len(names)), picture,
                                                  kept)
        for task, _ in IMAGE_TASKS:
            if task in outputs:
                result.image_labels[task] = self.names[task][int(outputs[task].argmax(1)[0])]
                probs, best = outputs[task][0].float().softmax(0).topk(min(5, outputs[task].shape[1]))
                result.image_top5[task] = [(self.names[task][int(c)], float(p)) for p, c in zip(probs, best)]
        return result
