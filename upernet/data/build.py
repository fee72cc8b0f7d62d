"""Open any dataset by its kind: the one table from `data.kind` to the function that opens it."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from .datasets import SegmentationDataset, ade20k, cityscapes, folder, voc
from .hf import hf
from .synthetic import SyntheticDataset


def synthetic(root: str | Path | None, split: str, transform: Callable | None = None, **options) -> SegmentationDataset:
    """The built-in synthetic scenes (`root` is unused)."""
    return SyntheticDataset(split=split, transform=transform, **options)


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "ade20k": ade20k, "cityscapes": cityscapes, "voc": voc, "folder": folder, "synthetic": synthetic,
    "hf": hf}
# Kinds whose root may also be a name (a Hugging Face Hub dataset) rather than a folder.
NAMED_ROOT_KINDS = {"hf"}


def build_dataset(kind: str, root: str | Path | None, split: str, transform: Callable | None = None,
                  channels: int = 3, **options: Any) -> SegmentationDataset:
    """Open a dataset by kind; `options` are the keyword arguments of that kind's function.

    Args:
        kind: "ade20k", "cityscapes", "voc", "folder", "synthetic" or "hf" (Hugging Face datasets).
        root: the dataset folder (unused by "synthetic"; for "hf" also a Hub dataset name).
        split: "train", "val", ... (see each kind).
        transform: callable (image, label) -> (image, label), e.g. `build_train_transform()`.
        channels: channels of the images, `model.in_channels`; other than 3 only for "folder".
        **options: voc: aug; folder: classes, palette, reduce_zero_label, img_dir, ann_dir,
            img_suffix, seg_suffix; synthetic: num_samples, image_size, seed; hf: classes, palette, reduce_zero_label,
            image_column, mask_column, revision; ade20k/cityscapes/voc/folder: verify.
    """
    if kind not in DATASETS:
        raise UserError(f"unknown dataset kind {kind!r}; use one of {', '.join(DATASETS)}")
    if kind == "synthetic":
        known = set(inspect.signature(SyntheticDataset).parameters) - {"split", "transform"}
    else:
        if root is None:
            raise UserError(f"dataset {kind!r} needs a root folder")
        if not Path(root).is_dir() and kind not in NAMED_ROOT_KINDS:
            raise UserError(f"dataset {kind!r}: root folder {root} does not exist")
        known = set(inspect.signature(DATASETS[kind]).parameters) - {"root", "split", "transform"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for dataset {kind!r}; known: {sorted(known)}")
    if channels != 3:
        if "channels" not in known:
            raise UserError(f"dataset {kind!r} has RGB images; model.in_channels={channels} needs data.kind=folder "
                            f"(grey or multi-band images)")
        options["channels"] = channels
    return DATASETS[kind](root, split, transform, **options)
