"""`upernet data check DIR` and `upernet data convert DIR OUT`: look at a dataset before training on it.

`check_dataset` lists the image/mask pairs of a dataset (the `folder` layout, ADE20K, Cityscapes,
VOC, or a Hugging Face dataset), reads them (all, or an even sample of `max_images` per split), and
reports what it found without stopping at the first problem: images per split, image sizes and
modes, mask kinds, the label values and class pixel frequencies per split, pairs missing either
side, size mismatches, unreadable files, duplicate names. It then decides the label protocol
(classes, palette, ignore value, `reduce_zero_label`, binary masks -> 2 classes), explains each
decision, and names the option to pass where the data cannot decide.

`convert_dataset` writes a clean `folder` dataset: index PNGs (0..N-1, 255 = ignore; written
atomically), the images linked or copied, and `recipe.yaml` that `upernet train OUT/recipe.yaml` takes.
The source is only read.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageOps

from ..config import config_from_dict, dump_config, load_config, to_dict
from ..errors import MissingFile, UserError
from ..io import atomic_write, write_json, write_text
from .classes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, VOC_CLASSES, VOC_PALETTE,
                      default_palette)
from .datasets import IMAGE_SUFFIXES, INDEX_MODES
from .labels import (IGNORE, MASK_KINDS, MAX_COLOURS, LabelProtocol, MaskFacts, code_colour, colour_code, index_mask,
                     inspect_mask, read_palette_file, write_index_png)

LAYOUTS = ("folder", "ade20k", "cityscapes", "voc", "hf")
# The protocol of the standard layouts: (classes, palette, reduce_zero_label).
KNOWN_PROTOCOLS = {"ade20k": (ADE20K_CLASSES, ADE20K_PALETTE, True), "cityscapes": (CITYSCAPES_CLASSES,
                   CITYSCAPES_PALETTE, False), "voc": (VOC_CLASSES, VOC_PALETTE, False)}
LISTED = 20  # problems and file names kept per category in the report


# ---- listing pairs ------------------------------------------------------------------------------
@dataclass
class Pair:
    """One sample: files on disk, or row `row` of a Hugging Face split."""

    name: str
    image: Path | None = None
    mask: Path | None = None
    row: int | None = None


@dataclass
class SplitListing:
    """The pairs of one split and what did not pair up."""

    pairs: list[Pair] = field(default_factory=list)
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    missing_listed: list[str] = field(default_factory=list)
    hf_data: Any = None
    hf_columns: tuple[str, str] | None = None


def files_by_key(folder: Path, suffixes: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Files under `folder` (recursive, streamed, hidden skipped) by relative path minus suffix, and the
    names found twice (same name, different suffixes)."""
    found: dict[str, Path] = {}
    duplicates = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for file in sorted(files):
            suffix = next((s for s in suffixes if file.lower().endswith(s.lower())), None)
            if suffix is None or file.startswith("."):
                continue
            path = Path(directory) / file
            key = str(path.relative_to(folder))[: -len(suffix)]
            if key in found:
                duplicates.append(f"{found[key]} and {path}: same name, keep one")
            else:
                found[key] = path
    return found, duplicates


def pair_up(img_dir: Path, ann_dir: Path, img_suffixes: Sequence[str], seg_suffix: str) -> SplitListing:
    """The pairs of two folders matched by relative name, and what is missing on either side."""
    images, dup_images = files_by_key(img_dir, img_suffixes) if img_dir.is_dir() else ({}, [])
    masks, dup_masks = files_by_key(ann_dir, [seg_suffix]) if ann_dir.is_dir() else ({}, [])
    listing = SplitListing(duplicates=dup_images + dup_masks)
    listing.pairs = [Pair(key, images[key], masks[key]) for key in sorted(images) if key in masks]
    listing.images_without_mask = [str(images[k]) for k in sorted(images) if k not in masks]
    listing.masks_without_image = [str(masks[k]) for k in sorted(masks) if k not in images]
    return listing


def detect_layout(root: Path) -> str:
    """The layout of `root` from its folder names."""
    if (root / "ADEChallengeData2016").is_dir() or ((root / "images" / "training").is_dir()
                                                    and (root / "annotations").is_dir()):
        return "ade20k"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if any((root / p / "JPEGImages").is_dir() for p in ("", "VOC2012", "VOCdevkit/VOC2012")):
        return "voc"
    if (root / "img_dir").is_dir() or (root / "ann_dir").is_dir():
        return "folder"
    if any((root / m).is_file() for m in ("dataset_dict.json", "state.json")) or any(
            next(root.rglob(pattern), None) for pattern in ("*.parquet", "metadata.jsonl", "metadata.csv")):
        return "hf"  # saved with save_to_disk, parquet files, or an imagefolder with its metadata file
    raise UserError(f"{root}: cannot tell its layout (no img_dir/ann_dir, ADE20K, Cityscapes, VOC or Hugging Face "
                    f"folders); pass --layout folder|ade20k|cityscapes|voc|hf")


def list_splits(root: str | Path, layout: str, options: dict | None = None) -> dict[str, SplitListing]:
    """{split: SplitListing} of a dataset in `layout`; `options` as the dataset kind's (img_dir, ann_dir,
    img_suffix, seg_suffix for folder; image_column, mask_column, revision for hf)."""
    options = dict(options or {})
    root = Path(root)
    if layout == "hf":
        from .hf import find_columns, load_hf_splits

        out = {}
        for split, data in load_hf_splits(root, options.get("revision")).items():
            columns = find_columns(data, options.get("image_column"), options.get("mask_column"), f"hf {root}")
            out[split] = SplitListing(pairs=[Pair(f"{split}[{i}]", row=i) for i in range(len(data))],
                                      hf_data=data, hf_columns=columns)
        return out
    if not root.is_dir():
        raise MissingFile(f"dataset folder {root} does not exist")
    if layout == "folder":
        img_dir, ann_dir = root / options.get("img_dir", "img_dir"), root / options.get("ann_dir", "ann_dir")
        suffix = options.get("img_suffix")
        suffixes = IMAGE_SUFFIXES if suffix is None else [suffix]
        if not img_dir.is_dir():
            raise MissingFile(f"{root}: no image folder {img_dir} (the folder layout is img_dir/<split>/..., "
                              f"ann_dir/<split>/...)")
        loose = [p for p in sorted(img_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise UserError(f"{img_dir}: images directly in it (e.g. {loose[0].name}); move them into a split "
                            f"folder, {img_dir}/train/ (and their masks into {ann_dir}/train/)")
        splits = sorted({p.name for d in (img_dir, ann_dir) if d.is_dir() for p in d.iterdir()
                         if p.is_dir() and not p.name.startswith(".")})
        return {s: pair_up(img_dir / s, ann_dir / s, suffixes, options.get("seg_suffix", ".png")) for s in splits}
    if layout == "ade20k":
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        return {split: pair_up(base / "images" / folder, base / "annotations" / folder, [".jpg"], ".png")
                for split, folder in (("train", "training"), ("val", "validation"))
                if (base / "images" / folder).is_dir() or (base / "annotations" / folder).is_dir()}
    if layout == "cityscapes":
        return {split: pair_up(root / "leftImg8bit" / split, root / "gtFine" / split, ["_leftImg8bit.png"],
                               "_gtFine_labelTrainIds.png")
                for split in ("train", "val", "test") if (root / "leftImg8bit" / split).is_dir()}
    if layout == "voc":
        for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
            if candidate.is_dir():
                root = candidate
        out = {}
        for list_file in sorted((root / "ImageSets" / "Segmentation").glob("*.txt")):
            listing = SplitListing()
            for line in list_file.read_text().splitlines():
                if not line.strip():
                    continue
                key = line.split()[0]
                image, mask = root / "JPEGImages" / f"{key}.jpg", root / "SegmentationClass" / f"{key}.png"
                if not image.is_file():
                    listing.missing_listed.append(f"{image} (listed in {list_file}) does not exist; restore it or "
                                                  f"remove {key} from the list")
                elif not mask.is_file():
                    listing.images_without_mask.append(str(image))
                else:
                    listing.pairs.append(Pair(key, image, mask))
            out[list_file.stem] = listing
        return out
    raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def sample_indices(count: int, max_images: int | None) -> list[int]:
    """All indices, or `max_images` evenly spaced ones."""
    if not max_images or count <= max_images:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, max_images).round().astype(int).tolist()))


def read_pair(listing: SplitListing, pair: Pair, with_image: bool = True
              ) -> tuple[str, Image.Image | None, str, Image.Image | None]:
    """(image name, decoded image, mask name, decoded mask) of a pair; unreadable files raise UserError.
    Images get their EXIF orientation applied (as the datasets do), masks never. `with_image=False`
    leaves an image file undecoded (None): convert copies it as it is."""
    if listing.hf_data is not None:
        row = listing.hf_data[pair.row]
        image_column, mask_column = listing.hf_columns
        return f"{pair.name}.{image_column}", row[image_column], f"{pair.name}.{mask_column}", row[mask_column]
    decoded = []
    for path, what in ((pair.image, "image"), (pair.mask, "mask")):
        if what == "image" and not with_image:
            decoded.append(None)
            continue
        try:
            with Image.open(path) as img:
                img.load()
                decoded.append(ImageOps.exif_transpose(img) if what == "image" else img.copy())
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"{what} {path} cannot be read ({str(err).splitlines()[0]}); re-export or remove it") from None
    return str(pair.image), decoded[0], str(pair.mask), decoded[1]


# ---- reading everything -------------------------------------------------------------------------
@dataclass
class SplitStats:
    """What was found in one split."""

    pairs: int = 0
    checked: int = 0
    image_modes: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)
    mask_kinds: Counter = field(default_factory=Counter)
    mask_modes: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)  # stored value (colour code for RGB masks) -> pixels
    example: dict[str, str] = field(default_factory=dict)  # mask kind -> one file of that kind


def scan_split(listing: SplitListing, max_images: int | None, problems: list[str],
               colours: dict[int, list[int]]) -> SplitStats:
    """Decode the (sampled) pairs of a split, counting modes, sizes, kinds and values; problems are appended."""
    stats = SplitStats(pairs=len(listing.pairs))
    for index in sample_indices(len(listing.pairs), max_images):
        pair = listing.pairs[index]
        try:
            image_name, image, mask_name, mask = read_pair(listing, pair)
            if image is None or mask is None:
                problems.append(f"{pair.name}: no {'image' if image is None else 'mask'}; fill it in or remove the row")
                continue
            stats.image_modes[image.mode] += 1
            stats.image_sizes[f"{image.width}x{image.height}"] += 1
            facts: MaskFacts = inspect_mask(mask)
            stats.checked += 1
            stats.mask_kinds[facts.kind] += 1
            stats.mask_modes[facts.mode] += 1
            stats.example.setdefault(facts.kind, mask_name)
            if facts.size != (image.height, image.width):
                problems.append(f"mask {mask_name} is {facts.size[1]}x{facts.size[0]} (WxH) but its image "
                                f"{image_name} is {image.width}x{image.height}; resize the mask (nearest) or "
                                f"re-export it at the image size")
                continue
            if facts.kind == "rgb" and len(facts.counts) > MAX_COLOURS:
                problems.append(f"mask {mask_name} has {len(facts.counts)} colours: not a colour-coded mask "
                                f"(saved as JPEG, or a photo?); re-export it as a PNG with one colour per class")
                continue
            stats.values.update(facts.counts)
            for value, colour in facts.colours.items():
                colours.setdefault(value, colour)
        except UserError as err:
            problems.append(str(err))
    return stats


# ---- deciding the protocol ----------------------------------------------------------------------
def decide_protocol(stats: dict[str, SplitStats], layout: str, classes: Sequence[str] | int | None = None,
                    palette: Sequence[Sequence[int]] | None = None, reduce_zero_label: bool | None = None,
                    ignore_value: int | None = None, palette_file: str | Path | None = None,
                    palette_colours: dict[int, list[int]] | None = None) -> LabelProtocol:
    """The label protocol of the scanned masks, each decision explained (see `LabelProtocol`).

    Args:
        stats: per-split scan results.
        layout: the dataset layout (ade20k/cityscapes/voc fix the protocol).
        classes: class names in index order (or their number), when known.
        palette: class colours, when known.
        reduce_zero_label: stored 0 means "unlabelled"; None decides from the data.
        ignore_value: the stored value of unlabelled pixels; None decides from the data.
        palette_file: for RGB colour masks, the file naming each colour's class (`read_palette_file`).
        palette_colours: colours of the stored indices of palette PNGs.
    """
    kinds = Counter()
    values = Counter()
    modes = Counter()
    for s in stats.values():
        kinds.update(s.mask_kinds)
        values.update(s.values)
        modes.update(s.mask_modes)
    if isinstance(classes, int):
        classes = [f"class_{i}" for i in range(classes)]
    colour_kinds = {"rgb"} & set(kinds)
    if colour_kinds and set(kinds) - {"rgb"}:
        example = {k: next(s.example[k] for s in stats.values() if k in s.example) for k in kinds}
        others = ", ".join(f"{k} ({example[k]})" for k in kinds if k != "rgb")
        raise UserError(f"masks mix RGB colour codes ({example['rgb']}) with {others}; give all masks one kind")
    if colour_kinds or palette_file:
        return colour_protocol(values, classes, palette_file)

    notes, undecided = [], []
    mask_kind = next(iter(kinds)) if len(kinds) == 1 else "mixed" if kinds else "index"
    needs = bool(set(modes) - set(INDEX_MODES)) or "grey_rgb" in kinds
    if needs:
        notes.append(f"mask modes {sorted(set(modes) - set(INDEX_MODES)) or ['RGB with equal channels']} are not "
                     f"read as indices by the datasets: convert them")
    if layout in KNOWN_PROTOCOLS:
        names, colours, reduce = KNOWN_PROTOCOLS[layout]
        notes.append(f"{layout} layout: its {len(names)} classes, 255 = ignore"
                     + (", stored 0 = unlabelled (reduce_zero_label)" if reduce else ""))
        value_map = label_map(values, IGNORE, reduce)
        return LabelProtocol(list(names), [list(c) for c in colours], reduce, IGNORE, mask_kind, value_map, needs, notes)

    found = set(values)
    binary = (((found <= {0, 255} and 255 in found) or (found and found <= {0, 1})) and ignore_value is None
              and reduce_zero_label is not True and (classes is None or len(classes) == 2))
    if binary:
        names = list(classes) if classes else ["background", "foreground"]
        if 255 in found:
            notes.append("binary masks 0/255: 2 classes, 255 -> 1 (as stored, 255 would be read as ignore)")
            needs = True
        else:
            notes.append("binary masks 0/1: 2 classes")
        value_map = {0: 0, 1: 1, 255: 1}
        return LabelProtocol(names, [list(c) for c in (palette or [[0, 0, 0], [255, 255, 255]])], False, IGNORE,
                             "binary_255" if 255 in found else "binary_01", value_map, needs, notes)

    ignore = ignore_value
    if ignore is None and IGNORE in found:
        ignore = IGNORE
        notes.append(f"value 255 ({percent(values[IGNORE], values)} of pixels) taken as ignore (unlabelled)")
    elif ignore is not None:
        notes.append(f"value {ignore} is ignore (unlabelled), as given")
        needs = needs or ignore != IGNORE
    labelled = sorted(v for v in found if v != ignore)
    top = labelled[-1] if labelled else 0
    if reduce_zero_label is not None:
        reduce = reduce_zero_label
        notes.append(f"reduce_zero_label={reduce}, as given")
    elif classes is not None:
        if top + 1 == len(classes) or (top < len(classes) and 0 in labelled):
            reduce = False
            notes.append(f"{len(classes)} classes given and the values run 0..{top}: label 0 is a class")
        elif top == len(classes):
            reduce = True
            notes.append(f"{len(classes)} classes given and the values run up to {top}: stored 0 is unlabelled "
                         f"(reduce_zero_label)")
        else:
            reduce = False
    elif labelled and 0 not in labelled:
        reduce = False
        undecided.append(f"no pixel stores 0: if the values 1..{top} are the classes (0 = unlabelled), pass "
                         f"--reduce-zero-label; as it is, 0 is a class without pixels ({top + 1} classes)")
    else:
        reduce = False
        if labelled:
            undecided.append(f"label 0 covers {percent(values[0], values)} of pixels: if it means 'unlabelled', pass "
                             f"--reduce-zero-label ({top} classes, 1..{top}); as it is, 0 is a class ({top + 1} classes)")
    num_classes = top if reduce else top + 1
    if classes is not None:
        if len(classes) < num_classes:
            where = next((s.example.get(mask_kind) for s in stats.values() if s.example), "the masks")
            raise UserError(f"masks (e.g. {where}) store values up to {top} but {len(classes)} classes are given"
                            f"{' (reduce_zero_label)' if reduce else ''}; give {num_classes} class names, or fix the masks")
        names = list(classes)
    else:
        names = [f"class_{i}" for i in range(1 if reduce else 0, top + 1)]
        undecided.append(f"class names not given: named class_N; pass --classes NAME,NAME,... ({len(names)} names)")
    if len(names) > IGNORE:
        raise UserError(f"{len(names)} classes: index PNGs with 255 = ignore hold at most 255 classes")
    gaps = sorted(set(range(1 if reduce else 0, top + 1)) - set(labelled))
    if gaps:
        notes.append(f"values {gaps[:10]}{' ...' if len(gaps) > 10 else ''} never occur (classes without pixels"
                     f"{' in the sample' if any(s.checked < s.pairs for s in stats.values()) else ''})")
    value_map = label_map(found, ignore, reduce)
    if palette is not None:
        colours = [list(c) for c in palette]
    elif palette_colours and kinds.get("palette"):
        fallback = default_palette(len(names))
        colours = [palette_colours.get(i + (1 if reduce else 0), fallback[i]) for i in range(len(names))]
        notes.append("class colours taken from the palette PNGs")
    else:
        colours = default_palette(len(names))
    return LabelProtocol(names, colours, reduce, IGNORE, mask_kind, value_map, needs, notes, undecided)


def label_map(values, ignore: int | None, reduce: bool) -> dict[int, int]:
    """Stored value -> training label: ignore (and 0 with reduce_zero_label) -> 255, others shifted by `reduce`."""
    return {v: IGNORE if v == ignore or (reduce and v == 0) else v - 1 if reduce else v for v in values}


def colour_protocol(values: Counter, classes: Sequence[str] | None, palette_file: str | Path | None) -> LabelProtocol:
    """The protocol of RGB colour-coded masks: the colour table given in `palette_file`, or the colours found."""
    notes, undecided = [], []
    if palette_file:
        names, colours, ignored = read_palette_file(palette_file)
        notes.append(f"RGB colour masks: {len(names)} classes and their colours from {palette_file}")
        value_map = {int(colour_code(np.array(c))): i for i, c in enumerate(colours)}
        value_map.update({int(colour_code(np.array(c))): IGNORE for c in ignored})
        unknown = sorted(set(values) - set(value_map))
        if unknown:
            raise UserError(f"masks hold colours {[tuple(code_colour(c)) for c in unknown[:8]]} that are not in "
                            f"{palette_file}; add them there (as a class, or under 'ignore')")
    else:
        codes = sorted(values)
        if len(codes) > IGNORE:
            raise UserError(f"RGB masks hold {len(codes)} colours, more than index PNGs can hold; give the colour "
                            f"table with --palette FILE")
        colours = [code_colour(c) for c in codes]
        if classes:
            raise UserError("RGB colour masks: class names alone do not say which colour is which class; give "
                            "both in a palette file, --palette FILE ({classes: [...], palette: [[r, g, b], ...]})")
        names = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours]
        value_map = {c: i for i, c in enumerate(codes)}
        notes.append(f"RGB colour masks: {len(codes)} colours found, one class each in colour order")
        undecided.append("class order and names from the colours found (a colour missing from the data is no class); "
                         "pass --palette FILE ({classes: [...], palette: [[r, g, b], ...], ignore: [[r, g, b]]}) "
                         "to fix them")
    return LabelProtocol(names, colours, False, IGNORE, "rgb", value_map, True, notes, undecided)


def percent(part: int, counts: Counter) -> str:
    total = sum(counts.values())
    return f"{100 * part / total:.1f}%" if total else "0%"


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class CheckReport:
    """What `check_dataset` found: per-split statistics, problems, and the label protocol."""

    root: str
    layout: str
    listings: dict[str, SplitListing]
    stats: dict[str, SplitStats]
    problems: list[str]
    protocol: LabelProtocol | None

    @property
    def clean(self) -> bool:
        """Nothing to fix or convert: the data trains as it is with `recipe_options`."""
        return not self.problems and self.protocol is not None and not self.protocol.needs_conversion

    def class_pixels(self, split: str) -> dict[str, int]:
        """Pixels per class name in a split (under the protocol; ignored pixels as 'ignore')."""
        out = Counter()
        if self.protocol is None:
            return {}
        for value, pixels in self.stats[split].values.items():
            label = self.protocol.value_map.get(value, IGNORE)
            out["ignore" if label == IGNORE else self.protocol.classes[label]] += pixels
        return {name: out[name] for name in [*self.protocol.classes, "ignore"] if name in out}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        splits = {}
        for split, s in self.stats.items():
            listing = self.listings[split]
            splits[split] = {
                "pairs": s.pairs, "checked": s.checked, "image_modes": dict(s.image_modes),
                "image_sizes": dict(s.image_sizes.most_common(LISTED)), "mask_kinds": dict(s.mask_kinds),
                "label_values": [code_colour(v) if self.protocol and self.protocol.mask_kind == "rgb" else v
                                 for v in sorted(s.values)][:300],
                "class_pixels": self.class_pixels(split),
                "images_without_mask": listing.images_without_mask[:LISTED],
                "masks_without_image": listing.masks_without_image[:LISTED],
                "duplicates": listing.duplicates[:LISTED]}
        return {"root": self.root, "layout": self.layout, "clean": self.clean, "splits": splits,
                "problems": self.problems[:200], "problem_count": len(self.problems),
                "protocol": self.protocol.to_dict() if self.protocol else None,
                "recipe_data": self.recipe_data()}

    def recipe_data(self, root: str | None = None, converted: bool = False) -> dict[str, Any] | None:
        """The recipe's `data` fields for this dataset (kind, root, splits, options)."""
        if self.protocol is None:
            return None
        kind = self.layout if self.layout != "folder" and not converted else "folder"
        splits = list(self.stats)
        train = "train" if "train" in splits else splits[0] if splits else "train"
        val = next((s for s in ("val", "validation", "test") if s in splits), train)
        data = {"kind": kind, "root": root or self.root, "train_split": train, "val_split": val}
        if kind in ("folder", "hf"):
            data["options"] = self.protocol.recipe_options(converted)
        return data

    def table(self) -> str:
        """The report as text for the terminal."""
        lines = [f"dataset {self.root} (layout {self.layout})", ""]
        header = f"{'split':<12}{'pairs':>7}{'checked':>9}  {'image sizes (top 3)':<32}{'image modes':<20}mask kinds"
        lines.append(header)
        for split, s in self.stats.items():
            sizes = ", ".join(f"{k} x{n}" for k, n in s.image_sizes.most_common(3))
            modes = ", ".join(f"{k} x{n}" for k, n in s.image_modes.most_common())
            kinds = ", ".join(f"{k} x{n}" for k, n in s.mask_kinds.most_common())
            lines.append(f"{split:<12}{s.pairs:>7}{s.checked:>9}  {sizes:<32}{modes:<20}{kinds}")
        if self.protocol is not None:
            lines += ["", "class pixel frequencies (% of labelled pixels):"]
            names = [*self.protocol.classes, "ignore"]
            per_split = {split: self.class_pixels(split) for split in self.stats}
            lines.append(f"  {'class':<24}" + "".join(f"{split:>12}" for split in per_split))
            if not any("ignore" in counts for counts in per_split.values()):
                names.remove("ignore")
            for name in names[:60]:
                cells = []
                for counts in per_split.values():
                    total = sum(v for k, v in counts.items() if k != "ignore") or 1
                    cells.append(f"{100 * counts.get(name, 0) / total:>11.2f}%" if name != "ignore"
                                 else f"{counts.get(name, 0):>10} px")
                lines.append(f"  {name[:24]:<24}" + "".join(cells))
            if len(names) > 60:
                lines.append(f"  ... {len(names) - 60} more classes in report.json")
            p = self.protocol
            lines += ["", f"label protocol: {p.num_classes} classes, mask kind {p.mask_kind} "
                          f"({MASK_KINDS.get(p.mask_kind, 'several kinds')}), ignore {p.ignore_index}, "
                          f"reduce_zero_label {p.reduce_zero_label}"]
            lines += [f"  - {n}" for n in p.notes]
            lines += [f"  ? {u}" for u in p.undecided]
            if p.needs_conversion:
                lines.append(f"  -> the masks need converting: upernet data convert {self.root} OUT")
        if self.problems:
            lines += ["", f"{len(self.problems)} problem(s):"] + [f"  ! {p}" for p in self.problems[:LISTED]]
            if len(self.problems) > LISTED:
                lines.append(f"  ... {len(self.problems) - LISTED} more in report.json")
        if not self.clean:
            lines += ["", "not clean: see above"]
        elif self.protocol.undecided:
            lines += ["", "clean: ready to train (with the defaults of the ? lines)"]
        else:
            lines += ["", "clean: ready to train"]
        return "\n".join(lines)


def check_dataset(root: str | Path, layout: str = "auto", max_images: int | None = None,
                  classes: Sequence[str] | int | None = None, palette_file: str | Path | None = None,
                  reduce_zero_label: bool | None = None, ignore_value: int | None = None,
                  options: dict | None = None) -> CheckReport:
    """Read a dataset and report what it holds and its label protocol (see the module docstring).

    Args:
        root: the dataset folder (or, with layout "hf", a saved/parquet folder or a Hub name).
        layout: "auto", "folder", "ade20k", "cityscapes", "voc" or "hf".
        max_images: read at most this many evenly spaced pairs per split (None: all).
        classes: class names in index order, or their number (default: `root/recipe.yaml`'s, else decided).
        palette_file: colour table of RGB colour masks (see `upernet.data.labels.read_palette_file`).
        reduce_zero_label: stored 0 means "unlabelled"; None decides from the data.
        ignore_value: stored value of unlabelled pixels; None: 255 when present.
        options: layout options (folder: img_dir, ann_dir, img_suffix, seg_suffix; hf: image_column,
            mask_column, revision).
    """
    options = dict(options or {})
    path = Path(root)
    if layout == "auto":
        if not path.is_dir():
            raise MissingFile(f"dataset folder {root} does not exist")
        layout = detect_layout(path)
    palette = None
    recipe = path / "recipe.yaml"
    if recipe.is_file() and classes is None and palette_file is None:  # a converted dataset: its own protocol
        stored = ((yaml.safe_load(recipe.read_text()) or {}).get("data") or {}).get("options") or {}
        classes, palette = stored.get("classes"), stored.get("palette")
        if reduce_zero_label is None and classes is not None:
            reduce_zero_label = bool(stored.get("reduce_zero_label", False))
    listings = list_splits(root, layout, options)
    if not listings:
        raise UserError(f"{root}: no splits found in the {layout} layout; see docs/datasets.md for the folders")
    problems: list[str] = []
    for split, listing in listings.items():
        problems += [f"image without mask: {p}" for p in listing.images_without_mask]
        problems += [f"mask without image: {p}" for p in listing.masks_without_image]
        problems += [f"duplicate name: {p}" for p in listing.duplicates]
        problems += listing.missing_listed
        if not listing.pairs:
            problems.append(f"split {split}: no image/mask pairs")
    colours: dict[int, list[int]] = {}
    stats = {split: scan_split(listing, max_images, problems, colours) for split, listing in listings.items()}
    protocol = decide_protocol(stats, layout, classes, palette, reduce_zero_label, ignore_value, palette_file, colours)
    return CheckReport(str(root), layout, listings, stats, problems, protocol)


def frequency_chart(report: CheckReport, path: str | Path, max_classes: int = 40) -> Path:
    """A PNG bar chart of class pixel shares per split (largest classes first), drawn with Pillow."""
    splits = list(report.stats)
    shares = {}
    for split in splits:
        counts = report.class_pixels(split)
        total = sum(v for k, v in counts.items() if k != "ignore") or 1
        shares[split] = {k: v / total for k, v in counts.items() if k != "ignore"}
    names = sorted({n for s in shares.values() for n in s}, key=lambda n: -sum(s.get(n, 0) for s in shares.values()))
    names = names[:max_classes]
    bar, gap, label_w, width = 10, 6, 170, 760
    row = bar * max(len(splits), 1) + gap
    height = 50 + row * max(len(names), 1) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"class pixel share per split: {report.root}", fill="black")
    split_colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, split in enumerate(splits):
        colour = split_colours[i % len(split_colours)]
        draw.rectangle([10 + 90 * i, 26, 20 + 90 * i, 36], fill=colour)
        draw.text((24 + 90 * i, 25), split, fill="black")
    top = max([max(s.values(), default=0) for s in shares.values()] + [1e-9])
    for r, name in enumerate(names):
        y = 50 + r * row
        draw.text((10, y + 2), name[:26], fill="black")
        for i, split in enumerate(splits):
            share = shares[split].get(name, 0.0)
            length = int((width - label_w - 70) * share / top)
            colour = split_colours[i % len(split_colours)]
            draw.rectangle([label_w, y + i * bar, label_w + max(length, 1), y + (i + 1) * bar - 2], fill=colour)
            draw.text((label_w + length + 4, y + i * bar - 1), f"{100 * share:.1f}%", fill="black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_report(report: CheckReport, out_dir: str | Path) -> dict[str, Path]:
    """report.json and class_frequencies.png in `out_dir` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"json": write_json(out_dir / "report.json", report.to_dict()),
            "chart": frequency_chart(report, out_dir / "class_frequencies.png")}


# ---- converting ---------------------------------------------------------------------------------
def copy_image(source: Path, target: Path, link: bool) -> None:
    """A hard link where the file system allows it (`link`), else an atomic copy."""
    if link:
        try:
            target.unlink(missing_ok=True)
            os.link(source, target)
            return
        except OSError:
            pass
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def convert_dataset(root: str | Path, out: str | Path, layout: str = "auto", palette_file: str | Path | None = None,
                    classes: Sequence[str] | int | None = None, reduce_zero_label: bool | None = None,
                    ignore_value: int | None = None, options: dict | None = None, link: bool = True,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `out` as a clean folder dataset with index PNG masks and `out/recipe.yaml`; `root` is only read.

    Args:
        root: the dataset to convert (any layout `check_dataset` reads).
        out: the output folder (must not be `root` or inside it).
        layout: as `check_dataset`.
        palette_file: colour table of RGB colour masks (default: the colours found).
        classes: class names in index order, or their number.
        reduce_zero_label: stored 0 means "unlabelled" (applied: the output's 0 is the first class).
        ignore_value: stored value of unlabelled pixels (written as 255).
        options: layout options, as `check_dataset`.
        link: hard-link images instead of copying them where possible.
        progress: called with one line per split.

    Returns:
        {"out", "recipe", "protocol" (dict), "masks" (count written), "images"}.
    """
    root_path, out_path = Path(root).resolve(), Path(out).resolve()
    if root_path.exists() and (out_path == root_path or root_path in out_path.parents or out_path in root_path.parents):
        raise UserError(f"output folder {out} overlaps the source {root}; choose a folder outside it "
                        f"(the source is never written)")
    report = check_dataset(root, layout, None, classes, palette_file, reduce_zero_label, ignore_value, options)
    if report.problems:
        raise UserError(f"{root}: {len(report.problems)} problem(s) to fix first (`upernet data check {root}` lists "
                        f"them); the first: {report.problems[0]}")
    protocol = report.protocol
    masks = images = 0
    for split, listing in report.listings.items():
        img_dir, ann_dir = out_path / "img_dir" / split, out_path / "ann_dir" / split
        for pair in listing.pairs:
            # the check above decoded every file; an image file is now only copied
            image_name, image, mask_name, mask = read_pair(listing, pair, with_image=pair.image is None)
            labels = index_mask(mask, protocol, mask_name)
            key = pair.name if pair.row is None else f"{pair.row:06d}"
            (ann_dir / key).parent.mkdir(parents=True, exist_ok=True)
            (img_dir / key).parent.mkdir(parents=True, exist_ok=True)
            if pair.image is not None:
                copy_image(pair.image, img_dir / f"{key}{suffix_of(pair.image, image_name)}", link)
            else:
                atomic_write(img_dir / f"{key}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            write_index_png(labels, ann_dir / f"{key}.png")
            masks, images = masks + 1, images + 1
        if progress:
            progress(f"{split}: {len(listing.pairs)} pairs written")
    data = report.recipe_data(str(out_path), converted=True)
    recipe = write_recipe(out_path / "recipe.yaml", data, report)
    return {"out": out_path, "recipe": recipe, "protocol": protocol.to_dict(), "masks": masks, "images": images}


def suffix_of(path: Path, name: str) -> str:
    """The image suffix to keep in the output (.jpg, .png, ... or a longer Cityscapes ending)."""
    return next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)


def write_recipe(path: Path, data: dict[str, Any], report: CheckReport) -> Path:
    """The built-in recipe with `data` replaced: `upernet train PATH` takes it as it is."""
    recipe = to_dict(load_config(None))
    recipe["data"].update(data)
    config = config_from_dict(recipe, source=str(path))  # checked before it is written
    notes = "\n".join(f"#   {n}" for n in report.protocol.notes + report.protocol.undecided)
    header = (f"# Written by `upernet data convert {report.root}`: the built-in recipe (a small ResNet-18 UPerNet "
              f"from scratch)\n# on the converted folder. Label protocol:\n{notes}\n")
    return write_text(path, header + dump_config(config))
