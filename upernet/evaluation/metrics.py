"""Segmentation metrics from one confusion matrix: aAcc and per class (and their means) IoU, Acc, Dice,
F-score, precision and recall.

The matrix is accumulated over the whole split (rows: label, columns: prediction), summed across
processes, and only then turned into ratios, so the numbers do not depend on how the split was
divided. The rules are mmsegmentation's `IoUMetric`:

- aAcc = correct pixels / labelled pixels (pixels whose label is the ignore index are left out);
- IoU(c) = intersect / (pred area + label area - intersect); NaN when class c is absent from both
  the predictions and the labels;
- Acc(c) = intersect / label area; NaN when class c is absent from the labels;
- Dice(c) = 2 intersect / (pred area + label area); NaN when class c is absent from both;
- Precision(c) = intersect / pred area (NaN when c is never predicted), Recall(c) = intersect /
  label area (= Acc(c));
- Fscore(c) = (1 + beta^2) P R / (beta^2 P + R) (`IoUMetric`'s `beta`): NaN where P or R is NaN.
  One difference from mmsegmentation: when c is labelled and predicted but never where labelled
  (P = R = 0), mmsegmentation computes 0 / 0 = NaN and leaves the class out of mFscore; here it is
  0, the limit, so that a class missed everywhere lowers the mean instead of leaving it;
- `nan_to_num`, if given, replaces every NaN (aAcc and the per-class values) before the means, as
  `IoUMetric(nan_to_num=...)` does, so with `nan_to_num=0` absent classes count as 0 in the means.
  It is in percent, the unit printed (mmsegmentation's is a fraction: its 1 is our 100);
- the means (mIoU, mAcc, mDice, mFscore, mPrecision, mRecall) are over the non-NaN classes; every
  number is in percent, rounded to 2 decimals after averaging.
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


def gather(items: list) -> list:
    """The lists of every process concatenated in rank order (`items` itself when torch.distributed is not initialised).

    Items travel pickled (`all_gather_object`), so they may hold numpy arrays; every rank gets the whole list.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def _percent(value: float) -> float:
    """mmsegmentation's presentation: percent, rounded to 2 decimals (NaN stays NaN)."""
    return float(np.round(value * 100, 2))


PER_CLASS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")  # per-class columns, in table order


def per_class_ratios(confusion: torch.Tensor, beta: float = 1.0) -> dict[str, np.ndarray]:
    """The per-class fractions of `PER_CLASS` and "aAcc" (a 0-d array), NaN where undefined (see the module docstring).

    Args:
        confusion: int64 (C, C) counts, rows label, columns prediction (see `confusion_matrix`).
        beta: weight of recall in the F-score (1: F1).
    """
    counts = confusion.detach().cpu().to(torch.float64).numpy()
    intersect = np.diag(counts)
    area_label = counts.sum(axis=1)
    area_pred = counts.sum(axis=0)
    union = area_label + area_pred - intersect

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        out = np.full_like(numerator, np.nan)
        np.divide(numerator, denominator, out=out, where=denominator > 0)
        return out

    precision, recall = ratio(intersect, area_pred), ratio(intersect, area_label)
    b2 = beta * beta
    fscore = ratio((1 + b2) * precision * recall, b2 * precision + recall)  # NaN propagates from P or R
    fscore[(precision == 0) & (recall == 0)] = 0.0  # mmsegmentation: 0 / 0 = NaN
    return {
        "aAcc": ratio(intersect.sum(keepdims=True), area_label.sum(keepdims=True))[0],
        "IoU": ratio(intersect, union), "Acc": recall, "Dice": ratio(2 * intersect, area_label + area_pred),
        "Fscore": fscore, "Precision": precision, "Recall": recall,
    }


def image_miou(confusion: torch.Tensor) -> float:
    """The mean IoU (fraction) over the classes present in one image's labels or prediction; NaN if none is."""
    iou = per_class_ratios(confusion)["IoU"]
    present = iou[~np.isnan(iou)]
    return float(present.mean()) if present.size else math.nan


def summarize(confusion: torch.Tensor, class_names: Sequence[str] | None = None, beta: float = 1.0,
              nan_to_num: float | None = None) -> dict:
    """aAcc, and per class and as means IoU, Acc, Dice, F-score, precision, recall (percent, 2 decimals).

    Args:
        confusion: int64 (C, C) counts, rows label, columns prediction (see `confusion_matrix`).
        class_names: C names for the per-class list; defaults to the class indices as strings.
        beta: weight of recall in the F-score (mmsegmentation's `beta`; 1: F1).
        nan_to_num: percent value replacing every NaN before the means (None: NaN stays, left out of the means).

    Returns:
        {"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall": float,
        "per_class": [{"class", "IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"}, ...]};
        undefined values are NaN (see the module docstring).
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {tuple(confusion.shape)}")
    num_classes = confusion.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a confusion matrix of {num_classes} classes")
    ratios = per_class_ratios(confusion, beta)
    if nan_to_num is not None:
        ratios = {key: np.nan_to_num(value, nan=nan_to_num / 100) for key, value in ratios.items()}

    def nanmean(values: np.ndarray) -> float:
        present = values[~np.isnan(values)]
        return float(present.mean()) if present.size else math.nan

    results = {"aAcc": _percent(float(ratios["aAcc"]))}
    results.update({f"m{key}": _percent(nanmean(ratios[key])) for key in PER_CLASS})
    results["per_class"] = [{"class": name, **{key: _percent(ratios[key][c]) for key in PER_CLASS}}
                            for c, name in enumerate(names)]
    return results
