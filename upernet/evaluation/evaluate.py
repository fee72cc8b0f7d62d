"""Evaluate a model on a split: predict each image at its label's size, accumulate a confusion matrix, summarise.

Distributed evaluation gives exactly the numbers of one process: rank r takes samples
r, r + world_size, ... (no padded duplicates, unlike `DistributedSampler`), and the confusion
matrices are summed before any ratio is taken.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.classes import IMAGENET_MEAN, IMAGENET_STD, resolve_meta
from ..data.build import build_dataset
from ..data.multitask import MULTITASK_KINDS, build_sources
from ..data.protocol import protocol_options
from ..data.transforms import build_eval_transform
from ..distributed import cleanup, init_distributed
from ..errors import UserError
from ..inference.modes import MS_RATIOS
from ..inference.probabilities import predicted_classes
from ..inference.prepare import PRECISIONS
from ..inference.segmenter import Segmenter, is_multitask, resolve_device
from ..io import atomic_write, write_json
from .loop import device_of, evaluate_dataset, prepared_for_evaluation, unwrap_model
from .metrics import PER_CLASS, confusion_matrix, image_miou, reduce, summarize
from .multitask import MultiTaskMetrics, format_multitask
from .report import EvalReport, WorstImage, WorstImages, image_at_label_size

DEFAULT_WORST = 8  # worst images kept by `upernet eval` unless --worst says otherwise


def _base_dataset(dataset):
    """The dataset under `Subset` wrappers (they hide `classes` and `ignore_index`)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _class_names(model: nn.Module, dataset, num_classes: int) -> list[str]:
    """Class names from the dataset (`classes`), else from the model's meta, else the indices."""
    meta = getattr(model, "meta", None) or {}
    for where, names in (("the dataset", getattr(_base_dataset(dataset), "classes", None)),
                         ("the model's meta", meta.get("class_names"))):
        if names:
            if len(names) != num_classes:
                raise UserError(f"the model predicts {num_classes} classes but {where} has {len(names)} class names "
                                 f"({', '.join(map(str, names[:5]))}, ...)")
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _palette(meta: dict, dataset) -> list[list[int]]:
    """The dataset's colours (they go with its class names), else the model's."""
    palette = getattr(_base_dataset(dataset), "palette", None)
    return [list(map(int, c)) for c in (palette if palette and len(palette) == len(meta["palette"]) else meta["palette"])]


def _ignore_index(model: nn.Module, dataset) -> int:
    """The dataset's ignore index, else the model's meta one, else 255."""
    value = getattr(_base_dataset(dataset), "ignore_index", None)
    if value is None:
        value = (getattr(model, "meta", None) or {}).get("ignore_index", 255)
    return int(value)


class SegmentationMetrics:
    """The metric accumulator of a segmentation model: one confusion matrix -> `summarize`.

    With `worst` > 0 it also keeps the `worst` images of lowest per-image mIoU (their image,
    prediction and label, for `report.write_report`), from the per-image matrices of the same pass.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str], ignore_index: int = 255,
                 device: torch.device | str = "cpu", worst: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, beta: float = 1.0, nan_to_num: float | None = None):
        self.num_classes, self.class_names, self.ignore_index = num_classes, list(class_names), ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.worst = WorstImages(worst)
        self.mean, self.std = tuple(mean), tuple(std)  # to show the network input as a picture
        self.beta, self.nan_to_num = beta, nan_to_num

    def target_size(self, sample: dict) -> tuple[int, int]:
        """Where the prediction is scored: the label's size."""
        return tuple(torch.as_tensor(sample["label"]).shape[-2:])

    def add(self, probs: dict[str, torch.Tensor], sample: dict) -> None:
        label = torch.as_tensor(sample["label"]).to(self.confusion.device)
        prediction = probs["out"].argmax(dim=1)[0]
        try:
            confusion = confusion_matrix(prediction, label, self.num_classes, self.ignore_index)
        except ValueError as e:
            raise UserError(f"{sample.get('path', 'a sample')}: {e}") from None
        self.confusion += confusion
        if self.worst.k == 0:
            return
        index, miou = int(sample.get("index", 0)), 100 * image_miou(confusion)
        self.worst.offer(miou, index, lambda: WorstImage(
            index=index, path=str(sample.get("path", "")), miou=miou,
            image=image_at_label_size(sample["image"], label.shape, self.mean, self.std),
            prediction=prediction.cpu().numpy().astype(np.int32), label=label.cpu().numpy().astype(np.int32)))

    def reduce(self) -> None:
        self.confusion = reduce(self.confusion)
        self.worst.gather()

    def summary(self) -> dict:
        return summarize(self.confusion, self.class_names, self.beta, self.nan_to_num)


def evaluate_confusion(
    model: nn.Module,
    dataset,
    distributed: bool = False,
    progress: bool = True,
    ignore_index: int | None = None,
    **infer_options,
) -> tuple[torch.Tensor, list[str]]:
    """The confusion matrix of `model` over every sample of `dataset` (summed over processes), and the class names.

    Args:
        model: a segmentation model with `num_classes` (a DDP wrapper is unwrapped).
        dataset: indexable; items are {"image": normalised (3, H', W'), "label": int64 (H, W) at the
            original size, "path": str}.
        distributed: split the samples over the torch.distributed processes and sum the matrices.
        progress: show a progress bar (on rank 0 only).
        ignore_index: label value left out; defaults to the dataset's, else the model meta's, else 255.
        **infer_options: keyword arguments of `inference.infer` (mode, crop_size, stride, scales, flip,
            autocast_dtype).

    Returns:
        The int64 (C, C) matrix (rows label, columns prediction), the same on every rank, and C names.
    """
    model = unwrap_model(model)
    num_classes = predicted_classes(model)
    names = _class_names(model, dataset, num_classes)
    if ignore_index is None:
        ignore_index = _ignore_index(model, dataset)
    metrics = SegmentationMetrics(num_classes, names, ignore_index, device_of(model))
    evaluate_dataset(model, dataset, metrics, distributed, progress, **infer_options)
    return metrics.confusion, names


def evaluate(
    model: nn.Module,
    dataset,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    distributed: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    ignore_index: int | None = None,
) -> dict:
    """aAcc, mIoU, mAcc and per-class IoU/Acc of `model` on every sample of `dataset`.

    Args:
        model: a segmentation model with `num_classes` (a DDP wrapper is unwrapped).
        dataset: indexable; items are {"image": normalised (3, H', W'), "label": int64 (H, W) at the
            original size, "path": str}.
        mode: "whole" (one forward pass) or "slide" (overlapping crops).
        crop_size: (h, w) window of slide mode.
        stride: (h, w) step of slide mode.
        scales: image scale ratios whose softmax probabilities are averaged.
        flip: also average the horizontally flipped prediction.
        distributed: split the samples over the torch.distributed processes and sum the matrices.
        autocast_dtype: run the forward passes under autocast with this dtype (None: full precision).
        progress: show a progress bar (on rank 0 only).
        ignore_index: label value left out; defaults to the dataset's, else the model meta's, else 255.

    Returns:
        The `metrics.summarize` dict ({"aAcc", "mIoU", "mAcc", "per_class"}), the same on every rank.
    """
    model, autocast_dtype = prepared_for_evaluation(model, autocast_dtype)
    confusion, names = evaluate_confusion(model, dataset, distributed, progress, ignore_index, mode=mode,
                                          crop_size=crop_size, stride=stride, scales=scales, flip=flip,
                                          autocast_dtype=autocast_dtype)
    return summarize(confusion, names)


def format_table(results: dict) -> str:
    """The per-class table (Class | IoU | Acc | Dice | ...) followed by the summary line, as mmsegmentation logs them."""
    columns = [key for key in PER_CLASS if key in results["per_class"][0]] if results["per_class"] else ["IoU", "Acc"]
    rows = [(r["class"], *(f"{r[key]:.2f}" for key in columns)) for r in results["per_class"]]
    header = ("Class", *columns)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    table = [rule, line(header), rule, *(line(r) for r in rows), rule]
    means = ["aAcc", *(f"m{key}" for key in columns)]
    summary = "  ".join(f"{key}: {results[key]:.2f}" for key in means if key in results)
    return "\n".join(table) + "\n" + summary


def _json_safe(value):
    """NaN -> null, so that metrics.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_results(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `metrics.json` (everything but "report"; NaN as null) and `per_class.csv` (class, IoU, Acc,
    Dice, Fscore, Precision, Recall; NaN as nan).

    Multi-task results (no per-class list) get `metrics.json` only; the second path is then None.
    The confusion matrix and worst-image files are `report.write_report`'s.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json(folder / "metrics.json", _json_safe({k: v for k, v in results.items() if k != "report"}))
    if "per_class" not in results:
        return json_path, None

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            columns = [key for key in PER_CLASS if all(key in r for r in results["per_class"])]
            writer.writerow(["class", *columns])
            for r in results["per_class"]:
                writer.writerow([r["class"], *(r[key] for key in columns)])

    return json_path, atomic_write(folder / "per_class.csv", write_csv)


# ---- `upernet eval` -------------------------------------------------------------------------
def default_out(checkpoint: str | os.PathLike) -> Path:
    """`<run>/eval` for a run folder, `<run>/model` or `<run>/checkpoints/x.pt`; else `eval` beside the checkpoint."""
    path = Path(checkpoint).resolve()
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        return path / "eval"  # a run folder
    parent = path.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def evaluate_model(
    model: nn.Module,
    config: Config,
    *,
    mode: str | None = None,
    multi_scale: bool = False,
    flip: bool = False,
    device: str = "auto",
    precision: str = "fp32",
    max_images: int = 0,
    progress: bool = True,
    worst: int = DEFAULT_WORST,
    beta: float = 1.0,
    nan_to_num: float | None = None,
) -> dict:
    """Evaluate `model` on the validation split of `config`; returns the results, prints and writes nothing.

    The test-time protocol is the model's (its meta's `test_size`, `inference` and mean/std, as
    `predict` and `Segmenter` use it); the recipe's `data.scale`, `val` and mean/std only stand in
    for what the model's meta lacks. Under torchrun the images are split over the processes and
    every process gets the numbers of one process.

    Args:
        model: a segmentation model or a multi-task model.
        config: the recipe whose `data` section names the split (multi-task models: a multi-task kind).
        mode: "whole" or "slide"; None: the model's test mode, else the config's `val.mode`.
        multi_scale: average the ratios 0.5-1.75 (`inference.MS_RATIOS`).
        flip: also average horizontally flipped predictions.
        device: auto, cpu or cuda (under torchrun each process takes its local GPU).
        precision: fp32 (the default: the numbers of training's validation and of published fp32
            results), auto (bf16 where the hardware runs it natively, else fp32), bf16 or fp16.
        max_images: evaluate the first N images of the split only (0: all).
        progress: show a progress bar on rank 0.
        worst: keep the images of lowest per-image mIoU, this many (0: none), for `report.write_report`.
        beta: weight of recall in the F-score (1: F1).
        nan_to_num: percent value replacing undefined per-class values before the means (None: left out).

    Returns:
        Segmentation: `metrics.summarize`'s dict, "worst" (`EvalReport.worst_summary`) and "report"
        (the `report.EvalReport` to write; not JSON); multi-task: {"<task>/<metric>": value}; both
        with "settings" (what was run, including "rank": this process's rank).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_images < 0:
        raise UserError(f"max_images must be 0 (all) or positive, got {max_images}")
    if worst < 0:
        raise UserError(f"worst must be 0 (none) or positive, got {worst}")
    if not beta > 0:
        raise UserError(f"beta (the F-score's weight of recall) must be positive, got {beta}")
    wanted = resolve_device(device)
    d, v = config.data, config.val
    multitask = is_multitask(model)
    if multitask:
        if d.kind not in MULTITASK_KINDS:
            raise UserError(f"a multi-task model is evaluated with a multi-task config (data.kind "
                            f"{' or '.join(MULTITASK_KINDS)}, e.g. multitask_builtin), not {d.kind!r}")
        meta = dict(getattr(model, "meta", None) or {})
    else:
        meta = resolve_meta(getattr(model, "meta", None), predicted_classes(model))
    own = meta.get("inference") or {}
    info = init_distributed(wanted.type)
    try:
        segmenter = Segmenter(
            model, device=info.device, precision=precision, mode=mode or own.get("mode") or v.mode,
            size=None if "test_size" in meta or multitask else d.scale,
            crop_size=None if own.get("crop_size") else v.crop_size, stride=None if own.get("stride") else v.stride,
            scales=MS_RATIOS if multi_scale else (1.0,), flip=flip)
        if multitask:
            sources, data_meta = build_sources(config, d.val_split)
            dataset = torch.utils.data.ConcatDataset(sources)
            metrics = MultiTaskMetrics(model.tasks, data_meta)
        else:
            mean, std = meta["mean"] if "mean" in (model.meta or {}) else d.mean, \
                meta["std"] if "std" in (model.meta or {}) else d.std
            dataset = build_dataset(d.kind, d.root or None, d.val_split, build_eval_transform(segmenter.size, mean, std),
                                    channels=len(segmenter.preprocessor.mean),
                                    **protocol_options(d.kind, d.options, getattr(model, "meta", None)))
            names = _class_names(model, dataset, predicted_classes(model))
            metrics = SegmentationMetrics(predicted_classes(model), names, _ignore_index(model, dataset), info.device,
                                          worst=worst, mean=mean, std=std, beta=beta, nan_to_num=nan_to_num)
        if max_images:
            dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
        evaluate_dataset(segmenter.runner, dataset, metrics, info.distributed, progress, **segmenter.options())
        results = metrics.summary()
        if not multitask:
            report = EvalReport(metrics.confusion.cpu(), names, _palette(meta, dataset), metrics.ignore_index,
                                metrics.worst.sorted())
            results["worst"], results["report"] = report.worst_summary(), report
        results["settings"] = {
            "dataset": d.kind, "root": d.root, "split": d.val_split, "images": len(dataset),
            "mode": segmenter.mode, "size": segmenter.size, "crop_size": list(segmenter.crop_size),
            "stride": list(segmenter.stride), "scales": list(segmenter.scales), "flip": flip,
            "precision": _precision_of(segmenter),
            "processes": info.world_size, "rank": info.rank,
        }
        if not multitask:
            results["settings"].update(beta=beta, nan_to_num=nan_to_num)
    finally:
        cleanup()
    return results


def _precision_of(segmenter: Segmenter) -> str:
    """The precision a prepared model runs at: its weights' dtype, or the autocast dtype."""
    parameters = getattr(segmenter.runner, "parameters", None)
    dtype = next(parameters()).dtype if parameters is not None else None
    if dtype == torch.bfloat16 or segmenter.autocast_dtype == torch.bfloat16:
        return "bf16"
    return "fp16" if segmenter.autocast_dtype == torch.float16 else "fp32"


def format_results(results: dict) -> str:
    """`format_table` for segmentation results, one line per metric for multi-task results."""
    if "per_class" in results:
        return format_table(results)
    return format_multitask({k: v for k, v in results.items() if k != "settings"})
