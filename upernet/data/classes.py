"""Class names, palettes and normalisation of the standard datasets, and `model.meta` helpers.

The names and colours are those of mmsegmentation's dataset classes (`ADE20KDataset`,
`CityscapesDataset` in trainId order, `PascalVOCDataset` with background), so that label maps
and colour maps read the same as theirs. mmsegmentation writes ADE20K's "bed" with a trailing
space; we strip it.
"""
from __future__ import annotations

import colorsys
from typing import Any, Sequence

from ..errors import UserError

# ImageNet statistics on the 0-255 scale, as mmsegmentation's data preprocessor uses them.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

# Cityscapes in trainId order (the `*_labelTrainIds.png` values 0..18).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Pascal VOC 2012: background is class 0.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(num_classes: int = 21) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map: the bits of the class index spread over R, G, B from the top bit down."""
    colours = []
    for index in range(num_classes):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC_PALETTE = voc_palette(21)

# Per dataset: what `predict` and `eval` need besides the weights. `test_size` and `inference`
# are the test settings of the published UPerNet recipes (keep-ratio resize, whole or slide).
DATASET_META: dict[str, dict[str, Any]] = {
    "ade20k": {"dataset": "ade20k", "class_names": list(ADE20K_CLASSES), "palette": [list(c) for c in ADE20K_PALETTE],
               "test_size": "2048x512"},
    "cityscapes": {"dataset": "cityscapes", "class_names": list(CITYSCAPES_CLASSES),
                   "palette": [list(c) for c in CITYSCAPES_PALETTE], "test_size": "2048x1024",
                   "inference": {"mode": "slide", "crop_size": [512, 1024], "stride": [768, 768]}},
    "voc": {"dataset": "voc", "class_names": list(VOC_CLASSES), "palette": [list(c) for c in VOC_PALETTE],
            "test_size": "2048x512"},
}


def default_palette(num_classes: int) -> list[list[int]]:
    """`num_classes` distinct, deterministic colours: golden-ratio hue steps, alternating brightness."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        saturation = 0.65 + 0.35 * ((i // 2) % 2)
        value = 1.0 if i % 2 == 0 else 0.75
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append([round(r * 255), round(g * 255), round(b * 255)])
    return colours


def _dataset_of(class_names: Sequence[str] | None) -> str:
    """The built-in dataset whose class names these are (ignoring surrounding spaces), else ""."""
    names = [str(n).strip() for n in class_names or ()]
    return next((key for key, meta in DATASET_META.items() if meta["class_names"] == names), "")


def resolve_meta(meta: dict | None, num_classes: int) -> dict[str, Any]:
    """A complete meta dict for a model with `num_classes` outputs: `meta` filled with defaults.

    Missing class names become "class_<i>", a missing palette the dataset's (if `meta["dataset"]`
    names one, or the class names are a built-in dataset's, as in converted checkpoints) or
    `default_palette`, missing mean/std the ImageNet ones. Fails if the stored names
    or palette do not have one entry per class.
    """
    meta = dict(meta or {})
    base = DATASET_META.get(meta.get("dataset", "") or _dataset_of(meta.get("class_names")), {})
    out = {**base, **meta}
    out.setdefault("class_names", [f"class_{i}" for i in range(num_classes)])
    out.setdefault("palette", default_palette(num_classes))
    out.setdefault("mean", list(IMAGENET_MEAN))
    out.setdefault("std", list(IMAGENET_STD))
    for key in ("class_names", "palette"):
        if len(out[key]) != num_classes:
            raise UserError(f"model meta {key!r} has {len(out[key])} entries but the model has {num_classes} classes")
    if not len(out["mean"]) == len(out["std"]) >= 1:  # one per input channel (`model.in_channels`)
        raise UserError(f"model meta mean/std need one value per input channel each, got {out['mean']} and {out['std']}")
    return out


def set_meta(
    model: Any,
    dataset: str | None = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **extra: Any,
) -> dict[str, Any]:
    """Fill `model.meta` (saved in config.json) with what predict and eval need; returns it.

    Args:
        model: a model with `num_classes` and a `meta` dict.
        dataset: "ade20k", "cityscapes" or "voc" for the built-in names, palette and test settings.
        class_names: names overriding the dataset's (one per class).
        palette: RGB colours overriding the dataset's (one per class); default `default_palette`.
        mean: per-channel normalisation mean on the 0-255 scale.
        std: per-channel normalisation std on the 0-255 scale.
        **extra: further JSON-able entries (e.g. `test_size="2048x512"`).
    """
    if dataset is not None and dataset not in DATASET_META:
        raise UserError(f"unknown dataset {dataset!r}; built-in ones: {', '.join(DATASET_META)}")
    meta = dict(DATASET_META[dataset]) if dataset else {}
    if class_names is not None:
        meta["class_names"] = [str(n) for n in class_names]
    if palette is not None:
        meta["palette"] = [[int(v) for v in c] for c in palette]
    meta["mean"] = [float(v) for v in mean]
    meta["std"] = [float(v) for v in std]
    meta.update(extra)
    meta = resolve_meta(meta, model.num_classes)
    model.meta = meta
    return meta
