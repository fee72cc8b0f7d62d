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
An item is {"image": float (3, H, W) normalised, "targets": {task: tensor}, "source": name}.
"""
from __future__ import annotations

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
