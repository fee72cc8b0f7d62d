"""Training losses for semantic segmentation, and the recipe's list of them (`train.losses`).

Each loss takes logits (N, C, H, W) and labels (N, H, W) at the same size and skips pixels labelled
`ignore_index`. Pixel-wise losses (cross-entropy, focal, binary cross-entropy) are summed and then
divided as `train.loss_average` says: by the labelled pixels ("valid") or by all pixels ("all",
mmsegmentation's default) — a class weight or an OHEM weight multiplies a pixel's loss, it does not
change the divisor (mmsegmentation's rule, not PyTorch's weighted mean). Region losses (Dice,
Lovasz-softmax) are averaged over classes.

A recipe lists the terms, each `{name, weight, ...options}`, summed with their weights on the main
head's logits and, times the model's `aux_loss_weight`, on the auxiliary head's (as mmsegmentation's
`loss_decode` list):

    train:
      losses:
        - {name: cross_entropy, weight: 1.0, class_weight: auto, ohem: {thresh: 0.7, min_kept: 100000}}
        - {name: lovasz, weight: 0.5}

The default, one plain cross-entropy, is what training always did (and keeps its memory-saving
path inside the model's forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

DEFAULT_LOSSES = [{"name": "cross_entropy", "weight": 1.0}]
CLASS_WEIGHT_RULES = ("enet", "median")


# ---- the losses ------------------------------------------------------------------------------
def reduce_pixels(losses: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: str,
                  pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel losses (N, H, W), 0 at ignored pixels, summed and divided as `average` says."""
    if pixel_weight is not None:
        losses = losses * pixel_weight
    if average == "valid":
        return losses.sum() / labels.ne(ignore_index).sum().clamp(min=1)
    if average == "all":
        return losses.sum() / labels.numel()
    raise ValueError(f"average must be 'valid' or 'all', got {average!r}")


def cross_entropy_pixels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                         class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross-entropy (N, H, W), times the weight of the pixel's true class; 0 where ignored."""
    weight = None if class_weight is None else class_weight.to(logits.device, torch.float32)
    return F.cross_entropy(logits.float(), labels.long(), weight=weight, ignore_index=ignore_index, reduction="none")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                  class_weight: torch.Tensor | None = None, pixel_weight: torch.Tensor | None = None,
                  average: str = "valid") -> torch.Tensor:
    """Cross-entropy, each pixel's term times the weight of its true class (and its `pixel_weight`).

    Args:
        logits: (N, C, H, W).
        labels: (N, H, W) class indices or `ignore_index`.
        ignore_index: label of pixels without a loss.
        class_weight: (C,) weight of each true class; None: all 1.
        pixel_weight: (N, H, W) weight of each pixel (OHEM's 0/1); None: all 1.
        average: "valid" or "all" (see the module docstring).
    """
    losses = cross_entropy_pixels(logits, labels, ignore_index, class_weight)
    return reduce_pixels(losses, labels, ignore_index, average, pixel_weight)


def focal_pixels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, gamma: float = 2.0,
                 class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel focal loss (N, H, W): -alpha_t (1 - p_t)^gamma log p_t; 0 where ignored."""
    valid = labels.ne(ignore_index)
    target = labels.long().where(valid, torch.zeros_like(labels, dtype=torch.long))
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    losses = -(1 - log_p.exp()).pow(gamma) * log_p
    if class_weight is not None:
        losses = losses * class_weight.to(logits.device, torch.float32)[target]
    return losses * valid


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, gamma: float = 2.0,
               class_weight: torch.Tensor | None = None, pixel_weight: torch.Tensor | None = None,
               average: str = "valid") -> torch.Tensor:
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t per pixel; gamma=0 is cross-entropy.

    Args:
        logits: (N, C, H, W).
        labels: (N, H, W) class indices or `ignore_index`.
        ignore_index: label of pixels without a loss.
        gamma: focusing exponent.
        class_weight: (C,) alpha_t of each true class; None: all 1.
        pixel_weight: (N, H, W) weight of each pixel; None: all 1.
        average: "valid" or "all".
    """
    losses = focal_pixels(logits, labels, ignore_index, gamma, class_weight)
    return reduce_pixels(losses, labels, ignore_index, average, pixel_weight)


def binary_cross_entropy_pixels(logit: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                                pos_weight: float | None = None) -> torch.Tensor:
    """Per-pixel sigmoid cross-entropy (N, H, W) of the foreground logit (N, 1, H, W); 0 where ignored."""
    valid = labels.ne(ignore_index)
    target = (labels == 1).float()
    weight = None if pos_weight is None else torch.tensor(float(pos_weight), device=logit.device)
    losses = F.binary_cross_entropy_with_logits(logit[:, 0].float(), target, pos_weight=weight, reduction="none")
    return losses * valid


def binary_cross_entropy(logit: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                         pos_weight: float | None = None, pixel_weight: torch.Tensor | None = None,
                         average: str = "valid") -> torch.Tensor:
    """Sigmoid cross-entropy of one foreground logit (N, 1, H, W) against labels 0/1.

    Args:
        logit: (N, 1, H, W) foreground logit.
        labels: (N, H, W) 0 (background), 1 (foreground) or `ignore_index`.
        ignore_index: label of pixels without a loss.
        pos_weight: weight of the foreground pixels' term (PyTorch's `pos_weight`); None: 1.
        pixel_weight: (N, H, W) weight of each pixel; None: all 1.
        average: "valid" or "all".
    """
    losses = binary_cross_entropy_pixels(logit, labels, ignore_index, pos_weight)
    return reduce_pixels(losses, labels, ignore_index, average, pixel_weight)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0,
              exponent: float = 2.0, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss on the softmax, mmsegmentation 0.x's form: per image and class
    1 - (2 sum(p g) + smooth) / (sum(p^exponent) + sum(g^exponent) + smooth) over labelled pixels,
    averaged over classes (weighted by `class_weight`) and images.

    Args:
        logits: (N, C, H, W).
        labels: (N, H, W) class indices or `ignore_index`.
        ignore_index: label of pixels without a loss.
        smooth: added to numerator and denominator (an absent class predicted absent scores 0 loss).
        exponent: power of the denominator's terms (2 as V-Net, 1 for the plain Dice).
        class_weight: (C,) weight of each class in the mean; None: all 1.
    """
    num_classes = logits.shape[1]
    valid = labels.ne(ignore_index).unsqueeze(1).float()
    probs = logits.float().softmax(dim=1) * valid
    target = labels.long().where(labels.ne(ignore_index), torch.zeros_like(labels, dtype=torch.long))
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).flatten(2).sum(-1)
    denominator = probs.pow(exponent).flatten(2).sum(-1) + onehot.pow(exponent).flatten(2).sum(-1)
    per_class = 1 - (2 * inter + smooth) / (denominator + smooth)  # (N, C)
    if class_weight is None:
        return per_class.mean()
    weight = class_weight.to(logits.device, torch.float32)
    return (per_class * weight).sum(1).div(weight.sum()).mean()


def lovasz_gradient(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Berman et al. 2018, Alg. 1: the Jaccard loss's increments along pixels sorted by decreasing error."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1 - sorted_truth).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                   classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax loss (Berman, Triki, Blaschko, CVPR 2018) over the batch's labelled pixels:
    the mean over classes of the Lovasz extension of the Jaccard loss at the errors |1[y=c] - p_c|.

    Args:
        logits: (N, C, H, W).
        labels: (N, H, W) class indices or `ignore_index`.
        ignore_index: label of pixels without a loss.
        classes: "present" (classes in the labels only, the paper's default) or "all".
    """
    if classes not in ("present", "all"):
        raise UserError(f"lovasz classes={classes!r}: use 'present' or 'all'")
    probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat = labels.reshape(-1)
    keep = flat.ne(ignore_index)
    probs, flat = probs[keep], flat[keep]
    terms = []
    for c in range(probs.shape[1]):
        truth = (flat == c).float()
        if classes == "present" and truth.sum() == 0:
            continue
        errors = (truth - probs[:, c]).abs()
        errors, order = errors.sort(descending=True)
        terms.append(torch.dot(errors, lovasz_gradient(truth[order])))
    if not terms:  # no labelled pixel: no loss, but a graph for backward
        return logits.sum() * 0.0
    return torch.stack(terms).mean()


@torch.no_grad()
def ohem_weights(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                 thresh: float | None = 0.7, min_kept: int = 100000,
                 pixel_losses: torch.Tensor | None = None) -> torch.Tensor:
    """Online hard example mining, mmsegmentation's `OHEMPixelSampler`: 1 for the kept pixels, else 0.

    With `thresh`: the labelled pixels whose softmax probability of the true class is below
    max(thresh, the (min_kept x N)-th smallest such probability) (so at least `min_kept` per image
    are kept when there are that many). Without: the min_kept x N labelled pixels of largest loss
    (`pixel_losses`, (N, H, W)).

    Args:
        logits: (N, C, H, W).
        labels: (N, H, W) class indices or `ignore_index`.
        ignore_index: label of pixels never kept.
        thresh: probability threshold, or None to keep the largest losses.
        min_kept: pixels kept per image at least.
        pixel_losses: the per-pixel losses, needed when `thresh` is None.
    """
    valid = labels.ne(ignore_index)
    kept_count = min_kept * labels.shape[0]
    weights = torch.zeros(labels.shape, device=logits.device)
    if thresh is not None:
        target = labels.long().where(valid, torch.zeros_like(labels, dtype=torch.long))
        prob = logits.float().softmax(dim=1).gather(1, target.unsqueeze(1)).squeeze(1)[valid]
        ranked = prob.sort().values
        floor = ranked[min(kept_count, ranked.numel() - 1)] if ranked.numel() else 0.0
        weights[valid] = (prob < max(float(floor), thresh)).float()
    else:
        if pixel_losses is None:
            raise ValueError("ohem without thresh ranks pixels by their loss: pass pixel_losses")
        order = pixel_losses.detach()[valid].sort(descending=True).indices
        chosen = torch.zeros(order.numel(), device=logits.device)
        chosen[order[:kept_count]] = 1.0
        weights[valid] = chosen
    return weights


# ---- class weights from pixel frequencies ---------------------------------------------------
def class_weights_from_frequencies(pixels: Sequence[float], rule: str = "enet",
                                   image_pixels: Sequence[float] | None = None) -> list[float]:
    """Class weights from class pixel counts (or fractions).

    - "enet" (Paszke et al. 2016): w_c = 1 / ln(1.02 + f_c), f_c = the class's fraction of all
      labelled pixels; weights lie between 1/ln(2.02) = 1.42 and 1/ln(1.02) = 50.5.
    - "median" (median-frequency balancing, Eigen & Fergus 2015): w_c = median(f) / f_c with
      f_c = the class's pixels / the pixels of the images where it appears (`image_pixels`; the
      labelled total when not given), the median over the classes that appear.
    A class that never appears gets weight 0 under "median" (it has no pixel to weigh), and
    1/ln(1.02) under "enet".

    Args:
        pixels: labelled pixels of each class (counts or fractions).
        rule: "enet" or "median".
        image_pixels: per class, the labelled pixels of the images containing that class.
    """
    counts = [float(p) for p in pixels]
    total = sum(counts)
    if total <= 0 or min(counts) < 0:
        raise UserError(f"class frequencies {counts}: need non-negative values with a positive sum")
    if rule == "enet":
        return [1 / math.log(1.02 + c / total) for c in counts]
    if rule == "median":
        seen = image_pixels if image_pixels is not None else [total] * len(counts)
        freq = [c / s if c > 0 and s > 0 else 0.0 for c, s in zip(counts, seen)]
        present = sorted(f for f in freq if f > 0)
        half = len(present) // 2
        median = present[half] if len(present) % 2 else (present[half - 1] + present[half]) / 2
        return [median / f if f > 0 else 0.0 for f in freq]
    raise UserError(f"class_weight_rule={rule!r}: use one of {', '.join(CLASS_WEIGHT_RULES)}")


def count_class_pixels(dataset, num_classes: int) -> tuple[list[int], list[int]]:
    """Per class, the labelled pixels over every mask of `dataset` (masks only, before the transform), and the
    labelled pixels of the images where the class appears (what "median" balancing divides by)."""
    pixels = torch.zeros(num_classes, dtype=torch.int64)
    image_pixels = torch.zeros(num_classes, dtype=torch.int64)
    ignore = int(dataset.ignore_index)
    for index in range(len(dataset)):
        label = dataset.load_label(index).reshape(-1).long()
        label = label[label.ne(ignore)]
        counts = torch.bincount(label, minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels += (counts > 0).long() * label.numel()
    return pixels.tolist(), image_pixels.tolist()


# ---- the recipe's list of losses ------------------------------------------------------------
# Per loss name: its per-pixel function (None for the region losses) and the options an entry takes.
PIXELWISE = {"cross_entropy": cross_entropy_pixels, "focal": focal_pixels,
             "binary_cross_entropy": binary_cross_entropy_pixels}
CLASS_WEIGHT_OPTIONS = {"class_weight", "class_weight_rule", "class_frequencies"}
OPTIONS = {"cross_entropy": CLASS_WEIGHT_OPTIONS | {"ohem"},
           "focal": CLASS_WEIGHT_OPTIONS | {"gamma", "ohem"},
           "binary_cross_entropy": {"pos_weight", "threshold", "ohem"},
           "dice": CLASS_WEIGHT_OPTIONS | {"smooth", "exponent"},
           "lovasz": {"classes"}}
LOSS_NAMES = tuple(OPTIONS)


@dataclass
class LossTerm:
    """One entry of `train.losses`: a loss with its options bound, its weight, its OHEM settings."""

    name: str
    weight: float
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pixelwise: bool
    ohem: dict | None = None


@dataclass
class SegmentationLoss:
    """The weighted sum of the recipe's losses on one head's logits (see the module docstring).

    In binary mode (a `binary_cross_entropy` term) the model has one output channel, the foreground
    logit z; the other terms see the two-class logits (0, z), whose softmax is (1 - sigmoid(z), sigmoid(z)).
    """

    terms: list[LossTerm]
    ignore_index: int = 255
    average: str = "valid"
    binary_threshold: float | None = None

    @property
    def binary(self) -> bool:
        """One output channel and a sigmoid (a `binary_cross_entropy` term)."""
        return self.binary_threshold is not None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, sample: bool = True
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each term's unweighted value; `sample=False` skips OHEM (the auxiliary head)."""
        labels = labels.long()
        two = logits
        if self.binary:
            if logits.shape[1] != 1:
                raise ValueError(f"binary mode needs a 1-channel model, got {logits.shape[1]} channels")
            two = torch.cat([torch.zeros_like(logits), logits], dim=1)
        total, parts = logits.new_zeros((), dtype=torch.float32), {}
        for term in self.terms:
            x = logits if term.name == "binary_cross_entropy" else two
            if term.pixelwise:
                losses = term.compute(x, labels)
                weight = None
                if term.ohem is not None and sample:
                    weight = ohem_weights(two, labels, self.ignore_index, term.ohem.get("thresh"),
                                          int(term.ohem.get("min_kept", 100000)), losses)
                value = reduce_pixels(losses, labels, self.ignore_index, self.average, weight)
            else:
                value = term.compute(x, labels)
            parts[term.name] = value
            total = total + term.weight * value
        return total, parts


def is_default(entries: Sequence[dict]) -> bool:
    """Whether `entries` is plain cross-entropy alone, what the model's forward computes itself."""
    return [dict(e) for e in entries] in (DEFAULT_LOSSES, [{"name": "cross_entropy"}])


def build_loss(entries: Sequence[dict], num_classes: int, ignore_index: int = 255, average: str = "valid",
               dataset=None) -> SegmentationLoss:
    """The `SegmentationLoss` of the recipe's `train.losses`; bad entries are a `UserError` naming them.

    Args:
        entries: `train.losses`, each {name, weight, ...options}.
        num_classes: classes of the dataset (2 in binary mode: background, foreground).
        ignore_index: label of pixels without a loss.
        average: `train.loss_average`, "valid" or "all".
        dataset: the training set, read when an entry says `class_weight: auto` (masks counted once).
    """
    if not entries:
        raise UserError("train.losses is empty; give at least one loss, e.g. [{name: cross_entropy}]")
    terms, threshold, counted = [], None, {}
    binary = any(isinstance(e, dict) and e.get("name") == "binary_cross_entropy" for e in entries)
    if binary and num_classes != 2:
        raise UserError(f"train.losses: binary_cross_entropy needs a dataset of 2 classes (background, foreground), "
                        f"this one has {num_classes}; use cross_entropy")
    for i, entry in enumerate(entries):
        where = f"train.losses[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"{where}: expected a mapping with a name (one of {', '.join(LOSS_NAMES)}), got {entry!r}")
        options = dict(entry)
        name = options.pop("name")
        if name not in OPTIONS:
            raise UserError(f"{where}: unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)}")
        weight = options.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise UserError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        unknown = sorted(set(options) - OPTIONS[name])
        if unknown:
            raise UserError(f"{where}: unknown option(s) {unknown} for {name}; known: {sorted(OPTIONS[name])}")
        ohem = options.pop("ohem", None)
        if ohem is not None:
            if not isinstance(ohem, dict) or set(ohem) - {"thresh", "min_kept"}:
                raise UserError(f"{where}.ohem: expected {{thresh: 0.7, min_kept: 100000}} (thresh may be null), "
                                f"got {ohem!r}")
            if int(ohem.get("min_kept", 100000)) < 1:
                raise UserError(f"{where}.ohem.min_kept must be at least 1, got {ohem['min_kept']}")
        class_weight = class_weight_of(options, where, num_classes, ignore_index, dataset, counted)
        if name == "binary_cross_entropy":
            threshold = float(options.pop("threshold", 0.5))
            if not 0 < threshold < 1:
                raise UserError(f"{where}.threshold must be between 0 and 1, got {threshold}")
        if name in PIXELWISE:
            compute = bind(PIXELWISE[name], ignore_index=ignore_index, class_weight=class_weight, **options)
        elif name == "dice":
            compute = bind(dice_loss, ignore_index=ignore_index, class_weight=class_weight, **options)
        else:
            compute = bind(lovasz_softmax, ignore_index=ignore_index, **options)
        terms.append(LossTerm(name, float(weight), compute, name in PIXELWISE, ohem))
    return SegmentationLoss(terms, ignore_index, average, threshold)


def bind(function: Callable[..., torch.Tensor], **options: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`function(logits, labels, **options)`, dropping a `class_weight` of None for functions without it."""
    if options.get("class_weight", 0) is None:
        options.pop("class_weight")
    return lambda logits, labels: function(logits, labels, **options)


def class_weight_of(options: dict, where: str, num_classes: int, ignore_index: int, dataset,
                    counted: dict) -> torch.Tensor | None:
    """An entry's class weights (its class_weight* options are removed from `options`): a list, or
    `auto` from `class_frequencies` or from the training masks (counted once into `counted`)."""
    given = options.pop("class_weight", None)
    rule = options.pop("class_weight_rule", "enet")
    frequencies = options.pop("class_frequencies", None)
    if rule not in CLASS_WEIGHT_RULES:
        raise UserError(f"{where}.class_weight_rule={rule!r}: use one of {', '.join(CLASS_WEIGHT_RULES)}")
    if given is None:
        if frequencies is not None:
            raise UserError(f"{where}: class_frequencies is only read with class_weight: auto")
        return None
    if given == "auto":
        image_pixels = None
        if frequencies is None:
            if dataset is None:
                raise UserError(f"{where}: class_weight: auto needs the training set or class_frequencies")
            if "pixels" not in counted:
                counted["pixels"], counted["image_pixels"] = count_class_pixels(dataset, num_classes)
            frequencies, image_pixels = counted["pixels"], counted["image_pixels"]
        if not isinstance(frequencies, (list, tuple)) or len(frequencies) != num_classes:
            raise UserError(f"{where}.class_frequencies: expected {num_classes} numbers (one per class), "
                            f"got {frequencies!r}")
        given = class_weights_from_frequencies(frequencies, rule, image_pixels)
    if not isinstance(given, (list, tuple)) or len(given) != num_classes or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in given):
        raise UserError(f"{where}.class_weight: expected auto or {num_classes} numbers >= 0 (one per class), "
                        f"got {given!r}")
    return torch.tensor([float(w) for w in given])
