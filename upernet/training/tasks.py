"""What differs between the tasks the training loop runs: the model, the batches, the loss, the
validation metrics and the metric that chooses `best.pt`. The loop (`loop.train`) is the same.

- `SegmentationTask` (`train.task=segmentation`): one label map per image, one dataset.
- `MultitaskTask` (`train.task=multitask`, Unified Perceptual Parsing): several sources, each
  annotating only some tasks (object, part, material, scene, texture). Each iteration draws one
  source with probability proportional to its size (the same draw on every process: it depends only
  on the seed and the iteration) and puts a loss only on the tasks it annotates. The texture head is
  trained after the main schedule, for `multitask.texture_iters` iterations on texture crops, with
  everything else fixed.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import Subset

from ..errors import MissingFile, UserError
from ..config import Config, note
from ..data.multitask import SourceSampler, build_sources, collate, tasks_of
from ..data.build import build_dataset
from ..data.transforms import IGNORE_INDEX, build_eval_transform, build_train_transform
from ..evaluation.evaluate import evaluate
from ..evaluation.multitask import evaluate_multitask
from ..loading import init_from
from ..models import build_model
from ..models.multitask import multitask_loss
from ..models.weights import adapt_input_channels, load_state_dict_strict
from .losses import build_loss, is_default
from .sampling import InfiniteSampler, seeded_loader


def test_time_meta(config: Config) -> dict:
    """The test-time protocol of the recipe, in the keys `predict` reads: `test_size` and `inference`."""
    scale = config.data.scale
    inference = {"mode": config.val.mode}
    if config.val.crop_size is not None:
        inference["crop_size"] = list(config.val.crop_size)
    if config.val.stride is not None:
        inference["stride"] = list(config.val.stride)
    return {"test_size": f"{max(scale)}x{min(scale)}" if scale else "none", "inference": inference}


def load_backbone_checkpoint(backbone: nn.Module, path: str) -> None:
    """Backbone weights from `path`: InternImage's ImageNet layout for InternImage, else a state dict
    of the backbone (optionally under "state_dict"/"model" and with a "backbone." prefix). Read with
    weights_only=True; a layout that does not fit is an error naming the file and the keys."""
    from ..io import load_torch_file
    from ..models.backbones.internimage import InternImage, load_classification_checkpoint

    if isinstance(backbone, InternImage):
        load_classification_checkpoint(backbone, path)
        return
    if not Path(path).is_file():
        raise MissingFile(f"{path}: no such checkpoint file (model.backbone_checkpoint)")
    state = load_torch_file(path)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict of the backbone (model.backbone_checkpoint)")
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    adapt_input_channels(state, backbone)  # RGB weights for a backbone of other model.in_channels
    load_state_dict_strict(backbone, state, path)


def start_from(config: Config, num_classes: int) -> nn.Module:
    """The model of `model.init_from` with `num_classes` outputs (`loading.init_from`). The recipe's
    `model.name` and `model.args` become the source's architecture (with the recipe's args laid over
    it when the recipe names the same variant), so that the run's config rebuilds the model on resume; the re-initialised tensors are noted."""
    model, fitted, source_meta = init_from(config.model.init_from, num_classes, config.model.args, config.model.name,
                                           config.model.in_channels)
    if config.model.name != model.config["name"]:
        note(f"model.name={config.model.name} and its model.args replaced by {model.config['name']}, the "
             f"architecture of model.init_from={config.model.init_from}")
    config.model.name = model.config["name"]
    config.model.args = {k: v for k, v in model.config["args"].items() if k != "num_classes"}
    reinitialised = ", ".join(fitted.reinitialised) or "none"
    note(f"model.init_from={config.model.init_from}: {len(fitted.copied)} tensors copied; re-initialised "
         f"(new class count {num_classes}): {reinitialised}"
         + (f"; dropped (no auxiliary head): {', '.join(fitted.dropped)}" if fitted.dropped else "")
         + (f"; adapted to model.in_channels={config.model.in_channels}: {', '.join(fitted.adapted)}"
            if fitted.adapted else ""))
    for key, ours in (("mean", config.data.mean), ("std", config.data.std)):
        theirs = source_meta.get(key)
        if theirs is not None and [round(float(v), 3) for v in theirs] != [round(float(v), 3) for v in ours]:
            note(f"data.{key}={list(ours)} differs from the {key} {list(theirs)} model.init_from was trained with")
    return model


def first_images(dataset, count: int):
    """The first `count` samples of `dataset` (all when `count` is 0)."""
    return Subset(dataset, range(min(count, len(dataset)))) if count else dataset


class SegmentationTask:
    """Semantic segmentation: `data.kind` ade20k, cityscapes, voc, folder or synthetic."""

    name = "segmentation"
    best_metric = "mIoU"
    find_unused = False

    def __init__(self, config: Config):
        self.config = config
        self.total_iters = config.schedule.iters

    def build_data(self) -> None:
        """The training and validation datasets, with the recipe's transforms."""
        d = self.config.data
        train_tf = build_train_transform(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.flip_prob,
                                         d.photometric, d.mean, d.std)
        channels = self.config.model.in_channels
        self.use_train_set(build_dataset(d.kind, d.root or None, d.train_split, train_tf, channels=channels,
                                         **d.options))
        val_set = build_dataset(d.kind, d.root or None, d.val_split, build_eval_transform(d.scale, d.mean, d.std),
                                channels=channels, **d.options)
        self.val_set = first_images(val_set, self.config.val.max_images)

    def use_train_set(self, train_set) -> None:
        """Train on `train_set`: its classes and ignore value, and the recipe's losses over them."""
        self.train_set, self.ignore_index = train_set, int(train_set.ignore_index)
        # None: plain cross-entropy, computed inside the model's forward without full-size logits
        losses = self.config.train.losses
        self.criterion = None if is_default(losses) else build_loss(
            losses, len(train_set.classes), self.ignore_index, self.config.train.loss_average, train_set)

    def build_model(self, pretrained: bool) -> nn.Module:
        """The configured variant with `num_classes` and the meta (classes, palette, mean/std, test-time
        protocol) of the data; with `pretrained`, the backbone starts from `model.backbone_checkpoint`."""
        cfg = self.config
        args = dict(cfg.model.args)
        num_classes = len(self.train_set.classes)
        binary = self.criterion is not None and self.criterion.binary
        outputs = 1 if binary else num_classes  # binary mode: one foreground logit for the 2 classes
        if args.setdefault("num_classes", outputs) != outputs:
            raise UserError(f"model.args.num_classes={args['num_classes']} but the dataset has {num_classes} classes"
                            + (" (binary_cross_entropy: 1 output channel)" if binary else ""))
        if cfg.model.in_channels != 3:  # left out at 3: saved models keep the arguments they had
            args["in_channels"] = cfg.model.in_channels
        if pretrained and cfg.model.init_from:
            model = start_from(cfg, outputs)
        else:
            model = build_model(cfg.model.name, **args)
        if pretrained and cfg.model.backbone_checkpoint:
            load_backbone_checkpoint(model.backbone, cfg.model.backbone_checkpoint)
        model.meta = {"class_names": list(self.train_set.classes),
                      "palette": [list(c) for c in self.train_set.palette],
                      "mean": list(cfg.data.mean), "std": list(cfg.data.std), "ignore_index": self.ignore_index,
                      "reduce_zero_label": bool(getattr(self.train_set, "reduce_zero_label", False)),
                      **test_time_meta(cfg)}
        if binary:
            model.meta["binary_threshold"] = self.criterion.binary_threshold
        return model

    def batches(self, position: dict | None, rank: int, world_size: int, pin_memory: bool) -> "SegmentationBatches":
        """The endless training batches of this process from the recorded data position (None: the start)."""
        consumed = 0
        if position:  # the same global sample count, whatever the new number of processes
            consumed = position["samples_per_rank"] * position["world_size"] // world_size
        cfg = self.config
        sampler = InfiniteSampler(len(self.train_set), cfg.train.seed, rank, world_size, start=consumed)
        stream = seeded_loader(self.train_set, sampler, cfg.data.batch_size, cfg.data.workers, cfg.train.seed,
                               pin_memory)
        return SegmentationBatches(stream, sampler, consumed, cfg.data.batch_size)

    def begin_iteration(self, iteration: int, model: nn.Module, optimizer) -> bool:
        """Per-iteration set-up; returns whether the lr schedule steps after this iteration."""
        return True

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        """The loss of one batch (computed inside forward: no image-size logits are kept) and extra log entries."""
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if self.criterion is None:
            loss = model(images, labels=labels, ignore_index=self.ignore_index,
                         average=self.config.train.loss_average)["loss"]
            return loss, {}
        # The recipe's losses on the logits at input size: the main head's, and the auxiliary head's
        # times its weight (without OHEM, as mmsegmentation samples on the decode head only).
        outputs = model(images)
        loss, parts = self.criterion(outputs["out"], labels)
        if "aux" in outputs:
            aux_loss, _ = self.criterion(outputs["aux"], labels, sample=False)
            loss = loss + getattr(model, "module", model).aux_loss_weight * aux_loss
        extra = {f"loss/{name}": float(value.detach()) for name, value in parts.items()} if len(parts) > 1 else {}
        return loss, extra

    def validate(self, model: nn.Module, distributed: bool, autocast_dtype) -> dict:
        """aAcc, mIoU, mAcc on the validation set (with `val.mode`, `val.max_images`)."""
        v = self.config.val
        metrics = evaluate(model, self.val_set, mode=v.mode, crop_size=v.crop_size, stride=v.stride,
                           distributed=distributed, autocast_dtype=autocast_dtype, progress=False)
        return {k: float(metrics[k]) for k in ("aAcc", "mIoU", "mAcc")}


class SegmentationBatches:
    """Training batches of one dataset and the data position they reached."""

    def __init__(self, stream: Iterator[dict], sampler: InfiniteSampler, consumed: int, batch_size: int):
        self.stream, self.sampler, self.consumed, self.batch_size = stream, sampler, consumed, batch_size

    def next(self, iteration: int) -> dict:
        self.consumed += self.batch_size
        return next(self.stream)

    def position(self) -> dict:
        return self.sampler.position(self.consumed)

    def log(self) -> dict:
        return {"epoch": self.position()["epoch"]}


class MultitaskTask:
    """Unified Perceptual Parsing: `data.kind` multitask_synthetic or broden, settings in `multitask`."""

    name = "multitask"
    find_unused = True  # a step trains only the heads its source annotates

    def __init__(self, config: Config):
        self.config = config
        if not is_default(config.train.losses):
            raise UserError("train.losses applies to train.task=segmentation; the multitask losses are fixed "
                            "(weights in multitask.loss_weights)")

    def build_data(self) -> None:
        cfg = self.config
        self.train_sources, self.meta = build_sources(cfg, cfg.data.train_split, train=True)
        val_sources, _ = build_sources(cfg, cfg.data.val_split)
        self.val_sources = [first_images(s, cfg.val.max_images) for s in val_sources]
        self.tasks = tasks_of(self.meta)
        # The main schedule draws among the non-texture sources; then texture_iters on textures.
        self.main = [i for i, s in enumerate(self.train_sources) if tuple(s.tasks) != ("texture",)]
        self.texture = [i for i, s in enumerate(self.train_sources) if tuple(s.tasks) == ("texture",)]
        if not self.main:
            raise UserError("multitask.sources: no source besides textures to train the main schedule on")
        self.pick_main = SourceSampler([len(self.train_sources[i]) for i in self.main], cfg.train.seed)
        self.total_iters = cfg.schedule.iters + (cfg.multitask.texture_iters if self.texture else 0)
        self.best_metric = "object/mIoU" if "object" in self.tasks else None

    def build_model(self, pretrained: bool) -> nn.Module:
        cfg = self.config
        model = build_model(cfg.model.name, tasks=self.tasks, **cfg.model.args)
        if pretrained and cfg.model.backbone_checkpoint:
            load_backbone_checkpoint(model.backbone, cfg.model.backbone_checkpoint)
        model.meta = {"tasks_meta": self.meta, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                      **test_time_meta(cfg)}
        self.model = model
        return model

    def source_of(self, iteration: int) -> int:
        """The source iteration `iteration` trains on (the same on every process)."""
        if iteration > self.config.schedule.iters:
            return self.texture[0]
        return self.main[self.pick_main(iteration)]

    def batches(self, position: dict | None, rank: int, world_size: int, pin_memory: bool) -> "MultitaskBatches":
        cfg = self.config
        consumed = [0] * len(self.train_sources)
        if position:
            consumed = [c * position.get("world_size", world_size) // world_size for c in position["consumed"]]
        streams = [seeded_loader(source, InfiniteSampler(len(source), cfg.train.seed + i, rank, world_size,
                                                         start=consumed[i]),
                                 cfg.data.batch_size, cfg.data.workers, cfg.train.seed + i, pin_memory, collate)
                   for i, source in enumerate(self.train_sources)]
        return MultitaskBatches(self, streams, consumed, cfg.data.batch_size, world_size)

    def begin_iteration(self, iteration: int, model: nn.Module, optimizer) -> bool:
        """In the texture phase the rest is trained: it stays fixed (BatchNorm statistics too), only the
        texture head learns, its lr decaying linearly from the base lr over the texture iterations."""
        cfg = self.config
        if iteration <= cfg.schedule.iters:
            return True
        self.model.eval()
        self.model.heads["texture"].train()
        left = 1 - (iteration - cfg.schedule.iters - 1) / cfg.multitask.texture_iters
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * left
        return False

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        targets = {t: v.to(device) for t, v in batch["targets"].items()}
        wanted = list(targets) + (["object"] if "part" in targets else [])
        outputs = model(batch["image"].to(device), tasks=list(dict.fromkeys(wanted)))
        losses = multitask_loss(self.model, outputs, targets, self.config.multitask.loss_weights)
        if self.config.train.loss_average == "all":  # pixel losses over every pixel, as in segmentation
            for task in ("object", "material", "part"):
                if task in losses:
                    losses[task] = losses[task] * (targets[task] != IGNORE_INDEX).float().mean()
            losses["total"] = sum(v for k, v in losses.items() if k != "total")
        extra = {"source": batch["source"], **{f"loss/{k}": float(v.detach()) for k, v in losses.items() if k != "total"}}
        return losses["total"], extra

    def validate(self, model: nn.Module, distributed: bool, autocast_dtype) -> dict:
        """The paper's per-task scores on the validation sources (with `val.mode`, `val.max_images`)."""
        v = self.config.val
        return evaluate_multitask(model, self.val_sources, self.tasks, self.meta, mode=v.mode, crop_size=v.crop_size,
                                  stride=v.stride, distributed=distributed, autocast_dtype=autocast_dtype)


class MultitaskBatches:
    """Training batches: one stream per source, the iteration's source chosen by the task."""

    def __init__(self, task: MultitaskTask, streams: list, consumed: list[int], batch_size: int, world_size: int):
        self.task, self.streams, self.consumed = task, streams, consumed
        self.batch_size, self.world_size = batch_size, world_size

    def next(self, iteration: int) -> dict:
        source = self.task.source_of(iteration)
        self.consumed[source] += self.batch_size
        return next(self.streams[source])

    def position(self) -> dict:
        return {"consumed": list(self.consumed), "world_size": self.world_size}

    def log(self) -> dict:
        return {}


TASKS = {"segmentation": SegmentationTask, "multitask": MultitaskTask}


def build_task(config: Config) -> SegmentationTask | MultitaskTask:
    """The task object of `train.task`."""
    return TASKS[config.train.task](config)


def dataset_options(kind: str) -> set[str]:
    """The `data.options` keys dataset kind `kind` takes."""
    from ..data.build import DATASETS
    from ..data.synthetic import SyntheticDataset

    if kind in ("multitask_synthetic", "upp_builtin"):
        return {"image_size", "val_samples"}
    if kind == "broden":
        return set()
    if kind == "synthetic":
        return set(inspect.signature(SyntheticDataset).parameters) - {"split", "transform"}
    return set(inspect.signature(DATASETS[kind]).parameters) - {"root", "split", "transform"}
