"""Scoring the multi-task model as in the paper: object and material mIoU and pixel accuracy; part
mIoU (background counted) averaged within each object, then across objects; scene and texture top-1.

Data read in the authors' Broden+ layout (`meta["scoring"] == "unifiedparsing"`) are scored by the
rules of their eval_multipro.py instead (`UnifiedParsingRules`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..data.multitask import BRODEN_PLUS_SCORING, IGNORE_INDEX, PIXEL_TASKS
from .loop import evaluate_dataset, prepared_for_evaluation
from .metrics import confusion_matrix, reduce, summarize


class MultiTaskMetrics:
    """Accumulates every task's counts; `summary()` gives the paper's numbers in percent."""

    def __init__(self, tasks: dict, meta: dict):
        self.tasks, self.meta = tasks, meta
        self.confusion = {t: torch.zeros(tasks[t], tasks[t], dtype=torch.int64) for t in PIXEL_TASKS if t in tasks}
        layout = tasks.get("part")
        self.part_confusion = ([torch.zeros(n, n, dtype=torch.int64) for n in layout["num_parts"]] if layout else [])
        self.top1 = {t: torch.zeros(2, dtype=torch.int64) for t in ("scene", "texture") if t in tasks}
        self.unifiedparsing = meta.get("scoring") == BRODEN_PLUS_SCORING

    def update(self, outputs: dict, targets: dict) -> None:
        if self.unifiedparsing:
            UnifiedParsingRules.update(self, outputs, targets)
            return
        for task, conf in self.confusion.items():
            if task in targets:
                conf += confusion_matrix(outputs[task].argmax(1).cpu(), targets[task].cpu(), self.tasks[task])
        for task, counts in self.top1.items():
            if task in targets:
                counts += torch.tensor([int((outputs[task].argmax(1).cpu() == targets[task].cpu()).sum()),
                                        targets[task].numel()])
        if self.part_confusion and "part" in targets:
            layout = self.tasks["part"]
            start = 0
            for k, (obj, n) in enumerate(zip(layout["objects"], layout["num_parts"])):
                pred = outputs["part"][:, start:start + n].argmax(1).cpu()
                label = targets["part"].cpu().clone()
                label[targets["object"].cpu() != obj] = 255  # parts are scored inside their object only
                self.part_confusion[k] += confusion_matrix(pred, label, n)
                start += n

    def target_size(self, sample: dict) -> tuple[int, int]:
        """Where the pixel tasks are scored: the sample's image size (its masks have it)."""
        return tuple(sample["image"].shape[-2:])

    def add(self, outputs: dict, sample: dict) -> None:
        """`update` with one sample of a source (targets without the batch dimension)."""
        self.update(outputs, {task: torch.as_tensor(t)[None] for task, t in sample["targets"].items()})

    def reduce(self) -> None:
        for task in self.confusion:
            self.confusion[task] = reduce(self.confusion[task])
        self.part_confusion = [reduce(c) for c in self.part_confusion]
        for task in self.top1:
            self.top1[task] = reduce(self.top1[task])

    def summary(self) -> dict:
        if self.unifiedparsing:
            return UnifiedParsingRules.summary(self)
        out: dict[str, float] = {}
        for task, conf in self.confusion.items():
            if conf.sum() > 0:
                s = summarize(conf)
                out[f"{task}/mIoU"], out[f"{task}/pixel_acc"] = s["mIoU"], s["aAcc"]
        per_object = [summarize(c)["mIoU"] for c in self.part_confusion if c.sum() > 0]
        per_object = [v for v in per_object if not math.isnan(v)]
        if per_object:
            out["part/mIoU"] = round(sum(per_object) / len(per_object), 2)
        for task, (correct, total) in self.top1.items():
            if total > 0:
                out[f"{task}/top1"] = round(100.0 * int(correct) / int(total), 2)
        return out


class UnifiedParsingRules:
    """The counts and numbers of their eval_multipro.py, on our confusion matrices (rows: truth).

    - object, material: class 0 ("-") and IGNORE_INDEX are unlabelled; pixel accuracy over labelled
      pixels (a prediction of class 0 there is wrong); IoU of classes 1..N-1, each inter/(union+1e-8),
      so a class absent from truth and prediction counts 0 in the mean.
    - part, per object with parts, only on images where the object's parts count (the reader's
      rule): truth = part index inside the true object, else 0; prediction = argmax of the object's
      slice inside the predicted object, else 0; over every pixel of the image. Per object, IoU of
      parts 1..n-1 as above and accuracy over truth > 0; objects with no truth part pixel in the
      whole set are left out; part mIoU and pixel accuracy are the means over the other objects.
    - scene: top-1 over the images with a scene label.
    """

    @staticmethod
    def update(metrics: MultiTaskMetrics, outputs: dict, targets: dict) -> None:
        objects = outputs["object"].argmax(1).cpu() if "object" in outputs else None
        for task, conf in metrics.confusion.items():
            if task in targets:
                label = targets[task].cpu().clone()
                label[label == 0] = IGNORE_INDEX
                conf += confusion_matrix(outputs[task].argmax(1).cpu(), label, metrics.tasks[task])
        for task, counts in metrics.top1.items():
            if task in targets:
                counts += torch.tensor([int((outputs[task].argmax(1).cpu() == targets[task].cpu()).sum()),
                                        targets[task].numel()])
        if not (metrics.part_confusion and "part" in targets):
            return
        layout = metrics.tasks["part"]
        true_objects, true_parts = targets["object"].cpu(), targets["part"].cpu()
        start = 0
        for k, (obj, n) in enumerate(zip(layout["objects"], layout["num_parts"])):
            predicted = outputs["part"][:, start:start + n].argmax(1).cpu()
            start += n
            for i in range(true_parts.shape[0]):
                inside = true_objects[i] == obj
                if not (inside & (true_parts[i] != IGNORE_INDEX)).any():
                    continue  # this object's parts do not count on this image
                truth = torch.where(inside, true_parts[i], 0)
                guess = torch.where(objects[i] == obj, predicted[i], 0)
                metrics.part_confusion[k] += torch.bincount(truth.flatten() * n + guess.flatten(),
                                                            minlength=n * n).reshape(n, n)

    @staticmethod
    def scores(conf: torch.Tensor) -> tuple[float, float]:
        """(mIoU over classes 1.., pixel accuracy over truth > 0), as fractions."""
        conf = conf.double()
        inter = conf.diagonal()[1:]
        union = conf.sum(0)[1:] + conf.sum(1)[1:] - inter
        return float((inter / (union + 1e-8)).mean()), float(inter.sum() / (conf[1:].sum() + 1e-8))

    @staticmethod
    def summary(metrics: MultiTaskMetrics) -> dict:
        out: dict[str, float] = {}
        for task, conf in metrics.confusion.items():
            if conf[1:].sum() > 0:
                miou, acc = UnifiedParsingRules.scores(conf)
                out[f"{task}/mIoU"], out[f"{task}/pixel_acc"] = round(100 * miou, 2), round(100 * acc, 2)
        per_object = [UnifiedParsingRules.scores(c) for c in metrics.part_confusion if c[1:].sum() > 0]
        if per_object:
            out["part/mIoU"] = round(100 * sum(m for m, _ in per_object) / len(per_object), 2)
            out["part/pixel_acc"] = round(100 * sum(a for _, a in per_object) / len(per_object), 2)
        for task, (correct, total) in metrics.top1.items():
            if total > 0:
                out[f"{task}/top1"] = round(100.0 * int(correct) / int(total), 2)
        return out


def evaluate_multitask(
    model: nn.Module,
    sources: Sequence[Dataset],
    tasks: dict,
    meta: dict,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    distributed: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Every source of the split, each scored on the tasks it annotates; reduced across processes.

    Runs as segmentation's `evaluation.evaluate.evaluate` (the model prepared for inference, the same
    modes): in slide mode the
    pixel tasks are stitched from the windows and the image-level tasks (scene, texture) average
    the windows' probabilities.

    Args:
        model: the multi-task model (a DDP wrapper is unwrapped).
        sources: the datasets of the split (items {"image", "targets", "source"}).
        tasks: the model's tasks (`model.tasks`).
        meta: the class lists of the data.
        mode: "whole" (one forward pass) or "slide" (overlapping windows).
        crop_size: (h, w) window of slide mode.
        stride: (h, w) step of slide mode.
        distributed: split the samples over the torch.distributed processes and sum the counts.
        autocast_dtype: the training's autocast dtype: bf16 runs bf16 weights, another dtype autocast,
            None full precision.
        progress: show a progress bar (on rank 0 only).
    """
    model, autocast_dtype = prepared_for_evaluation(model, autocast_dtype)
    metrics = MultiTaskMetrics(tasks, meta)
    evaluate_dataset(model, ConcatDataset(list(sources)), metrics, distributed, progress, mode=mode,
                     crop_size=crop_size, stride=stride, autocast_dtype=autocast_dtype)
    return metrics.summary()


def format_multitask(results: dict) -> str:
    """One line per metric: name and value."""
    width = max(len(k) for k in results) if results else 0
    return "\n".join(f"{k:<{width}}  {v:6.2f}" for k, v in results.items())
