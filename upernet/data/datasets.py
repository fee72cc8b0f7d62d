"""Segmentation datasets in their standard layouts, checked when they are opened.

`build_dataset(kind, root, split, transform, **options)` opens ADE20K, Cityscapes, Pascal VOC
2012 (optionally with the SBD "aug" masks), a generic folder of images and masks, or the built-in
synthetic scenes. Every item is a dict {"image": float32 (3, h, w) normalised, "label": int64
(h, w) with 255 = ignore, "path": str}.

Checks, each a ValueError naming the file(s) and the fix: image without mask and mask without
image, an empty split (always, when the dataset is opened); unreadable or truncated files, mask
size different from the image's, colour (RGB) masks where class indices are expected, label values
that are neither a class nor the ignore index (on open for small datasets or a sample of big ones,
and for every item when it is loaded). EXIF orientation is applied to images, never to masks.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import MissingFile, UserError
from .classes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, VOC_CLASSES,
                      VOC_PALETTE, default_palette)
from .transforms import IGNORE_INDEX, build_eval_transform, to_image_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Single-channel modes whose pixel values are class indices ("P": the palette only colours them).
INDEX_MODES = ("L", "P", "I", "I;16", "1")
EXIF_ORIENTATION = 0x0112
MAX_LISTED = 10


def _listing(items: Sequence[Any], limit: int = MAX_LISTED) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


# ---- reading files ------------------------------------------------------------------------------
def _open(path: Path | BinaryIO, what: str, name: str | None = None) -> Image.Image:
    """Open lazily (header only); unreadable files become a ValueError naming the path (or `name`)."""
    shown = name or path
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise MissingFile(f"{what} {shown} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise UserError(f"{what} {shown} cannot be read as an image ({err}); re-export or remove it") from None


def _decode(img: Image.Image, path: Path | str, what: str) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{what} {path} is truncated or corrupt ({err}); re-download or remove it") from None


def _check_mask_mode(img: Image.Image, path: Path) -> None:
    if img.mode not in INDEX_MODES:
        raise UserError(
            f"mask {path} is a {img.mode} image, but masks must hold one class index per pixel (a "
            f"single-channel PNG, mode L or P, values 0..num_classes-1 and 255 = ignore). If it is "
            f"colour-coded, convert it with upernet.data.colour_mask_to_index(mask, palette) and save "
            f"the result as a single-channel PNG; if its channels are equal, save it with .convert('L').")


def is_tiff(path: str | Path) -> bool:
    """TIFFs are read with tifffile: PIL reads neither multi-band nor 16-bit RGB TIFFs (it truncates the latter)."""
    return Path(path).suffix.lower() in (".tif", ".tiff")


def _read_tiff(path: Path | BinaryIO, header_only: bool = False, name: str | None = None
               ) -> np.ndarray | tuple[int, int]:
    """The (H, W) or (H, W, C) array of a TIFF's first image (planar band order moved last), or its (H, W).
    `path` may be an open binary file; errors call it `name` (default: the path)."""
    import tifffile

    shown = name or str(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            if header_only:
                return series.shape[axes.index("Y")], series.shape[axes.index("X")]
            array = series.asarray()
    except FileNotFoundError:
        raise MissingFile(f"image {path} does not exist") from None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
        raise UserError(f"image {shown} cannot be read as a TIFF ({err}); re-export or remove it") from None
    # Rows, columns, then whatever axis is left: the bands (S: samples per pixel; C, Q, I: bands stored
    # as planes or pages). Axes of length 1 are dropped.
    others = [i for i, name in enumerate(axes) if name not in "YX" and array.shape[i] > 1]
    if "Y" not in axes or "X" not in axes or len(others) > 1:
        raise UserError(f"image {shown}: a TIFF with axes {axes} (shape {series.shape}); expected one image of "
                        f"rows x columns (x bands)")
    array = np.transpose(array, [axes.index("Y"), axes.index("X"), *others,
                                 *[i for i, name in enumerate(axes) if name not in "YX" and i not in others]])
    return array.reshape(array.shape[:2] + array.shape[2:3]) if others else array.reshape(array.shape[:2])


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little/big endian, classic/BigTIFF


def is_tiff_data(data: bytes) -> bool:
    """True when a file's bytes (an upload, which has no name to go by) start like a TIFF."""
    return data[:4] in TIFF_SIGNATURES


def decode_tiff(data: bytes, header_only: bool = False, name: str = "upload") -> np.ndarray | tuple[int, int]:
    """`read_image`'s TIFF reader on a file's bytes: the (H, W) or (H, W, C) array, or only its (H, W).

    Args:
        data: the TIFF file's bytes.
        header_only: return (H, W) without decoding the pixels.
        name: what error messages call the file.
    """
    return _read_tiff(io.BytesIO(data), header_only, name)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image as displayed (EXIF orientation applied), from its header only."""
    if is_tiff(path):
        return _read_tiff(Path(path), header_only=True)
    with _open(Path(path), "image") as img:
        width, height = img.size
        if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def mask_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of a mask from its header only, after checking that it stores indices."""
    with _open(Path(path), "mask") as img:
        _check_mask_mode(img, Path(path))
        width, height = img.size
    return height, width


def read_image(path: str | Path | bytes, channels: int = 3, name: str | None = None) -> torch.Tensor:
    """An image file as a uint8 (channels, H, W) tensor: the one reader of training, eval, predict.

    PIL formats get their EXIF orientation applied; TIFFs are read with tifffile (any number of bands,
    8 or 16 bits; orientation tags are not applied). 16-bit values are scaled to 8 bits (0..65535 ->
    0..255); grey becomes RGB when 3 channels are wanted, an alpha channel is dropped (said once);
    see `transforms.select_channels`.

    Args:
        path: the image file, or its bytes (read from a URI or an upload).
        channels: the channels the model takes (`model.in_channels`).
        name: what messages call the image (default: the path; "image bytes" for bytes).
    """
    if isinstance(path, bytes):
        shown = name or "image bytes"
        tiff, source = is_tiff_data(path), io.BytesIO(path)
    else:
        path = Path(path)
        shown, tiff, source = name or str(path), is_tiff(path), path
    try:
        if tiff:
            return to_image_tensor(_read_tiff(source, name=shown), channels)
        with _open(source, "image", shown) as img:
            _decode(img, shown, "image")
            return to_image_tensor(ImageOps.exif_transpose(img), channels)
    except UserError as err:
        if shown in str(err):
            raise
        raise UserError(f"image {shown}: {err}") from None


def read_mask(path: str | Path) -> np.ndarray:
    """A mask's stored indices as an int64 (H, W) array; EXIF orientation is never applied."""
    path = Path(path)
    with _open(path, "mask") as img:
        _check_mask_mode(img, path)
        _decode(img, path, "mask")
        return np.asarray(img).astype(np.int64)


def colour_mask_to_index(mask: Image.Image | np.ndarray, palette: Sequence[Sequence[int]],
                         ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Class indices (uint8 (H, W)) of an RGB colour-coded mask; colours not in `palette` -> ignore."""
    rgb = np.asarray(mask.convert("RGB") if isinstance(mask, Image.Image) else mask).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    out = np.full(codes.shape, ignore_index, dtype=np.uint8)
    for index, (r, g, b) in enumerate(palette):
        out[codes == ((r << 16) | (g << 8) | b)] = index
    return out


# ---- the dataset classes ------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Images with per-pixel class indices; subclasses say how sample `i` is loaded.

    Args:
        classes: class names, index order.
        palette: one RGB colour per class; default `default_palette`.
        transform: callable (image, label) -> (image, label); default: normalise only.
        ignore_index: label value of unlabelled pixels.
        name: how errors name this dataset.
        channels: channels of the images (`model.in_channels`).
    """

    def __init__(self, classes: Sequence[str], palette: Sequence[Sequence[int]] | None = None,
                 transform: Callable | None = None, ignore_index: int = IGNORE_INDEX, name: str = "dataset",
                 channels: int = 3):
        self.classes = [str(c) for c in classes]
        self.palette = [list(map(int, c)) for c in (palette or default_palette(len(self.classes)))]
        if len(self.palette) != len(self.classes):
            raise UserError(f"{name}: {len(self.palette)} palette colours for {len(self.classes)} classes")
        self.transform = transform if transform is not None else build_eval_transform(scale=None)
        self.ignore_index = ignore_index
        self.name = name
        self.channels = channels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    reduce_zero_label: bool = False  # stored 0 means "unlabelled", every other value minus 1

    def stored_to_labels(self, raw: np.ndarray, name: str | Path) -> np.ndarray:
        """Stored mask values -> training labels (int64), refusing values that are neither a class nor ignore."""
        ignore = self.ignore_index
        raw = raw.astype(np.int64, copy=False)
        label = raw
        if self.reduce_zero_label:
            label = raw - 1
            label[(raw == 0) | (raw == ignore)] = ignore
        valid = ((label >= 0) & (label < self.num_classes)) | (label == ignore)
        if not valid.all():
            bad = np.unique(raw[~valid])
            stored = f"1..{self.num_classes} (reduce_zero_label: 0 = unlabelled)" if self.reduce_zero_label \
                else f"0..{self.num_classes - 1}"
            raise UserError(
                f"mask {name} has values {bad[:20].tolist()}{' ...' if len(bad) > 20 else ''} that are neither a "
                f"class ({self.num_classes} classes: stored values {stored}) nor the ignore index {ignore}. "
                f"Fix the mask (a JPEG-saved mask gets such values: save masks as PNG), or the class list / "
                f"reduce_zero_label of the dataset (`upernet data check` finds the label protocol).")
        return label

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Sample `index` before the transform: uint8 (channels, H, W) image, int64 (H, W) label, path."""
        raise NotImplementedError

    def load_label(self, index: int) -> torch.Tensor:
        """The int64 (H, W) label of sample `index` alone (class statistics need no image)."""
        return self.load(index)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label, path = self.load(index)
        image, label = self.transform(image, label)
        return {"image": image, "label": label, "path": path}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} samples, {self.num_classes} classes)"


class FileDataset(SegmentationDataset):
    """Paired image and mask files; every pair is checked when loaded, some or all when opened.

    Args:
        images: image paths.
        masks: mask paths, one per image, same order.
        classes: class names, index order.
        palette: one RGB colour per class; default `default_palette`.
        transform: callable (image, label) -> (image, label); default: normalise only.
        reduce_zero_label: stored 0 means "unlabelled" (-> ignore), every other value minus 1.
        ignore_index: label value of unlabelled pixels.
        verify: checks on open: "full" decodes every file; "headers" reads every header (sizes,
            mask modes) and decodes a sample of 16 pairs; "sample" only decodes the sample;
            "auto" is full up to 100 pairs, headers up to 5000, sample beyond.
        name: how errors name this dataset.
        channels: channels of the images (`model.in_channels`; see `read_image`).
    """

    def __init__(self, images: Sequence[str | Path], masks: Sequence[str | Path], classes: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, transform: Callable | None = None,
                 reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX, verify: str = "auto",
                 name: str = "dataset", channels: int = 3):
        super().__init__(classes, palette, transform, ignore_index, name, channels)
        if len(images) != len(masks):
            raise UserError(f"{name}: {len(images)} images but {len(masks)} masks")
        if not images:
            raise UserError(f"{name}: the split is empty (no image/mask pairs)")
        self.images = [Path(p) for p in images]
        self.masks = [Path(p) for p in masks]
        self.reduce_zero_label = reduce_zero_label
        self.verify(verify)

    def __len__(self) -> int:
        return len(self.images)

    # -- per-pair reading and checks
    def _read_pair(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        image = read_image(self.images[index], self.channels)
        raw = read_mask(self.masks[index])
        if tuple(image.shape[-2:]) != raw.shape:
            self._size_error(index, tuple(image.shape[-2:]), raw.shape)
        return image, raw

    def _size_error(self, index: int, image_hw: tuple[int, int], mask_hw: tuple[int, int]):
        img, msk = self.images[index], self.masks[index]
        rotated = False
        if not is_tiff(img):
            with _open(img, "image") as handle:
                rotated = handle.getexif().get(EXIF_ORIENTATION, 1) != 1
        note = (" The image has an EXIF orientation, which is applied to images (never to masks): the mask "
                "must match the image as displayed.") if rotated else ""
        raise UserError(f"mask {msk} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {img} is "
                         f"{image_hw[1]}x{image_hw[0]}; a mask must cover its image pixel for pixel.{note}")

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, raw = self._read_pair(index)
        label = self.stored_to_labels(raw, self.masks[index])
        return image, torch.from_numpy(label), str(self.images[index])

    def load_label(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.stored_to_labels(read_mask(self.masks[index]), self.masks[index]))

    # -- checks on open
    def verify(self, mode: str = "full") -> None:
        """Check the files now, reporting every problem found at once (see the class Args)."""
        n = len(self)
        if mode == "auto":
            mode = "full" if n <= 100 else "headers" if n <= 5000 else "sample"
        if mode not in ("full", "headers", "sample"):
            raise UserError(f"verify must be 'auto', 'full', 'headers' or 'sample', got {mode!r}")
        problems: list[str] = []
        if mode == "headers":
            for i in range(n):
                try:
                    image_hw, mask_hw = image_size(self.images[i]), mask_size(self.masks[i])
                    if image_hw != mask_hw:
                        self._size_error(i, image_hw, mask_hw)
                except ValueError as err:
                    problems.append(str(err))
        decoded = range(n) if mode == "full" else sorted(set(np.linspace(0, n - 1, min(n, 16)).astype(int).tolist()))
        stored: set[int] = set()
        for i in decoded:
            try:
                _, raw = self._read_pair(i)
                self.stored_to_labels(raw, self.masks[i])
                stored.update(np.unique(raw).tolist())
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise UserError(f"{self.name}: {len(problems)} problem(s) found when opening the dataset:\n"
                             + _listing([p.replace("\n", " ") for p in problems]))
        if stored and stored <= {0, self.ignore_index} and self.num_classes > 1 and self.ignore_index in stored:
            raise UserError(
                f"{self.name}: the masks (e.g. {self.masks[0]}) hold only the values 0 and {self.ignore_index}, "
                f"and {self.ignore_index} is the ignore index, so every foreground pixel would be ignored. "
                f"Store binary masks as 0/1 (e.g. mask // 255) with 2 classes.")


# ---- pairing files on disk --------------------------------------------------------------------
def _index_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Files under `folder` (recursive, hidden ones skipped) by relative path minus suffix."""
    found: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = next((s for s in suffixes if path.name.lower().endswith(s.lower())), None)
        if suffix is None:
            continue
        key = str(path.relative_to(folder))[: -len(suffix)]
        if key in found:
            duplicates.append(f"{found[key]} and {path}")
        found[key] = path
    if duplicates:
        raise UserError(f"files with the same name but different suffixes in {folder}; keep one of each:\n"
                         + _listing(duplicates))
    return found


def pair_files(img_dir: str | Path, ann_dir: str | Path, img_suffix: str | Sequence[str] | None = None,
               seg_suffix: str = ".png", name: str = "dataset") -> tuple[list[Path], list[Path]]:
    """(images, masks) matched by relative path minus suffix; unmatched files on either side are errors.

    Args:
        img_dir: folder of images (searched recursively).
        ann_dir: folder of masks, same relative layout.
        img_suffix: image file ending(s); None accepts the common image formats.
        seg_suffix: mask file ending.
        name: how errors name the dataset.
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for folder, what in ((img_dir, "image"), (ann_dir, "mask")):
        if not folder.is_dir():
            raise MissingFile(f"{name}: {what} folder {folder} does not exist")
    suffixes = IMAGE_SUFFIXES if img_suffix is None else [img_suffix] if isinstance(img_suffix, str) else img_suffix
    images = _index_files(img_dir, suffixes)
    masks = _index_files(ann_dir, [seg_suffix])
    if not images:
        raise UserError(f"{name}: the split is empty: no images ({', '.join(suffixes)}) in {img_dir}")
    lonely_images = [images[k] for k in images if k not in masks]
    lonely_masks = [masks[k] for k in masks if k not in images]
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) without a mask (expected <name>{seg_suffix} in "
                         f"{ann_dir}):\n" + _listing(lonely_images))
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} mask(s) without an image (expected <name>"
                         f"{'|'.join(suffixes)} in {img_dir}):\n" + _listing(lonely_masks))
        raise UserError(f"{name}: images and masks do not pair up. " + "\n".join(parts)
                         + "\nAdd the missing files or remove the unpaired ones.")
    keys = sorted(images)
    return [images[k] for k in keys], [masks[k] for k in keys]


# ---- standard layouts -------------------------------------------------------------------------
def _split_name(split: str, names: dict[str, str], dataset: str) -> str:
    if split in names.values():
        return split
    if split not in names:
        raise UserError(f"{dataset}: unknown split {split!r}; use one of {sorted(names)}")
    return names[split]


def ade20k(root: str | Path, split: str, transform: Callable | None = None, verify: str = "auto") -> FileDataset:
    """ADE20K (SceneParsing, 150 classes): `ADEChallengeData2016/{images,annotations}/{training,validation}`.

    Stored label 0 ("other") is ignored and the others shifted down by one (reduce_zero_label).

    Args:
        root: the `ADEChallengeData2016` folder or its parent.
        split: "train"/"training" or "val"/"validation".
        transform: callable (image, label) -> (image, label).
        verify: checks on open, see `FileDataset`.
    """
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    folder = _split_name(split, {"train": "training", "val": "validation"}, "ade20k")
    name = f"ade20k {folder} ({root})"
    images, masks = pair_files(root / "images" / folder, root / "annotations" / folder, ".jpg", ".png", name)
    return FileDataset(images, masks, ADE20K_CLASSES, ADE20K_PALETTE, transform, reduce_zero_label=True,
                       verify=verify, name=name)


def cityscapes(root: str | Path, split: str, transform: Callable | None = None, verify: str = "auto") -> FileDataset:
    """Cityscapes fine annotations in the 19 train ids: `leftImg8bit/{split}/<city>/*_leftImg8bit.png`
    with `gtFine/{split}/<city>/*_gtFine_labelTrainIds.png`.

    Args:
        root: the folder holding `leftImg8bit` and `gtFine`.
        split: "train", "val" or "test".
        transform: callable (image, label) -> (image, label).
        verify: checks on open, see `FileDataset`.
    """
    root = Path(root)
    split = _split_name(split, {"train": "train", "val": "val", "test": "test"}, "cityscapes")
    ann_dir = root / "gtFine" / split
    name = f"cityscapes {split} ({root})"
    if ann_dir.is_dir() and not any(ann_dir.rglob("*_gtFine_labelTrainIds.png")) and any(ann_dir.rglob("*_labelIds.png")):
        raise UserError(f"{name}: {ann_dir} has *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png; create "
                         f"them with cityscapesscripts' createTrainIdLabelImgs (CITYSCAPES_DATASET={root}).")
    images, masks = pair_files(root / "leftImg8bit" / split, ann_dir, "_leftImg8bit.png",
                               "_gtFine_labelTrainIds.png", name)
    return FileDataset(images, masks, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, transform, verify=verify, name=name)


def _read_id_list(path: Path, name: str) -> list[str]:
    if not path.is_file():
        raise MissingFile(f"{name}: split list {path} does not exist")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{name}: the split is empty: {path} lists no images")
    return ids


def _listed_pairs(root: Path, ids: Sequence[str], mask_folder: str, list_file: Path, name: str):
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    masks = [root / mask_folder / f"{i}.png" for i in ids]
    missing = [p for pair in zip(images, masks) for p in pair if not p.is_file()]
    if missing:
        raise UserError(f"{name}: {len(missing)} file(s) listed in {list_file} do not exist:\n" + _listing(missing)
                         + "\nRestore them or remove their ids from the list.")
    return images, masks


def voc(root: str | Path, split: str, transform: Callable | None = None, aug: bool = False,
        verify: str = "auto") -> FileDataset:
    """Pascal VOC 2012 (21 classes with background; 255 = object borders, ignored).

    `ImageSets/Segmentation/{split}.txt` lists ids of `JPEGImages/<id>.jpg` and
    `SegmentationClass/<id>.png` (palette PNGs whose indices are the labels). With `aug` the train
    split is mmsegmentation's VOC-aug: train.txt with SegmentationClass followed by the SBD list
    (`aug.txt`, also found as train_aug.txt/trainaug.txt) with `SegmentationClassAug` masks
    (1464 + 10582 samples in the standard release); other splits ignore `aug`.

    Args:
        root: the `VOC2012` folder, or a parent holding `VOC2012` or `VOCdevkit/VOC2012`.
        split: "train", "val" or "trainval".
        transform: callable (image, label) -> (image, label).
        aug: add the SBD augmented set to the train split.
        verify: checks on open, see `FileDataset`.
    """
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if candidate.is_dir():
            root = candidate
    name = f"voc {split}{' (aug)' if aug and split == 'train' else ''} ({root})"
    lists = root / "ImageSets" / "Segmentation"
    list_file = lists / f"{split}.txt"
    images, masks = _listed_pairs(root, _read_id_list(list_file, name), "SegmentationClass", list_file, name)
    if aug and split == "train":
        aug_list = next((lists / f for f in ("aug.txt", "train_aug.txt", "trainaug.txt") if (lists / f).is_file()), None)
        if aug_list is None:
            raise MissingFile(f"{name}: no SBD list ({lists}/aug.txt); build SegmentationClassAug and aug.txt "
                                    f"with mmsegmentation's tools/dataset_converters/voc_aug.py")
        more = _listed_pairs(root, _read_id_list(aug_list, name), "SegmentationClassAug", aug_list, name)
        images, masks = images + more[0], masks + more[1]
    return FileDataset(images, masks, VOC_CLASSES, VOC_PALETTE, transform, verify=verify, name=name)


def class_names(classes: Sequence[str] | int | None, dataset: str, hint: str = "") -> list[str]:
    """The class names of `data.options.classes`: names in index order, or their number (class_0 ...)."""
    if classes is None:
        raise UserError(f"{dataset}: no classes; give the class names in index order, e.g. "
                        f"data.options.classes=[background,road,car] {hint}".rstrip())
    return [f"class_{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)


def folder(root: str | Path, split: str, transform: Callable | None = None, classes: Sequence[str] | int | None = None,
           palette: Sequence[Sequence[int]] | None = None, reduce_zero_label: bool = False,
           img_dir: str = "img_dir", ann_dir: str = "ann_dir", img_suffix: str | None = None,
           seg_suffix: str = ".png", verify: str = "auto", channels: int = 3) -> FileDataset:
    """Your own data: `root/img_dir/<split>/**/<name><img_suffix>` with `root/ann_dir/<split>/**/<name><seg_suffix>`.

    Args:
        root: the dataset folder.
        split: sub-folder of `img_dir` and `ann_dir` ("train", "val", ...).
        transform: callable (image, label) -> (image, label).
        classes: class names in index order, or their number.
        palette: one RGB colour per class; default `default_palette`.
        reduce_zero_label: stored 0 means "unlabelled", every other value minus 1.
        img_dir: image folder, relative to `root` (or absolute).
        ann_dir: mask folder, relative to `root` (or absolute).
        img_suffix: image file ending; None accepts .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp.
        seg_suffix: mask file ending.
        verify: checks on open, see `FileDataset`.
        channels: channels of the images, `model.in_channels` (grey 1, RGB 3, multi-band TIFFs N).
    """
    classes = class_names(classes, f"folder dataset {root}", "(in a recipe: data: {options: {classes: [...]}}), "
                          "or their number, data.options.classes=3")
    root = Path(root)
    name = f"folder {split} ({root})"
    images, masks = pair_files(root / img_dir / split, root / ann_dir / split, img_suffix, seg_suffix, name)
    return FileDataset(images, masks, classes, palette, transform, reduce_zero_label=reduce_zero_label,
                       verify=verify, name=name, channels=channels)
