"""Segment image files: label map PNG (palette mode), colour overlay PNG, optional probabilities.

Images are decoded (and resized) in DataLoader workers so that file I/O overlaps the forward
passes. A file that cannot be read is reported and skipped; the others are still written, and
the caller gets the list of failures.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..data.classes import resolve_meta
from .prepare import prepare_for_inference
from .modes import (DEFAULT_CROP, DEFAULT_STRIDE, SizeRule, find_images, image_to_tensor, infer, load_image,
                        normalize, parse_size, resize_image)
from ..ops.resize import resize_in_stripes

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "data" / "assets" / "sample.png"
DEFAULT_SIZE = "2048x512"  # mmsegmentation's ADE20K / VOC test scale (keep ratio)
MAX_FULL_SIZE = 2 ** 27  # classes x pixels (512 MB of float32) held at once at the original size


@dataclass
class PredictResult:
    """What `predict` wrote and which inputs it could not read."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)  # one output stem per image: <stem>_labels.png, ...
    failures: list[tuple[Path, str]] = field(default_factory=list)


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes (EXIF applied) and resizes one image per item; a read error is returned, not raised."""

    def __init__(self, files: Sequence[Path], size: SizeRule):
        self.files = list(files)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            original = image_to_tensor(load_image(self.files[index]))
        except (FileNotFoundError, ValueError) as e:
            return {"index": index, "error": str(e)}
        return {"index": index, "original": original, "image": resize_image(original, self.size), "error": None}


def _output_stems(files: Sequence[tuple[Path, Path]], out_dir: Path) -> list[Path]:
    """out_dir/<sub folder>/<stem> per image, keeping folder structure; repeated names get -2, -3, ..."""
    stems, seen = [], set()
    for file, root in files:
        relative = file.relative_to(root).parent if file.is_relative_to(root) else Path()
        stem = out_dir / relative / file.stem
        candidate, n = stem, 1
        while candidate in seen:
            n += 1
            candidate = stem.with_name(f"{stem.name}-{n}")
        seen.add(candidate)
        stems.append(candidate)
    return stems


def save_label_png(labels: np.ndarray, palette: Sequence[Sequence[int]], path: Path) -> None:
    """Class indices as a palette-mode PNG: the pixel values are the classes, the colours the palette.

    More than 256 classes do not fit a palette; those maps are written as 16-bit grey PNGs.
    """
    if len(palette) > 256:
        Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [int(v) for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


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
    """The image blended with the colour map; with `class_names`, a legend of the largest classes present."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blend = ((1 - alpha) * image.astype(np.float32) + alpha * colours).round().clip(0, 255).astype(np.uint8)
    out = Image.fromarray(blend)
    if class_names is None:
        return out
    present, counts = np.unique(labels, return_counts=True)
    order = present[np.argsort(-counts, kind="stable")][:max_legend]
    font = _font(out.height)
    draw = ImageDraw.Draw(out, "RGBA")
    line = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 4
    width = max(int(draw.textlength(str(class_names[c]), font=font)) for c in order) + line + 10
    draw.rectangle((0, 0, width, line * len(order) + 6), fill=(0, 0, 0, 150))
    for row, c in enumerate(order):
        y = 3 + row * line
        draw.rectangle((4, y + 1, 4 + line - 4, y + line - 3), fill=tuple(int(v) for v in palette[c]))
        draw.text((line + 4, y), str(class_names[c]), fill=(255, 255, 255), font=font)
    return out


def _segment(model: nn.Module, image: torch.Tensor, size: tuple[int, int], probs_file: Path | None,
             max_full_size: int, **infer_args: Any) -> np.ndarray:
    """Label map (H, W) at the original `size`; with `probs_file`, the probabilities written there.

    Up to `max_full_size` classes x pixels, in mmsegmentation's order (each pass's logits resized
    to `size`, then the softmax). Beyond, the probabilities at the inference size are resized in
    stripes of rows (a 150-class 12-megapixel photo would need 7 GB at once), the labels and the
    float16 file filled stripe by stripe.
    """
    num_classes = int(model.num_classes)
    if num_classes * size[0] * size[1] <= max_full_size:
        probs = infer(model, image, out_size=size, **infer_args)[0].cpu()
        if probs_file is not None:
            np.save(probs_file, probs.to(torch.float16).numpy())
        return probs.argmax(dim=0).numpy()
    probs = infer(model, image, **infer_args).cpu()
    labels = np.empty(size, dtype=np.int64)
    store = None
    if probs_file is not None:
        store = np.lib.format.open_memmap(probs_file, mode="w+", dtype=np.float16, shape=(num_classes, *size))
    for rows, stripe in resize_in_stripes(probs, size):
        labels[rows] = stripe[0].argmax(dim=0).numpy()
        if store is not None:
            store[:, rows] = stripe[0].to(torch.float16).numpy()
    if store is not None:
        store.flush()
        del store
    return labels


def predict(
    model: nn.Module,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    mode: str | None = None,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    size: str | SizeRule = "meta",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    save_probs: bool = False,
    workers: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    legend: bool = True,
    progress: bool = True,
    max_full_size: int = MAX_FULL_SIZE,
) -> PredictResult:
    """Segment every image in `inputs` (files or folders) and write the results into `out_dir`.

    Per image: `<stem>_labels.png` (palette PNG of class indices at the image's size),
    `<stem>_overlay.png` (image blended with the colour map), and with `save_probs`
    `<stem>_probs.npy` (float16, C x H x W). Class names, palette and mean/std come from
    `model.meta`, with defaults for whatever it lacks.

    Args:
        model: segmentation model with `num_classes` (and `meta`, possibly empty).
        inputs: image files and folders (searched recursively for image suffixes).
        out_dir: output folder; created if needed; sub-folders of input folders are mirrored.
        mode: "whole" or "slide"; None takes `model.meta["inference"]["mode"]`, else "whole".
        crop_size: slide window (h, w); None takes the meta's, else 512x512.
        stride: slide step (h, w); None takes the meta's, else 341x341.
        size: resize rule ("none", "512", "2048x512", or a parsed rule); "meta" takes the meta's
            `test_size`, else 2048x512.
        scales: ratios for multi-scale inference (e.g. `inference.MS_RATIOS`).
        flip: also average the horizontally flipped prediction.
        save_probs: also write the probabilities.
        workers: DataLoader worker processes for decoding; None for min(2, CPUs).
        device: where the model runs; None for CUDA when available, else CPU.
        autocast_dtype: autocast dtype of the forward passes (e.g. torch.bfloat16), None for fp32.
        legend: draw a legend of the classes present on the overlay.
        progress: show a progress bar.
        max_full_size: classes x pixels of an image up to which its probabilities are computed at
            full size in one piece; larger images are resized after the softmax, in stripes.
    """
    from tqdm import tqdm

    if hasattr(model, "tasks"):  # a multi-task (UPP) model: one picture per task + the scene label
        from .multitask import predict_multitask

        return predict_multitask(model, inputs, out_dir, size="none" if size == "meta" else size, progress=progress)
    files = find_images(inputs)
    out_dir = Path(out_dir)
    meta = resolve_meta(getattr(model, "meta", {}), int(model.num_classes))
    settings = meta.get("inference", {})
    mode = mode or settings.get("mode", "whole")
    crop_size = tuple(crop_size or settings.get("crop_size", DEFAULT_CROP))
    stride = tuple(stride or settings.get("stride", DEFAULT_STRIDE))
    rule = parse_size(meta.get("test_size", DEFAULT_SIZE) if size == "meta" else size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    dtype = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"  # bf16: real bf16 weights, not autocast
    model = prepare_for_inference(model, dtype)  # folded BNs, Winograd head convs
    autocast_dtype = None if dtype == "bf16" else autocast_dtype
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = min(workers, len(files) - 1)  # one image: decoding in this process is faster than a worker
    loader = torch.utils.data.DataLoader(_ImageFiles([f for f, _ in files], rule), batch_size=None,
                                         num_workers=max(workers, 0), collate_fn=None)
    stems = _output_stems(files, out_dir)
    result = PredictResult(out_dir)
    bar = tqdm(loader, total=len(files), desc="predict", unit="img", disable=not progress)
    for item in bar:
        index = item["index"]
        if item["error"]:
            result.failures.append((files[index][0], item["error"]))
            bar.write(f"skipped: {item['error']}", file=sys.stderr)
            continue
        original = item["original"]
        image = normalize(item["image"], meta["mean"], meta["std"]).to(device)
        stem = stems[index]
        stem.parent.mkdir(parents=True, exist_ok=True)
        labels = _segment(model, image, tuple(original.shape[-2:]),
                          stem.with_name(stem.name + "_probs.npy") if save_probs else None, max_full_size,
                          mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip,
                          autocast_dtype=autocast_dtype)
        save_label_png(labels, meta["palette"], stem.with_name(stem.name + "_labels.png"))
        overlay = overlay_image(original.permute(1, 2, 0).numpy(), labels, meta["palette"],
                                meta["class_names"] if legend else None)
        overlay.save(stem.with_name(stem.name + "_overlay.png"))
        result.written.append(stem)
    return result
