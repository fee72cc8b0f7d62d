"""Heterogeneously annotated data for Unified Perceptual Parsing: several sources, each labelling
only some tasks (object, part, material, scene, texture).

Two ways in:
  - built-in: `builtin_sources(...)` generates lake scenes (see `synthetic.py`) with object, part,
    material and scene labels plus texture crops, split into sources like Broden+'s (ADE20K-like
    objects+scenes, Pascal-Part-like objects+parts, OpenSurfaces-like materials, DTD-like textures);
  - Broden+-style folders: `BrodenFolder(root, source, split)`, layout in the README:
      root/meta.json            {"objects": [...], "parts": {"boat": ["background", "hull", ...]},
                                 "materials": [...], "scenes": [...], "textures": [...],
                                 "sources": {"NAME": {"tasks": ["object", "part"]}, ...}}
      root/NAME/SPLIT/images/ID.jpg|png
      root/NAME/SPLIT/{object,part,material}/ID.png   (one per annotated pixel task; 255 = unlabelled)
      root/NAME/SPLIT/labels.json {"ID": {"scene": k, "texture": k}}  (image-level tasks)
  - Broden+ as its authors lay it out (root = their repository after download_Broden+.sh):
    `BrodenPlusSource(root, "ade20k" | "pascal" | "os", split)`, chosen by `build_sources` when
    root/meta_file exists.
An item is {"image": float (3, H, W) normalised, "targets": {task: tensor}, "source": name}.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import MissingFile, UserError
from ..io import read_json
from .pascal_part import load_mat, part_codes, read_context_labels, read_part2ind, read_part_annotation
from .synthetic import (BOAT, BUOY, PIER, REEDS, SHORE, SKY, SYNTHETIC_CLASSES, WATER, sample_generator,
                        synthetic_sample, uniform)
from .transforms import (IGNORE_INDEX, normalize, pad_pair, photometric_distortion, random_crop, random_flip,
                         random_resize, rescale_size, resize_pair, to_image_tensor)

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

BUILTIN_PARTS = {"pier": ["background", "plank", "gap"], "boat": ["background", "hull", "deck"]}
BUILTIN_MATERIALS = ["water", "sand", "foliage", "wood", "paint", "plastic"]
BUILTIN_SCENES = ["open lake", "marsh", "harbour"]
BUILTIN_TEXTURES = ["striped", "speckled", "smooth", "dotted"]
# Each object is made of one material; the sky has none (unlabelled).
_MATERIAL_OF = {SKY: IGNORE_INDEX, WATER: 0, SHORE: 1, REEDS: 2, PIER: 3, BOAT: 4, BUOY: 5}
BUILTIN_SOURCES = {  # name: (tasks it annotates, number of training samples)
    "scenes_objects": (("object", "scene"), 600),
    "parts": (("object", "part"), 300),
    "materials": (("material",), 300),
    "textures": (("texture",), 400),
}


def part_layout(objects: Sequence[str], parts: dict[str, list[str]]) -> dict:
    """The `tasks["part"]` argument of `MultiTaskUPerNet` from class lists."""
    return {"objects": [list(objects).index(o) for o in parts], "num_parts": [len(p) for p in parts.values()]}


def builtin_tasks() -> dict:
    """Class counts per task of the built-in data, the `tasks` argument of `upernet_multitask_*`."""
    return {"object": len(SYNTHETIC_CLASSES), "part": part_layout(SYNTHETIC_CLASSES, BUILTIN_PARTS),
            "material": len(BUILTIN_MATERIALS), "scene": len(BUILTIN_SCENES), "texture": len(BUILTIN_TEXTURES)}


def multitask_sample(index: int, seed: int, split: str, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A lake scene with every label: object and part/material maps, scene class."""
    image, objects = synthetic_sample(index, seed, split, image_size)
    objects = objects.long()
    # Parts. Boat: its lowest rows are the hull, the rest the deck. Pier: bright stripes are planks,
    # dark ones the gaps between them (brightness against the 5x5 neighbourhood).
    part = torch.full_like(objects, IGNORE_INDEX)
    boat = objects == BOAT
    below = F.pad(boat, (0, 0, 0, 3), value=False)[3:]
    part[boat] = 2
    part[boat & ~below] = 1
    grey = image.float().mean(0, keepdim=True)[None]
    local = F.avg_pool2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0, 0]
    pier = objects == PIER
    part[pier] = torch.where(grey[0, 0] >= local, 1, 2)[pier]
    material = torch.tensor([_MATERIAL_OF[c] for c in range(len(SYNTHETIC_CLASSES))])[objects]
    present = set(torch.unique(objects).tolist())
    scene = 2 if PIER in present else 1 if REEDS in present else 0  # harbour, marsh, open lake
    return image, {"object": objects, "part": part, "material": material, "scene": torch.tensor(scene)}


def texture_sample(index: int, seed: int, split: str, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A DTD-like texture crop: striped (any orientation), speckled, smooth or dotted."""
    g = sample_generator(seed + 7, split, index)
    kind = int(torch.randint(0, len(BUILTIN_TEXTURES), (), generator=g))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    base = torch.rand(3, 1, 1, generator=g) * 150 + 50
    if kind == 0:
        angle, period = uniform(g, 0, math.pi), uniform(g, 4, 10)
        pattern = torch.sign(torch.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period))
    elif kind == 1:
        pattern = torch.randn(size, size, generator=g)
    elif kind == 2:
        coarse = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
        pattern = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    else:
        period = uniform(g, 8, 14)
        pattern = (((ys % period) - period / 2) ** 2 + ((xs % period) - period / 2) ** 2 < (period / 4) ** 2).float() * 2 - 1
    image = base + 40 * pattern + 4 * torch.randn(3, size, size, generator=g)
    return image.clamp(0, 255).round().to(torch.uint8), torch.tensor(kind)


class BuiltinSource(Dataset):
    """One source of the built-in multi-task data: only the labels of `tasks` are given.

    Args:
        name: source name (a key of `BUILTIN_SOURCES`, or any name with explicit `tasks`).
        split: "train" or "val" (or any name; each split has its own scenes).
        tasks: the tasks this source annotates; default from `BUILTIN_SOURCES`.
        num_samples: number of samples; default from `BUILTIN_SOURCES` (train) or 60 (other splits).
        image_size: scene side (texture crops are half of it).
        seed: dataset seed.
        flip: random horizontal flips (training; used when no `transform` is given).
        transform: `(uint8 image, targets) -> (normalised image, targets)`, e.g. `MultiTaskTransform`;
            None normalises with the ImageNet mean/std (after the optional flip).
    """

    def __init__(self, name: str, split: str = "train", tasks: Sequence[str] | None = None,
                 num_samples: int | None = None, image_size: int = 96, seed: int = 0, flip: bool = False,
                 transform=None):
        default_tasks, default_size = BUILTIN_SOURCES.get(name, ((), 0))
        self.name, self.split, self.seed, self.image_size, self.flip = name, split, seed, image_size, flip
        self.transform = transform
        self.tasks = tuple(tasks or default_tasks)
        if not self.tasks:
            raise UserError(f"built-in source {name!r}: unknown name and no tasks given ({', '.join(BUILTIN_SOURCES)})")
        self.num_samples = num_samples or (default_size if split == "train" else 60)
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if index not in self._cache:
            if self.tasks == ("texture",):
                image, label = texture_sample(index, self.seed, f"{self.name}/{self.split}", self.image_size // 2)
                targets = {"texture": label}
            else:
                image, labels = multitask_sample(index, self.seed, f"{self.name}/{self.split}", self.image_size)
                targets = {t: labels[t] for t in self.tasks}
            self._cache[index] = (image, targets)
        image, targets = self._cache[index]
        if self.transform is not None:
            image, targets = self.transform(image, targets)
            return {"image": image, "targets": targets, "source": self.name}
        image = image.float()
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            targets = {t: v.flip(-1) if v.dim() == 2 else v for t, v in targets.items()}
        return {"image": normalize(image, IMAGENET_MEAN, IMAGENET_STD), "targets": targets, "source": self.name}


def builtin_meta() -> dict:
    return {"objects": list(SYNTHETIC_CLASSES), "parts": BUILTIN_PARTS, "materials": BUILTIN_MATERIALS,
            "scenes": BUILTIN_SCENES, "textures": BUILTIN_TEXTURES}


def builtin_sources(split: str = "train", image_size: int = 96, seed: int = 0,
                    num_samples: int | None = None, transform=None) -> list[BuiltinSource]:
    """Every built-in source of `split`; `num_samples` per source overrides the defaults."""
    return [BuiltinSource(name, split, num_samples=num_samples, image_size=image_size, seed=seed,
                          flip=split == "train", transform=transform) for name in BUILTIN_SOURCES]


def read_broden_meta(root: str | Path) -> dict:
    """meta.json of a Broden+-style folder: class lists per task, the object-part hierarchy, sources."""
    meta_file = Path(root) / "meta.json"
    if not meta_file.is_file():
        raise MissingFile(f"{meta_file}: a Broden+-style folder needs meta.json (see the README)")
    meta = read_json(meta_file)
    for key in ("objects", "sources"):
        if key not in meta:
            raise UserError(f"{meta_file}: missing the {key!r} entry")
    for key in ("parts", "materials", "scenes", "textures"):
        meta.setdefault(key, {} if key == "parts" else [])
    return meta


class BrodenFolder(Dataset):
    """One source of a Broden+-style folder (layout in the module docstring).

    Args:
        root: the folder holding meta.json.
        source: a source name listed in meta.json.
        split: split folder name.
        transform: `(uint8 image, targets) -> (normalised image, targets)`, e.g. `MultiTaskTransform`;
            None normalises with the ImageNet mean/std.
    """

    PIXEL_TASKS = ("object", "part", "material")

    def __init__(self, root: str | Path, source: str, split: str = "train", transform=None):
        self.root, self.name, self.transform = Path(root), source, transform
        meta_file = self.root / "meta.json"
        self.meta = read_broden_meta(root)
        if source not in self.meta.get("sources", {}):
            raise UserError(f"{meta_file}: no source {source!r}; it lists {sorted(self.meta.get('sources', {}))}")
        self.tasks = tuple(self.meta["sources"][source]["tasks"])
        self.folder = self.root / source / split
        images = sorted(p for p in (self.folder / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise UserError(f"{self.folder / 'images'}: empty split (no .jpg/.png images)")
        self.ids = [p.stem for p in images]
        self.images = {p.stem: p for p in images}
        labels_file = self.folder / "labels.json"
        self.image_labels = read_json(labels_file) if labels_file.is_file() else {}
        for task in self.tasks:
            if task in self.PIXEL_TASKS:
                missing = [i for i in self.ids if not (self.folder / task / f"{i}.png").is_file()]
                if missing:
                    raise UserError(f"{self.folder / task}: no {task} mask for {len(missing)} images, e.g. {missing[:3]}")
            else:
                missing = [i for i in self.ids if task not in self.image_labels.get(i, {})]
                if missing:
                    raise UserError(f"{labels_file}: no {task!r} label for {len(missing)} images, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        with Image.open(self.images[image_id]) as img:
            image = to_image_tensor(img.convert("RGB"))
        targets = {}
        for task in self.tasks:
            if task in self.PIXEL_TASKS:
                path = self.folder / task / f"{image_id}.png"
                with Image.open(path) as mask:
                    targets[task] = torch.from_numpy(np.array(mask)).long()
                if targets[task].shape != image.shape[-2:]:
                    raise UserError(f"{path}: mask {tuple(targets[task].shape)} vs image {tuple(image.shape[-2:])}")
            else:
                targets[task] = torch.tensor(int(self.image_labels[image_id][task]))
        if self.transform is not None:
            image, targets = self.transform(image, targets)
            return {"image": image, "targets": targets, "source": self.name}
        return {"image": normalize(image.float(), IMAGENET_MEAN, IMAGENET_STD), "targets": targets, "source": self.name}


class SourceSampler:
    """Which source each iteration trains on: drawn with probability proportional to source size.

    The draw depends only on (seed, iteration), so every DDP process picks the same source.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0):
        self.weights = torch.tensor(sizes, dtype=torch.float64)
        self.seed = seed

    def __call__(self, iteration: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        return int(torch.multinomial(self.weights, 1, generator=g))


# ---- augmentation -------------------------------------------------------------------------------
class MultiTaskTransform:
    """The pipeline of `data.*` (as `transforms.TrainTransform` / `EvalTransform`) on an image and every
    label of a multi-task sample: pixel labels (object, part, material) are resized, cropped, flipped
    and padded with the image; image-level labels (scene, texture) pass through.

    Args:
        crop_size: (H, W) of the random crop and padded output; None keeps the whole image.
        scale: (long, short) of RandomResize (training) or of the keep-ratio resize (evaluation); None: no resize.
        ratio_range: range of the RandomResize ratio (training).
        cat_max_ratio: largest share one label may take in a crop, over the pixel labels together.
        flip_prob: probability of a horizontal flip.
        photometric: apply PhotoMetricDistortion.
        mean: per-channel mean, 0-255 scale.
        std: per-channel std, 0-255 scale.
        train: random training pipeline; else the evaluation resize (the labels are resized with the
            image, nearest, since the multi-task metrics compare at the model's input size).
    """

    def __init__(self, crop_size: Sequence[int] | None, scale: Sequence[int] | None,
                 ratio_range: Sequence[float] | None, cat_max_ratio: float, flip_prob: float, photometric: bool,
                 mean: Sequence[float], std: Sequence[float], train: bool = True):
        self.crop_size = tuple(crop_size) if crop_size else None
        self.scale = tuple(scale) if scale else None
        self.ratio_range = tuple(ratio_range) if ratio_range else (1.0, 1.0)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean, self.std, self.train = tuple(mean), tuple(std), train

    def __call__(self, image: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        pixel = [t for t, v in targets.items() if v.dim() == 2]
        stack = [targets[t].long() for t in pixel] or [torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.long)]
        mask = tv_tensors.Mask(torch.stack(stack))
        if not self.train:
            if self.scale:
                image, mask = resize_pair(image, mask, rescale_size(*image.shape[-2:], self.scale))
        else:
            if self.scale:
                image, mask = random_resize(image, mask, self.scale, self.ratio_range)
            if self.crop_size:
                image, mask = random_crop(image, mask, self.crop_size, self.cat_max_ratio)
            if self.flip_prob > 0:
                image, mask = random_flip(image, mask, self.flip_prob)
            if self.photometric:
                image = photometric_distortion(image)
        image = normalize(image, self.mean, self.std)
        if self.train and self.crop_size:
            image, mask = pad_pair(image, mask, self.crop_size)
        mask = mask.as_subclass(torch.Tensor)
        out = {t: (mask[pixel.index(t)] if t in pixel else v) for t, v in targets.items()}
        return image, out


def multitask_transform(config, train: bool) -> MultiTaskTransform:
    """The training or evaluation pipeline of a recipe's `data` section."""
    d = config.data
    return MultiTaskTransform(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.flip_prob, d.photometric,
                              d.mean, d.std, train=train)


# ---- the sources of a recipe -----------------------------------------------------------------
MULTITASK_KINDS = ("multitask_synthetic", "upp_builtin", "broden")  # upp_builtin: old name of multitask_synthetic
PIXEL_TASKS = ("object", "material")


def build_sources(config, split: str, train: bool = False) -> tuple[list[Dataset], dict]:
    """The sources of a split (those of `multitask.sources`, else all) and the class lists (meta) of
    the data, with the training (`train`) or evaluation pipeline of the recipe's `data` section."""
    d = config.data
    transform = multitask_transform(config, train)
    wanted = list(config.multitask.sources)
    if d.kind in ("multitask_synthetic", "upp_builtin"):
        size = int(d.options.get("image_size", 96))
        count = d.options.get("val_samples") if split == d.val_split else None
        sources = builtin_sources(split, image_size=size, seed=config.train.seed, num_samples=count,
                                  transform=transform)
        unknown = sorted(set(wanted) - {s.name for s in sources})
        if unknown:
            raise UserError(f"multitask.sources: no source {unknown} in the built-in data; it has "
                             f"{', '.join(BUILTIN_SOURCES)}")
        return [s for s in sources if not wanted or s.name in wanted], builtin_meta()
    if d.kind == "broden" and is_broden_plus(d.root):
        return broden_plus_sources(d.root, split, wanted or d.options.get("sources") or (), transform)
    if d.kind == "broden":
        meta = read_broden_meta(d.root)
        names = wanted or d.options.get("sources") or list(meta["sources"])
        return [BrodenFolder(d.root, name, split, transform) for name in names], meta
    raise UserError(f"data.kind {d.kind!r} is not a multi-task kind ({', '.join(MULTITASK_KINDS)})")


def tasks_of(meta: dict) -> dict:
    """The `tasks` argument of the multi-task model from the class lists of the data."""
    tasks = {"object": len(meta["objects"]), "material": len(meta["materials"]), "scene": len(meta["scenes"]),
             "texture": len(meta["textures"])}
    if meta.get("parts"):
        tasks["part"] = part_layout(meta["objects"], meta["parts"])
    return {k: v for k, v in tasks.items() if v}


def collate(items: list[dict]) -> dict:
    """One batch of one source: stacked images and targets, and the source's name."""
    tasks = items[0]["targets"].keys()
    return {"image": torch.stack([it["image"] for it in items]),
            "targets": {t: torch.stack([it["targets"][t] for it in items]) for t in tasks},
            "source": items[0]["source"]}


# ---- Broden+ as its authors lay it out (CSAILVision/unifiedparsing) ----------------------------------
# data.root is their repository after download_Broden+.sh: the records and label sets in meta_file/,
# the images and annotations of each dataset in broden_dataset/. Labels are decoded as their
# broden_dataset_utils do and mapped to Broden+ classes through label_assignment.csv; "-" (class 0 of
# objects and materials) becomes IGNORE_INDEX, which their losses and metrics ignore.
BRODEN_PLUS_SOURCES = {"ade20k": ("object", "part", "scene"), "pascal": ("object", "part"), "os": ("material",)}
BRODEN_PLUS_RECORDS = {"ade20k": "broden_ade20k_pascal", "pascal": "broden_ade20k_pascal", "os": "broden_os"}
BRODEN_PLUS_SPLITS = {"train": "train", "val": "val", "validation": "val"}
BRODEN_PLUS_SCORING = "unifiedparsing"  # meta["scoring"]: evaluation follows their eval_multipro.py
GET_BRODEN_PLUS = "clone CSAILVision/unifiedparsing and run download_Broden+.sh in it (data.root = that folder)"


def is_broden_plus(root: str | Path) -> bool:
    """True when `root` is laid out as the authors' repository (meta_file/joint_dataset/ exists)."""
    return (Path(root) / "meta_file" / "joint_dataset").is_dir()


def decode_class_mask(rgb: np.ndarray) -> np.ndarray:
    """ADE20K's object/part PNG encoding: class = R // 10 * 256 + G (their `decodeClassMask`)."""
    return (rgb[:, :, 0].astype(np.int64) // 10) * 256 + rgb[:, :, 1].astype(np.int64)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header, as dicts; a missing file says how to get Broden+."""
    if not path.is_file():
        raise MissingFile(f"{path}: missing; {GET_BRODEN_PLUS}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_records(path: Path) -> list[dict]:
    """Their record files: one JSON object per line ({"dataset", "file_index", "height", "width", ...})."""
    if not path.is_file():
        raise MissingFile(f"{path}: missing; {GET_BRODEN_PLUS}")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{number}: not a JSON record; restore the file from their repository") from None
    return records


def read_label_image(path: Path) -> np.ndarray:
    """An annotation PNG as (H, W, 3) uint8 RGB, as their `imread` reads it."""
    if not path.is_file():
        raise MissingFile(f"{path}: missing annotation; {GET_BRODEN_PLUS}")
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


class BrodenPlusLabels:
    """The Broden+ label sets of their meta_file/joint_dataset: class names, the mapping of each
    dataset's raw labels to Broden+ classes, and the object-part hierarchy.

    Args:
        meta_dir: their meta_file folder.
    """

    def __init__(self, meta_dir: str | Path):
        joint = Path(meta_dir) / "joint_dataset"
        self.names = {task: [row["name"] for row in read_csv_rows(joint / f"{task}.csv")]
                      for task in ("object", "part", "scene", "material", "texture")}
        assignment_file = joint / "label_assignment.csv"
        pairs: dict[tuple[str, str], dict[int, int]] = {}
        for row in read_csv_rows(assignment_file):
            pairs.setdefault((row["dataset"], row["category"]), {})[int(row["raw_label"])] = int(row["broden_label"])
        self.mapping = {}  # (dataset, category) -> array raw label -> Broden+ label (unlisted raw labels: 0)
        for key, table in pairs.items():
            self.mapping[key] = np.zeros(max(table) + 1, dtype=np.int64)
            self.mapping[key][list(table)] = list(table.values())
        self.assignment_file = assignment_file
        self.object_part: dict[int, list[int]] = {}  # object label -> its part labels, 0 ("-") first
        for row in read_csv_rows(joint / "object_part_hierarchy.csv"):
            self.object_part[int(row["object_label"])] = [int(p) for p in row["part_labels"].split(";")]

    def map(self, dataset: str, category: str, raw: np.ndarray, source_file: Path) -> np.ndarray:
        """Broden+ labels of `raw` labels of `dataset`'s `category` (read from `source_file`)."""
        table = self.mapping.get((dataset, category))
        if table is None:
            raise UserError(f"{self.assignment_file}: no {dataset} {category} rows; restore the file from their repository")
        raw = np.asarray(raw, dtype=np.int64)
        if raw.size and (raw.max() >= len(table) or raw.min() < 0):
            raise UserError(f"{source_file}: raw {category} label {int(raw.max())} is not in {self.assignment_file} "
                            f"(0-{len(table) - 1}); is it a Broden+ annotation?")
        return table[raw]

    def meta(self) -> dict:
        """Class lists in our meta format; `scoring` selects their evaluation rules."""
        objects = self.names["object"]
        parts = {objects[obj]: [self.names["part"][p] for p in labels] for obj, labels in self.object_part.items()}
        return {"objects": objects, "parts": parts, "materials": self.names["material"],
                "scenes": self.names["scene"], "textures": [], "scoring": BRODEN_PLUS_SCORING}


def broden_plus_part_map(objects: np.ndarray, parts: np.ndarray, object_part: dict[int, list[int]]) -> np.ndarray:
    """One part map from Broden+ object and part labels, by their `resolve_record` rule: an object's
    parts count in an image when at least two of its part labels (background 0 included) occur in
    `parts * (objects == object)`; inside such an object a pixel holds the index of its part in the
    object's list (0 for a part not in it), everywhere else IGNORE_INDEX."""
    out = np.full(objects.shape, IGNORE_INDEX, dtype=np.int64)
    for obj, labels in object_part.items():
        inside = objects == obj
        present = np.intersect1d(labels, np.unique(parts * inside))
        if len(present) <= 1:
            continue
        out[inside] = 0
        for label in present:
            out[inside & (parts == label)] = labels.index(int(label))
    return out


class BrodenPlusSource(Dataset):
    """One dataset of Broden+ (ade20k, pascal or os) as their repository lays it out; items as
    `BrodenFolder`'s.

    Args:
        root: their repository after download_Broden+.sh (holds meta_file/ and broden_dataset/).
        source: "ade20k" (object, part, scene), "pascal" (Pascal-Context objects, Pascal-Part parts; no
            scene) or "os" (OpenSurfaces: material).
        split: "train" or "val" ("validation").
        transform: `(uint8 image, targets) -> (normalised image, targets)`, e.g. `MultiTaskTransform`;
            None normalises with the ImageNet mean/std.
        labels: the label sets, when already read (else from root/meta_file).
    """

    def __init__(self, root: str | Path, source: str, split: str = "train", transform=None,
                 labels: BrodenPlusLabels | None = None):
        self.root, self.name, self.transform = Path(root), source, transform
        self.meta_dir, self.data_dir = self.root / "meta_file", self.root / "broden_dataset"
        if source not in BRODEN_PLUS_SOURCES:
            raise UserError(f"multitask.sources: Broden+ has no source {source!r}; it has {', '.join(BRODEN_PLUS_SOURCES)}")
        if split not in BRODEN_PLUS_SPLITS:
            raise UserError(f"data split {split!r}: Broden+ has the splits train and val (validation)")
        if not self.data_dir.is_dir():
            raise MissingFile(f"{self.data_dir}: missing; {GET_BRODEN_PLUS}")
        self.tasks = BRODEN_PLUS_SOURCES[source]
        self.labels = labels or BrodenPlusLabels(self.meta_dir)
        records_file = self.meta_dir / "joint_dataset" / f"{BRODEN_PLUS_RECORDS[source]}_{BRODEN_PLUS_SPLITS[split]}.json"
        self.records = [r for r in read_records(records_file) if r.get("dataset") == source]
        if not self.records:
            raise UserError(f"{records_file}: no {source} records")
        self.part_codes: dict[tuple[int, str], int] = {}  # pascal: (object, part name) -> raw part label
        self.files = {"ade20k": self.ade20k_files, "pascal": self.pascal_files, "os": self.opensurfaces_files}[source]()
        bad = [r["file_index"] for r in self.records if not 0 <= int(r["file_index"]) < len(self.files)]
        if bad:
            raise UserError(f"{records_file}: file_index {bad[:3]} outside the {len(self.files)} {source} images of "
                            f"meta_file; restore meta_file from their repository")
        required = ("image", "object") if source == "pascal" else ("image",)  # pascal: the context .mat too
        for kind in required:
            missing = [self.files[int(r["file_index"])][kind] for r in self.records
                       if not self.files[int(r["file_index"])][kind].is_file()]
            if missing:
                raise MissingFile(f"{missing[0]}: missing, and {len(missing) - 1} more {source} {kind} files of "
                                  f"{records_file.name}; {GET_BRODEN_PLUS}")

    def ade20k_files(self) -> list[dict]:
        """Image, object and part files and raw scene of every ADE20K image, in index_ade20k.mat's order."""
        index_file = self.meta_dir / "ade20k" / "index_ade20k.mat"
        index = load_mat(index_file, GET_BRODEN_PLUS, squeeze=True)["index"]
        filenames = [str(f) for f in np.atleast_1d(index["filename"][()])]
        folders = [str(f) for f in np.atleast_1d(index["folder"][()])]
        # their scene labels: ADE20K challenge categories, "misc" read as "-", listed "-" first then sorted
        scene_file = self.meta_dir / "ade20k" / "scene_categories.txt"
        if not scene_file.is_file():
            raise MissingFile(f"{scene_file}: missing; {GET_BRODEN_PLUS}")
        scene_names = [line.split()[1] for line in scene_file.read_text().splitlines() if line.strip()]
        scene_names = ["-" if s == "misc" else s for s in scene_names]
        if len(scene_names) != len(filenames):
            raise UserError(f"{scene_file}: {len(scene_names)} lines for the {len(filenames)} images of {index_file}")
        scenes = ["-"] + sorted(set(scene_names) - {"-"})
        files = []
        for folder, filename, scene in zip(folders, filenames, scene_names):
            image = self.data_dir / "ade20k" / folder / filename
            files.append({"image": image, "object": image.with_name(image.stem + "_seg.png"),
                          "part": image.with_name(image.stem + "_parts_1.png"), "scene": scenes.index(scene)})
        return files

    def pascal_files(self) -> list[dict]:
        """Image, Pascal-Context object and Pascal-Part part files of every Annotations_Part .mat, in
        sorted file name order (their file_index), and the part codes of meta_file/pascal/part2ind.m."""
        folder = self.data_dir / "pascal"
        # their PascalSegmentation: parts in pascal/part/, or in pascal/ itself when part2ind.m is there
        part_dir = (folder if (folder / "part2ind.m").is_file() else folder / "part") / "Annotations_Part"
        if not part_dir.is_dir():
            raise MissingFile(f"{part_dir}: missing (Pascal-Part annotations); {GET_BRODEN_PLUS}")
        self.part_codes = part_codes(read_part2ind(self.meta_dir / "pascal" / "part2ind.m"))[0]
        names = sorted(p.name for p in part_dir.iterdir() if p.name.endswith(".mat"))
        return [{"image": folder / "VOC2010" / "JPEGImages" / name.replace(".mat", ".jpg"),
                 "object": folder / "context" / "trainval" / name, "part": part_dir / name} for name in names]

    def opensurfaces_files(self) -> list[dict]:
        """Image and material files of every OpenSurfaces photo, in their photos.csv's order."""
        folder = self.data_dir / "opensurfaces"
        return [{"image": folder / "photos" / f"{int(row['photo_id'])}.jpg",
                 "material": folder / "photos-labels" / f"{int(row['photo_id'])}.png"}
                for row in read_csv_rows(self.meta_dir / "opensurfaces" / "photos.csv")]

    def __len__(self) -> int:
        return len(self.records)

    def targets_of(self, files: dict, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The Broden+ labels of one image (unlabelled: IGNORE_INDEX; parts by `broden_plus_part_map`)."""
        fix = ("run their resize_images.py on both or neither" if self.name != "pascal" else  # it resizes no pascal
               "the image and its annotations must come from the VOC2010, Pascal-Part and Pascal-Context downloads")

        def checked(path: Path, labels: np.ndarray) -> np.ndarray:
            if labels.shape != shape:
                raise UserError(f"{path}: annotation {labels.shape} vs image {shape}; {fix}")
            return labels

        targets = {}
        if self.name == "ade20k":
            objects = self.labels.map("ade20k", "object", checked(files["object"], decode_class_mask(
                read_label_image(files["object"]))), files["object"])
            if files["part"].is_file():  # only the first level of parts (their choice)
                raw = checked(files["part"], decode_class_mask(read_label_image(files["part"])))
                parts = broden_plus_part_map(objects, self.labels.map("ade20k", "part", raw, files["part"]),
                                             self.labels.object_part)
            else:
                parts = np.full(shape, IGNORE_INDEX, dtype=np.int64)
            scene = self.labels.map("ade20k", "scene", np.array([files["scene"]]), self.meta_dir / "ade20k")[0]
            targets = {"object": np.where(objects == 0, IGNORE_INDEX, objects), "part": parts,
                       "scene": torch.tensor(int(scene))}
        elif self.name == "pascal":  # objects from Pascal-Context, parts from Pascal-Part, no scene
            restore = "restore it from the Pascal downloads of download_Broden+.sh"
            objects = self.labels.map("pascal", "object", checked(files["object"], read_context_labels(
                files["object"], restore)), files["object"])
            raw = read_part_annotation(files["part"], self.part_codes, restore)
            if raw is None:
                parts = np.full(shape, IGNORE_INDEX, dtype=np.int64)
            else:
                parts = broden_plus_part_map(objects, self.labels.map("pascal", "part", checked(files["part"], raw),
                                                                      files["part"]), self.labels.object_part)
            targets = {"object": np.where(objects == 0, IGNORE_INDEX, objects), "part": parts}
        else:
            raw = checked(files["material"], read_label_image(files["material"])[:, :, 0])
            material = self.labels.map("os", "material", raw, files["material"])
            targets = {"material": np.where(material == 0, IGNORE_INDEX, material)}
        return {t: torch.as_tensor(v).long() if isinstance(v, np.ndarray) else v for t, v in targets.items()}

    def __getitem__(self, index: int) -> dict:
        files = self.files[int(self.records[index]["file_index"])]
        with Image.open(files["image"]) as img:
            image = to_image_tensor(img.convert("RGB"))
        targets = self.targets_of(files, tuple(image.shape[-2:]))
        if self.transform is not None:
            image, targets = self.transform(image, targets)
            return {"image": image, "targets": targets, "source": self.name}
        return {"image": normalize(image.float(), IMAGENET_MEAN, IMAGENET_STD), "targets": targets, "source": self.name}


def broden_plus_sources(root: str | Path, split: str, names: Sequence[str] = (), transform=None) -> tuple[list, dict]:
    """The Broden+ sources `names` (default: all, ade20k, pascal and os) of their layout, and the class lists."""
    labels = BrodenPlusLabels(Path(root) / "meta_file")
    sources = [BrodenPlusSource(root, name, split, transform, labels) for name in (names or BRODEN_PLUS_SOURCES)]
    return sources, labels.meta()
