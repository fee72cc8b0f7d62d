"""Segment image files: one loop over a `Segmenter`, and a writer per model kind.

Segmentation models: `<stem>_labels.png` (palette PNG of class indices), `<stem>_overlay.png`,
and with `save_probs` `<stem>_probs.npy`. Multi-task models: see `inference.multitask.write_multitask`.
Images are decoded and pre-processed in DataLoader workers so that file I/O overlaps the forward
passes. A file that cannot be read is skipped and returned among the failures; nothing is printed
here (the progress bar aside): the caller reports.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.synthetic import SYNTHETIC_CLASSES, write_synthetic_images
from ..io import temp_path
from .modes import find_images
from .multitask import write_multitask
from .segmenter import (DEFAULT_SIZE, MAX_FULL_SIZE, Preprocessor, Segmentation, Segmenter, is_multitask,  # noqa: F401
                        overlay_image, save_label_png, save_png)

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "data" / "assets" / "sample.png"


@dataclass
class PredictResult:
    """What `predict` wrote and which inputs it could not read."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)  # one output stem per image: <stem>_labels.png, ...
    failures: list[tuple[Path, str]] = field(default_factory=list)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and pre-processes one image per item; a read error is returned, not raised."""

    def __init__(self, files: Sequence[Path], preprocess: Preprocessor):
        self.files = list(files)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            original, image = self.preprocess(self.files[index])
        except (FileNotFoundError, ValueError) as e:
            return {"index": index, "error": str(e)}
        return {"index": index, "original": original, "image": image, "error": None}


def output_stems(files: Sequence[tuple[Path, Path]], out_dir: Path) -> list[Path]:
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


def write_segmentation(result: Segmentation, stem: Path, legend: bool = True) -> list[Path]:
    """`<stem>_labels.png` and `<stem>_overlay.png` (the probabilities are written during inference)."""
    labels, overlay = stem.with_name(stem.name + "_labels.png"), stem.with_name(stem.name + "_overlay.png")
    save_label_png(result.labels, result.palette, labels)
    save_png(result.overlay(legend=legend), overlay)
    return [labels, overlay]


def write_prediction(segmenter: Segmenter, original: torch.Tensor, image: torch.Tensor, stem: Path,
                     save_probs: bool = False, legend: bool = True) -> tuple[list[Path], list[int] | None]:
    """Segment one pre-processed image and write its outputs: the one per-image writer of
    `predict` and of the Ray engine (`inference.batch`), so both write the same bytes.

    Returns (the files written, the class indices present; None for multi-task models).
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    if segmenter.multitask:
        return write_multitask(segmenter.segment(original, image, probs=save_probs), stem, legend), None
    probs_path = stem.with_name(stem.name + "_probs.npy")
    tmp = temp_path(probs_path) if save_probs else None
    try:
        segmentation = segmenter.segment(original, image, probs_file=tmp)
        if tmp is not None:
            os.replace(tmp, probs_path)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    written = write_segmentation(segmentation, stem, legend) + ([probs_path] if save_probs else [])
    return written, [int(c) for c in np.unique(segmentation.labels)]


def default_inputs(model: Any, count: int = 4) -> list[Path]:
    """The images to segment when none are given: scenes of the model's own domain.

    A model of the built-in synthetic lake classes gets the first `count` built-in validation
    scenes (written once to a folder in the temp directory); any other model the built-in street
    sample image.
    """
    meta = getattr(model, "meta", None) or {}
    names = meta.get("tasks_meta", {}).get("objects") if is_multitask(model) else meta.get("class_names")
    if [str(n) for n in names or ()] != list(SYNTHETIC_CLASSES):
        return [SAMPLE_IMAGE]
    size = 128
    test_size = str(meta.get("test_size", "")).lower().split("x")
    if len(test_size) == 2 and test_size[0] == test_size[1] and test_size[0].isdigit():
        size = int(test_size[0])  # the square scenes the model was trained on
    folder = Path(tempfile.gettempdir()) / "upernet-samples" / f"synthetic-val-{size}"
    return write_synthetic_images(folder, "val", count, image_size=size)


def predict(
    model: nn.Module | Segmenter | str | os.PathLike,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    mode: str | None = None,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    size: str | int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    save_probs: bool = False,
    workers: int | None = None,
    device: str | torch.device | None = "auto",
    precision: str | torch.dtype | None = "auto",
    legend: bool = True,
    progress: bool = True,
    max_full_size: int = MAX_FULL_SIZE,
) -> PredictResult:
    """Segment every image in `inputs` (files or folders) and write the results into `out_dir`.

    Per image of a segmentation model: `<stem>_labels.png` (palette PNG of class indices at the
    image's size), `<stem>_overlay.png` (image blended with the colour map, legend beside it), and
    with `save_probs` `<stem>_probs.npy` (float16, C x H x W). Multi-task models: a label map and
    overlay per pixel task and `<stem>_labels.json` (`inference.multitask.write_multitask`).
    The test-time protocol (resize rule, normalisation, slide settings) is the model's meta unless
    an argument overrides it (see `Segmenter`).

    Args:
        model: a model, a `Segmenter` (then the inference options below are its own), or anything
            `Segmenter` loads (a path or registered name).
        inputs: image files and folders (searched recursively for image suffixes).
        out_dir: output folder; created if needed; sub-folders of input folders are mirrored.
        mode: "whole" or "slide"; None takes `model.meta["inference"]["mode"]`, else "whole".
        crop_size: slide window (h, w); None takes the meta's, else 512x512.
        stride: slide step (h, w); None takes the meta's, else 341x341.
        size: resize rule ("none", "512", "2048x512"); None (or "meta") takes the meta's `test_size`,
            else 2048x512.
        scales: ratios for multi-scale inference (e.g. `inference.MS_RATIOS`).
        flip: also average the horizontally flipped prediction.
        save_probs: also write the probabilities.
        workers: DataLoader worker processes for decoding; None for min(2, CPUs).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N"; None as "auto".
        precision: "auto", "fp32", "bf16", "fp16", or a torch autocast dtype (None: float32).
        legend: draw a legend of the classes present beside the overlay.
        progress: show a progress bar.
        max_full_size: classes x pixels of an image up to which its probabilities are computed at
            full size in one piece; larger images are resized after the softmax, in stripes.
    """
    from tqdm import tqdm

    if isinstance(model, Segmenter):
        segmenter = model
    else:
        segmenter = Segmenter(model, device=device, precision=precision, mode=mode,
                              size=None if size == "meta" else size, crop_size=crop_size, stride=stride,
                              scales=scales, flip=flip, max_full_size=max_full_size)
    files = find_images(inputs)
    out_dir = Path(out_dir)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = min(workers, len(files) - 1)  # one image: decoding in this process is faster than a worker
    loader = torch.utils.data.DataLoader(ImageFiles([f for f, _ in files], segmenter.preprocessor), batch_size=None,
                                         num_workers=max(workers, 0), collate_fn=None)
    stems = output_stems(files, out_dir)
    result = PredictResult(out_dir)
    for item in tqdm(loader, total=len(files), desc="predict", unit="img", disable=not progress):
        index = item["index"]
        if item["error"]:
            result.failures.append((files[index][0], item["error"]))
            continue
        write_prediction(segmenter, item["original"], item["image"], stems[index], save_probs, legend)
        result.written.append(stems[index])
    return result
