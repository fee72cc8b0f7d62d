"""What a mask file stores, and how its values become training labels.

A mask is one of a few kinds (`MASK_KINDS`): single-channel class indices (8- or 16-bit), a palette
PNG (indices with colours attached, as VOC's), an RGB colour-coded image (one colour per class), an
RGB image whose three channels are equal (indices saved as RGB), or a binary mask (0/255 or 0/1).
`LabelProtocol` says how stored values map to training labels (0..num_classes-1, 255 = ignore) and
`index_mask` applies it; `write_index_png` writes the result atomically (a failure never leaves half
a PNG). `upernet.data.check` decides the protocol of a whole dataset from these per-file facts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from ..io import atomic_write

IGNORE = 255
MASK_KINDS = {
    "index": "single-channel 8-bit class indices",
    "index_16bit": "single-channel 16-bit class indices",
    "palette": "palette PNG (indices with a colour table, as VOC's)",
    "grey_rgb": "RGB image with three equal channels (indices saved as RGB)",
    "rgb": "RGB colour-coded (one colour per class)",
    "binary_255": "binary 0/255",
    "binary_01": "binary 0/1",
}
# More colours than this in one RGB mask: a photo or a JPEG-compressed mask, not a colour code.
MAX_COLOURS = 256


def colour_code(rgb: np.ndarray) -> np.ndarray:
    """One integer per pixel of an (..., 3) array: r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def code_colour(code: int) -> list[int]:
    """[r, g, b] of a `colour_code`."""
    return [(code >> 16) & 255, (code >> 8) & 255, code & 255]


@dataclass
class MaskFacts:
    """What one mask file stores.

    Attributes:
        kind: one of `MASK_KINDS`.
        mode: the PIL mode of the file.
        size: (H, W).
        counts: pixels per stored value (per `colour_code` for the "rgb" kind).
        colours: for palette PNGs, the colour of each stored index.
    """

    kind: str
    mode: str
    size: tuple[int, int]
    counts: dict[int, int]
    colours: dict[int, list[int]] = field(default_factory=dict)


def mask_values(img: Image.Image) -> tuple[str, np.ndarray]:
    """(storage kind, array) of a decoded mask: (H, W) values, or (H, W) colour codes for "rgb".

    The storage kind is refined into binary kinds by `inspect_mask` from the values found.
    """
    mode = img.mode
    if mode == "P":
        return "palette", np.asarray(img)
    if mode == "1":
        return "binary_01", np.asarray(img).astype(np.uint8)
    if mode == "L":
        return "index", np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return "index_16bit", np.asarray(img).astype(np.int64)
    if mode == "LA":
        return "index", np.asarray(img.getchannel("L"))
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return "grey_rgb", rgb[..., 0]
        return "rgb", colour_code(rgb)
    raise UserError(f"masks of PIL mode {mode} are not supported; save masks as single-channel PNGs (mode L)")


def inspect_mask(img: Image.Image) -> MaskFacts:
    """The kind, size and value counts of a decoded mask."""
    kind, values = mask_values(img)
    found, counts = np.unique(values, return_counts=True)
    count_map = {int(v): int(c) for v, c in zip(found, counts)}
    if kind in ("index", "grey_rgb", "binary_01") and count_map:
        keys = set(count_map)
        if keys <= {0, 255} and 255 in keys:
            kind = "binary_255"
        elif keys <= {0, 1}:
            kind = "binary_01"
    colours = {}
    if img.mode == "P":
        table = img.getpalette() or []
        colours = {v: list(table[3 * v: 3 * v + 3]) for v in count_map if len(table) >= 3 * v + 3}
    return MaskFacts(kind, img.mode, (img.height, img.width), count_map, colours)


@dataclass
class LabelProtocol:
    """How stored mask values become training labels (0..num_classes-1, `ignore_index` = ignored).

    Attributes:
        classes: class names, index order.
        palette: one RGB colour per class.
        reduce_zero_label: stored 0 is "unlabelled" and every other value is shifted down by one.
        ignore_index: the training label of unlabelled pixels (255 throughout upernet).
        mask_kind: the dataset's mask kind (one of `MASK_KINDS`, or "mixed").
        value_map: stored value (or `colour_code` for RGB masks) -> training label; values not in it
            are errors when converting.
        needs_conversion: the masks cannot be read as they are (`upernet data convert` writes index PNGs).
        notes: how each decision was made, one sentence each.
        undecided: decisions taken by default, each naming the option that changes it.
    """

    classes: list[str]
    palette: list[list[int]]
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE
    mask_kind: str = "index"
    value_map: dict[int, int] = field(default_factory=dict)
    needs_conversion: bool = False
    notes: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def recipe_options(self, converted: bool = False) -> dict[str, Any]:
        """The `data.options` of a folder recipe: classes, palette, reduce_zero_label (False after
        conversion, which already applied it)."""
        return {"classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "reduce_zero_label": False if converted else self.reduce_zero_label}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the recipe fields plus how they were decided."""
        return {**self.recipe_options(), "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "mask_kind": self.mask_kind, "needs_conversion": self.needs_conversion,
                "value_map": {str(k): v for k, v in sorted(self.value_map.items())},
                "notes": list(self.notes), "undecided": list(self.undecided)}


def index_mask(img: Image.Image, protocol: LabelProtocol, name: str | Path) -> np.ndarray:
    """The training labels (uint8 (H, W), 255 = ignore) of a decoded mask under `protocol`.

    Stored values (or colours) the protocol does not know are an error naming the file.
    """
    _, values = mask_values(img)
    found = np.unique(values)
    unknown = [int(v) for v in found if int(v) not in protocol.value_map]
    if unknown:
        shown = [tuple(code_colour(v)) for v in unknown[:8]] if protocol.mask_kind == "rgb" else unknown[:8]
        what = "colours" if protocol.mask_kind == "rgb" else "values"
        raise UserError(f"mask {name} has {what} {shown}{' ...' if len(unknown) > 8 else ''} that are not in the "
                        f"label table; add them to the palette file (--palette, with their class or under "
                        f"'ignore') or fix the mask")
    out = np.full(values.shape, protocol.ignore_index, dtype=np.uint8)
    for value in found:
        out[values == value] = protocol.value_map[int(value)]
    return out


def write_index_png(labels: np.ndarray, path: str | Path) -> Path:
    """Write uint8 labels as a single-channel PNG, atomically (a failure leaves no partial file)."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"expected (H, W) uint8 labels, got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels)  # uint8 (H, W): mode L
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_palette_file(path: str | Path) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """(classes, colours, ignore colours) of a palette file for RGB colour masks.

    The file is YAML or JSON, either `{classes: [...], palette: [[r, g, b], ...], ignore: [[r, g, b]]}`
    (`ignore` optional) or a mapping `{name: [r, g, b], ...}` in class order.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"palette file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"palette file {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), dict):  # a recipe: its data.options
        data = data["data"].get("options", {})
    ignore: list = []
    if isinstance(data, dict) and "palette" in data:
        classes, colours, ignore = data.get("classes"), data["palette"], data.get("ignore") or []
        if classes is None:
            classes = [f"class_{i}" for i in range(len(colours))]
    elif isinstance(data, dict) and data:
        classes, colours = list(data), list(data.values())
    else:
        raise UserError(f"palette file {path}: expected {{classes: [...], palette: [[r, g, b], ...]}} or "
                        f"{{name: [r, g, b], ...}}")
    def rgb_list(items: Sequence, what: str) -> list[list[int]]:
        out = []
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                               for c in item)):
                raise UserError(f"palette file {path}: {what} entry {item!r} is not [r, g, b] with values 0-255")
            out.append([int(c) for c in item])
        return out
    colours, ignore = rgb_list(colours, "palette"), rgb_list(ignore, "ignore")
    if len(classes) != len(colours):
        raise UserError(f"palette file {path}: {len(classes)} classes but {len(colours)} colours")
    repeated = [c for c, n in Counter(map(tuple, colours + ignore)).items() if n > 1]
    if repeated:
        raise UserError(f"palette file {path}: colour(s) {repeated} listed twice; give each colour once")
    return [str(c) for c in classes], colours, ignore
