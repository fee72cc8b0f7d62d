"""Logits -> class probabilities, for every inference path (whole, slide, tiled, serve).

A model trained with `binary_cross_entropy` has one output channel (the foreground logit) and
predicts two classes; every other model's channels are its classes, turned into probabilities by a
softmax over them.
"""
from __future__ import annotations

import math

import torch


def predicted_classes(model) -> int:
    """Classes a segmentation model predicts: its `num_classes`, or 2 (background, foreground) for a
    sigmoid model with one output channel (trained with `binary_cross_entropy`)."""
    num_classes = int(model.num_classes)
    return 2 if num_classes == 1 else num_classes


def binary_probabilities(logit: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """One foreground logit (N, 1, H, W) -> (N, 2, H, W) probabilities (background, foreground) whose
    argmax is foreground exactly where sigmoid(logit) > `threshold`: the logit is shifted by
    logit(threshold), so at the default 0.5 they are (1 - sigmoid, sigmoid)."""
    foreground = torch.sigmoid(logit - math.log(threshold / (1 - threshold)))
    return torch.cat([1 - foreground, foreground], dim=1)


def class_probabilities(logits: torch.Tensor, binary_threshold: float = 0.5) -> torch.Tensor:
    """(N, C, ...) logits -> (N, classes, ...) probabilities: the softmax over C, or for one channel
    (a sigmoid model) the (background, foreground) pair split at `binary_threshold`."""
    return binary_probabilities(logits, binary_threshold) if logits.shape[1] == 1 else logits.softmax(dim=1)
