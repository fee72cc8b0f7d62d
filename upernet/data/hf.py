"""Hugging Face `datasets` image-segmentation data: `data.kind: hf`.

`root` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a folder of
parquet files (as the Hub stores datasets), an `imagefolder` layout, or a Hub dataset name (which
needs the network). The image and mask columns are found by their `datasets.Image` type and
their names (`IMAGE_COLUMNS`, `MASK_COLUMNS`) or given as `image_column` / `mask_column`. Masks
must store class indices (colour masks: `upernet data convert` writes a folder of index PNGs).
Needs `pip install datasets`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from .datasets import SegmentationDataset, class_names
from .labels import mask_values
from .transforms import to_image_tensor

IMAGE_COLUMNS = ("image", "pixel_values", "img", "images", "input")
MASK_COLUMNS = ("annotation", "label", "labels", "mask", "masks", "segmentation", "semantic_segmentation",
                "segmentation_mask", "seg", "gt", "ground_truth", "target")
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def import_datasets():
    """The `datasets` package, or a one-line error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError("data.kind hf needs the Hugging Face datasets package: pip install datasets") from None
    return datasets


def load_hf_splits(source: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Every split of a saved folder, a parquet or imagefolder layout, or a Hub name: {split: Dataset}."""
    datasets = import_datasets()
    path = Path(source)
    if path.is_dir():
        if any((path / m).is_file() for m in SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif next(path.rglob("*.parquet"), None) is not None:
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif "/" in str(source) and not str(source).startswith((".", "/")) and str(source).count("/") == 1:
        loaded = datasets.load_dataset(str(source), revision=revision)  # a Hub name: needs the network
    else:
        raise UserError(f"hf dataset {source}: no such folder, and not a Hub dataset name (org/name)")
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def find_columns(data: Any, image_column: str | None = None, mask_column: str | None = None,
                 name: str = "hf dataset") -> tuple[str, str]:
    """(image column, mask column) of a `datasets.Dataset`: as given, else by type and name."""
    datasets = import_datasets()
    columns = list(data.features)
    for given, what in ((image_column, "image_column"), (mask_column, "mask_column")):
        if given is not None and given not in columns:
            raise UserError(f"{name}: no column {given!r} ({what}); its columns are {columns}")
    images = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]

    def pick(names: Sequence[str], exclude: str | None) -> str | None:
        for wanted in names:
            for column in images:
                if column.lower() == wanted and column != exclude:
                    return column
        return None

    image = image_column or pick(IMAGE_COLUMNS, mask_column) or (images[0] if images else None)
    mask = mask_column or pick(MASK_COLUMNS, image) or next((c for c in images if c != image), None)
    if image is None or mask is None or image == mask:
        raise UserError(f"{name}: cannot tell the image and mask columns apart (image columns {images}, all "
                        f"columns {columns}); give them, e.g. data.options.image_column=image "
                        f"data.options.mask_column=annotation")
    return image, mask


class HFDataset(SegmentationDataset):
    """One split of a Hugging Face dataset as a segmentation dataset; a few items are checked on open.

    Args:
        data: a `datasets.Dataset`.
        image_column: the column of images.
        mask_column: the column of masks (class indices per pixel).
        classes: class names, index order.
        palette: one RGB colour per class; default `default_palette`.
        transform: callable (image, label) -> (image, label); default: normalise only.
        reduce_zero_label: stored 0 means "unlabelled", every other value minus 1.
        name: how errors name this dataset.
    """

    def __init__(self, data: Any, image_column: str, mask_column: str, classes: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, transform: Callable | None = None,
                 reduce_zero_label: bool = False, name: str = "hf dataset"):
        super().__init__(classes, palette, transform, name=name)
        if len(data) == 0:
            raise UserError(f"{name}: the split is empty")
        self.data, self.image_column, self.mask_column = data, image_column, mask_column
        self.reduce_zero_label = reduce_zero_label
        stored: set[int] = set()
        for index in sorted(set(np.linspace(0, len(data) - 1, min(len(data), 4)).astype(int).tolist())):
            self.load(index)
            stored.update(np.unique(mask_values(data[index][mask_column])[1]).tolist())
        if stored and stored <= {0, self.ignore_index} and self.ignore_index in stored:
            raise UserError(f"{name}: the masks hold only 0 and {self.ignore_index}, and {self.ignore_index} is the "
                            f"ignore index, so every foreground pixel would be ignored; binary masks: convert them "
                            f"with `upernet data convert SOURCE OUT --layout hf` (0/255 -> 0/1, 2 classes)")

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        row = self.data[index]
        where = f"{self.name}[{index}]"
        image, mask = row[self.image_column], row[self.mask_column]
        if image is None or mask is None:
            raise UserError(f"{where}: no {'image' if image is None else 'mask'}; remove the row or fill it in")
        kind, raw = mask_values(mask)
        if kind == "rgb":
            raise UserError(f"{where}: the mask is colour-coded RGB; convert the dataset to a folder of index "
                            f"PNGs with `upernet data convert SOURCE OUT --layout hf` and train on OUT")
        if raw.shape != (image.height, image.width):
            raise UserError(f"{where}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but the image is "
                            f"{image.width}x{image.height}; a mask must cover its image pixel for pixel")
        label = self.stored_to_labels(raw, where)
        return to_image_tensor(image, self.channels), torch.from_numpy(label), where


def hf(root: str | Path, split: str, transform: Callable | None = None,
       classes: Sequence[str] | int | None = None, palette: Sequence[Sequence[int]] | None = None,
       reduce_zero_label: bool = False, image_column: str | None = None, mask_column: str | None = None,
       revision: str | None = None) -> HFDataset:
    """A Hugging Face image-segmentation dataset (`data.kind: hf`).

    Args:
        root: a `save_to_disk` folder, a parquet or imagefolder folder, or a Hub dataset name.
        split: the split name ("train", "validation", ...).
        transform: callable (image, label) -> (image, label).
        classes: class names in index order, or their number.
        palette: one RGB colour per class; default `default_palette`.
        reduce_zero_label: stored 0 means "unlabelled", every other value minus 1.
        image_column: the image column (default: found by type and name).
        mask_column: the mask column (default: found by type and name).
        revision: of a Hub name: branch, tag or commit.
    """
    name = f"hf {split} {root}"
    classes = class_names(classes, f"hf dataset {root}", f"or their number (`upernet data check {root}` suggests them)")
    splits = load_hf_splits(root, revision)
    if split not in splits:
        raise UserError(f"hf dataset {root}: no split {split!r}; it has {sorted(splits)}")
    data = splits[split]
    image, mask = find_columns(data, image_column, mask_column, name)
    return HFDataset(data, image, mask, classes, palette, transform, reduce_zero_label, name)
