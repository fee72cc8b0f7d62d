"""Segmentation metrics from one confusion matrix: aAcc, mIoU, mAcc and per-class IoU/Acc.

The matrix is accumulated over the whole split (rows: label, columns: prediction), summed across
processes, and only then turned into ratios, so the numbers do not depend on how the split was
divided. The rules are mmsegmentation's `IoUMetric`:

- aAcc = correct pixels / labelled pixels (pixels whose label is the ignore index are left out);
- IoU(c) = intersect / (pred area + label area - intersect); NaN when class c is absent from both
  the predictions and the labels;
- Acc(c) = intersect / label area; NaN when class c is absent from the labels;
- mIoU and mAcc are means over the non-NaN classes; every number is in percent, rounded to 2
  decimals after averaging.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Counts of (label, prediction) pairs over the pixels whose label is not `ignore_index`.

    Args:
        pred: predicted class indices, any shape.
        label: ground-truth class indices, same shape as `pred`.
        num_classes: number of classes C.
        ignore_index: label value of pixels that are not evaluated.

    Returns:
        An int64 (C, C) matrix on `pred`'s device; entry [i, j] counts pixels of label i predicted as j.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    label = label.to(device=pred.device, dtype=torch.int64).reshape(-1)
    pred = pred.to(torch.int64).reshape(-1)
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    for name, values in (("label", label), ("prediction", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            found = torch.unique(values[bad])[:10].tolist()
            raise ValueError(f"{name} values {found} are outside the classes 0..{num_classes - 1} and not the "
                             f"ignore index {ignore_index}")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def reduce(confusion: torch.Tensor) -> torch.Tensor:
    """Sum `confusion` over all processes when torch.distributed is initialised (else return it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return confusion
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = confusion.to(device=device, dtype=torch.int64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(confusion.device)


def _percent(value: float) -> float:
    """mmsegmentation's presentation: percent, rounded to 2 decimals (NaN stays NaN)."""
    return float(np.round(value * 100, 2))


def summarize(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """aAcc, mIoU, mAcc and per-class IoU/Acc (percent, 2 decimals) from a (C, C) confusion matrix.

    Args:
        confusion: int64 (C, C) counts, rows label, columns prediction (see `confusion_matrix`).
        class_names: C names for the per-class list; defaults to the class indices as strings.

    Returns:
        {"aAcc", "mIoU", "mAcc": float, "per_class": [{"class", "IoU", "Acc"}, ...]}; undefined
        values are NaN (see the module docstring).
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {tuple(confusion.shape)}")
    num_classes = confusion.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a confusion matrix of {num_classes} classes")
    counts = confusion.detach().cpu().to(torch.float64).numpy()
    intersect = np.diag(counts)
    area_label = counts.sum(axis=1)
    area_pred = counts.sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union  # 0 / 0 -> NaN: class absent from labels and predictions
        acc = intersect / area_label  # x / 0 -> NaN: class absent from labels (intersect is 0 then)
        acc[area_label == 0] = np.nan
        iou[union == 0] = np.nan
        all_acc = intersect.sum() / area_label.sum() if area_label.sum() > 0 else math.nan

    def nanmean(values: np.ndarray) -> float:
        present = values[~np.isnan(values)]
        return float(present.mean()) if present.size else math.nan

    return {
        "aAcc": _percent(all_acc),
        "mIoU": _percent(nanmean(iou)),
        "mAcc": _percent(nanmean(acc)),
        "per_class": [{"class": name, "IoU": _percent(i), "Acc": _percent(a)} for name, i, a in zip(names, iou, acc)],
    }
