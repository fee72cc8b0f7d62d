"""Evaluate a model on a split: predict each image at its label's size, accumulate a confusion matrix, summarise.

Distributed evaluation gives exactly the numbers of one process: rank r takes samples
r, r + world_size, ... (no padded duplicates, unlike `DistributedSampler`), and the confusion
matrices are summed before any ratio is taken.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..inference.prepare import PRECISIONS, autocast_dtype_for, prepare_for_inference
from ..inference.modes import infer
from .metrics import confusion_matrix, reduce, summarize


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP: its forward broadcasts buffers, a collective that would hang when
    ranks evaluate different numbers of samples."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
                raise ValueError(f"the model predicts {num_classes} classes but {where} has {len(names)} class names "
                                 f"({', '.join(map(str, names[:5]))}, ...)")
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _ignore_index(model: nn.Module, dataset) -> int:
    """The dataset's ignore index, else the model's meta one, else 255."""
    value = getattr(_base_dataset(dataset), "ignore_index", None)
    if value is None:
        value = (getattr(model, "meta", None) or {}).get("ignore_index", 255)
    return int(value)


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
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed evaluation needs torch.distributed to be initialised (run under torchrun)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = _unwrap(model)
    num_classes = int(model.num_classes)
    names = _class_names(model, dataset, num_classes)
    if ignore_index is None:
        ignore_index = _ignore_index(model, dataset)
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    device = next(model.parameters()).device
    indices = range(rank, len(dataset), world)
    if progress and rank == 0:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img", dynamic_ncols=True)

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index in indices:
                sample = dataset[index]
                label = torch.as_tensor(sample["label"]).to(device)
                probs = infer(model, sample["image"].to(device), out_size=label.shape[-2:], **infer_options)
                try:
                    confusion += confusion_matrix(probs.argmax(dim=1)[0], label, num_classes, ignore_index)
                except ValueError as e:
                    raise ValueError(f"{sample.get('path', f'sample {index}')}: {e}") from None
    finally:
        model.train(was_training)
    if distributed:
        confusion = reduce(confusion)
    return confusion, names


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
    dtype = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"  # bf16: real bf16 weights, not autocast
    model = prepare_for_inference(_unwrap(model), dtype)  # folded BNs, Winograd head convs
    autocast_dtype = None if dtype == "bf16" else autocast_dtype
    confusion, names = evaluate_confusion(model, dataset, distributed, progress, ignore_index, mode=mode,
                                          crop_size=crop_size, stride=stride, scales=scales, flip=flip,
                                          autocast_dtype=autocast_dtype)
    return summarize(confusion, names)


def format_table(results: dict) -> str:
    """The per-class table (Class | IoU | Acc) followed by the summary line, as mmsegmentation logs them."""
    rows = [(r["class"], f"{r['IoU']:.2f}", f"{r['Acc']:.2f}") for r in results["per_class"]]
    header = ("Class", "IoU", "Acc")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    table = [rule, line(header), rule, *(line(r) for r in rows), rule]
    summary = "  ".join(f"{key}: {results[key]:.2f}" for key in ("aAcc", "mIoU", "mAcc"))
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
    """Write `metrics.json` (everything; NaN as null) and `per_class.csv` (class, IoU, Acc; NaN as nan)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "metrics.json", folder / "per_class.csv"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "IoU", "Acc"])
        for r in results["per_class"]:
            writer.writerow([r["class"], r["IoU"], r["Acc"]])
    return json_path, csv_path


# ---- `upernet eval` -------------------------------------------------------------------------
def load_eval_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, dict | None]:
    """A model in eval mode from our folder format, a training checkpoint (.pt of `upernet train`) or a
    foreign checkpoint `upernet.load_model` converts; plus the training config stored with it, if any."""
    from ..loading import load_model
    from ..models import build_model
    from ..models.weights import load_state_dict_strict
    from ..training.checkpoint import load_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or file")
    if path.is_file():
        try:
            state = load_checkpoint(path)
        except ValueError:  # not a plain-tensor pickle: a foreign checkpoint for the converters
            state = None
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("config"), dict):
            model_section = state["config"].get("model", {})
            name, args = model_section.get("name", ""), dict(model_section.get("args", {}))
            if "model_config" in state:  # the exact build arguments, when the loop stored them
                name, args = state["model_config"]["name"], dict(state["model_config"]["args"])
            classifier = state["model"].get("decode_head.classifier.weight")
            if "num_classes" not in args and "tasks" not in args and classifier is not None:
                args["num_classes"] = int(classifier.shape[0])  # filled in from the dataset at training time
            model = build_model(name, **args)
            load_state_dict_strict(model, state["model"], str(path))
            model.meta = dict(state.get("meta") or {})
            return model.eval(), state["config"]
    return load_model(path), None


def _default_out(checkpoint: Path) -> Path:
    """`<run>/eval` for `<run>/model` or `<run>/checkpoints/x.pt`; else `eval` beside the checkpoint."""
    parent = checkpoint.resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def evaluate_from_cli(
    config_path: str | None,
    overrides: Sequence[str],
    checkpoint: str,
    mode: str | None = None,
    multi_scale: bool = False,
    flip: bool = False,
    out: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    max_images: int = 0,
    progress: bool = True,
) -> dict:
    """`upernet eval`: model + validation split of the config -> printed table, metrics.json, per_class.csv.

    Args:
        config_path: recipe YAML whose `data` section names the split; None: the config stored in a
            training checkpoint, else the built-in recipe.
        overrides: dotted `key=value` overrides of the config (e.g. `data.root=...`, `val.crop_size=[512,512]`).
        checkpoint: model folder, training checkpoint file or foreign checkpoint.
        mode: "whole" or "slide"; None: the config's `val.mode`.
        multi_scale: average the ratios 0.5-1.75 (`inference.MS_RATIOS`).
        flip: also average horizontally flipped predictions.
        out: folder for metrics.json and per_class.csv; None: `eval` in the run folder of the checkpoint.
        device: auto, cpu or cuda (under torchrun each process takes its local GPU).
        precision: auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16 or fp16.
        max_images: evaluate the first N images of the split only (0: all; `val.max_images` of the
            config only limits the periodic validation during training).
        progress: show a progress bar on rank 0.

    Returns:
        The results (as saved), on every process.
    """
    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform
    from ..config import config_from_dict, load_config
    from ..distributed import cleanup, init_distributed
    from ..inference.modes import MS_RATIOS

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model, stored_config = load_eval_model(checkpoint)
    if config_path is None and stored_config is not None:
        config = config_from_dict(stored_config, list(overrides), source=f"{checkpoint} (stored config)")
    else:
        config = load_config(config_path, list(overrides))
    if hasattr(model, "tasks"):  # a multi-task (UPP) model: every task of every validation source
        from .multitask import evaluate_multitask_from_cli

        return evaluate_multitask_from_cli(model, config, checkpoint, out, device)
    d, v = config.data, config.val
    dataset = build_dataset(d.kind, d.root or None, d.val_split, build_eval_transform(d.scale, d.mean, d.std),
                            **d.options)
    if max_images < 0:
        raise ValueError(f"max_images must be 0 (all) or positive, got {max_images}")
    if max_images:
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    info = init_distributed(device)
    try:
        model.to(info.device)
        mode = mode or v.mode
        scales = MS_RATIOS if multi_scale else (1.0,)
        dtype = autocast_dtype_for(precision, info.device)
        results = evaluate(model, dataset, mode=mode, crop_size=v.crop_size, stride=v.stride, scales=scales,
                           flip=flip, distributed=info.distributed, autocast_dtype=dtype, progress=progress)
        results["settings"] = {
            "checkpoint": str(checkpoint), "dataset": d.kind, "root": d.root, "split": d.val_split,
            "images": len(dataset), "mode": mode, "crop_size": v.crop_size, "stride": v.stride,
            "scales": list(scales), "flip": flip, "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), "processes": info.world_size,
        }
        if info.is_main:
            print(format_table(results))
            json_path, csv_path = save_results(results, Path(out) if out else _default_out(Path(checkpoint)))
            print(f"wrote {json_path} and {csv_path}")
    finally:
        cleanup()
    return results
