"""Multi-task UPerNet: one UPerNet, heads for scene, object, part, material and texture.

The model of "Unified Perceptual Parsing for Scene Understanding" (Xiao et al. 2018).

Where each head reads (Xiao et al. 2018, Fig. 3):
    scene    <- PPM output (1/32): 3x3 ConvBNReLU -> global average pool -> linear
    object   <- fused FPN features (1/4): the UPerHead's own fusion conv -> 1x1 classifier
    part     <- fused FPN features: 3x3 ConvBNReLU -> 1x1, one channel per (object, part) pair
    material <- P2, the stride-4 FPN level: 3x3 ConvBNReLU -> 1x1 classifier
    texture  <- C2, the stride-4 backbone level, gradient stopped: a few convs -> pool -> linear
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_alias, register_model
from .upernet import ConvBNReLU, UPerHead, resize

TASKS = ("scene", "object", "part", "material", "texture")


class PartLayout:
    """The object-part hierarchy: which objects have parts and how many (part 0 = that object's background).

    Args:
        objects: object class index of each object that has parts.
        num_parts: number of part classes of each of those objects, background included.
    """

    def __init__(self, objects: Sequence[int], num_parts: Sequence[int]):
        if len(objects) != len(num_parts) or any(n < 2 for n in num_parts):
            raise ValueError("each object with parts needs >= 2 part classes (background + 1)")
        self.objects = list(objects)
        self.num_parts = list(num_parts)
        starts = [0]
        for n in self.num_parts:
            starts.append(starts[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
        self.num_channels = starts[-1]

    def split(self, part_logits: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(object index, logits of its parts) per object: each slice gets its own softmax."""
        return [(obj, part_logits[:, s]) for obj, s in zip(self.objects, self.slices)]


class _PixelHead(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__(ConvBNReLU(in_channels, channels, 3), nn.Conv2d(channels, num_classes, 1))


class _ImageHead(nn.Module):
    """Convs -> global average pool -> linear: an image-level classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1):
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvBNReLU(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x).mean(dim=(2, 3)))


class MultiTaskUPerNet(nn.Module):
    """Multi-task UPerNet. Heads exist only for the tasks given.

    Args:
        backbone: module returning 4 feature maps, with `channels` and `strides`.
        tasks: number of classes per task, e.g. {"object": 335, "material": 26, "scene": 365,
            "texture": 47, "part": {"objects": [...], "num_parts": [...]}} (see `PartLayout`).
        channels: width of the UPerHead and of the task heads.
        pool_scales: PPM pooling sizes.
        dropout: Dropout2d before the object classifier.
        texture_convs: number of 3x3 convs of the texture head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: dict,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        texture_convs: int = 2,
    ):
        super().__init__()
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {sorted(tasks)}")
        if "part" in tasks and "object" not in tasks:
            raise ValueError("the part task needs the object task (parts are classified within objects)")
        self.backbone = backbone
        self.tasks = dict(tasks)
        # The UPerHead's classifier is the object classifier (a 1-class stub when there is no object task).
        self.decode_head = UPerHead(backbone.channels, tasks.get("object", 1), channels, pool_scales, dropout)
        self.part_layout = PartLayout(**tasks["part"]) if "part" in tasks else None
        self.heads = nn.ModuleDict()
        if "scene" in tasks:
            self.heads["scene"] = _ImageHead(channels, channels, tasks["scene"])
        if "part" in tasks:
            self.heads["part"] = _PixelHead(channels, channels, self.part_layout.num_channels)
        if "material" in tasks:
            self.heads["material"] = _PixelHead(channels, channels, tasks["material"])
        if "texture" in tasks:
            self.heads["texture"] = _ImageHead(backbone.channels[0], channels // 4, tasks["texture"], texture_convs)
        self.config: dict = {}
        self.meta: dict = {}

    def forward(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the requested tasks (default: all): pixel tasks at input size, image tasks (N, classes)."""
        wanted = set(self.tasks if tasks is None else tasks)
        features = self.backbone(images)
        size = images.shape[-2:]
        outputs: dict[str, torch.Tensor] = {}
        if "texture" in wanted:
            outputs["texture"] = self.heads["texture"](features[0].detach())
        if not wanted & {"scene", "object", "part", "material"}:
            return outputs
        levels = self.decode_head.pyramid(features)  # P2, P3, P4, PPM
        if "scene" in wanted:
            outputs["scene"] = self.heads["scene"](levels[-1])
        if "material" in wanted:
            outputs["material"] = resize(self.heads["material"](levels[0]), size)
        if wanted & {"object", "part"}:
            fused = self.decode_head.fuse_levels(levels)
            if "object" in wanted:
                outputs["object"] = resize(self.decode_head.classify(fused), size)
            if "part" in wanted:
                outputs["part"] = resize(self.heads["part"](fused), size)
        return outputs

    def save(self, path: str) -> None:
        from .weights import save_model

        save_model(self, path)


def _backbone_of(base: str, base_args: dict | None) -> nn.Module:
    """The backbone of any registered UPerNet variant (its tiny throw-away head is discarded)."""
    from .registry import build_model  # noqa: PLC0415 (the registry is filled after this module loads)

    return build_model(base, num_classes=1, aux_head=False, channels=8, **(base_args or {})).backbone


@register_model
def upernet_multitask(tasks: dict, base: str = "upernet_r50", base_args: dict | None = None,
                      **head_args) -> MultiTaskUPerNet:
    """Multi-task UPerNet on the backbone of any registered variant `base`."""
    return MultiTaskUPerNet(_backbone_of(base, base_args), tasks, **head_args)


@register_model
def upernet_multitask_r50(tasks: dict, base_args: dict | None = None, **head_args) -> MultiTaskUPerNet:
    """The paper's UPerNet-50 multi-task network (ResNet-50 V1c, output stride 32)."""
    return upernet_multitask(tasks, "upernet_r50", base_args, **head_args)


@register_model
def upernet_multitask_r101(tasks: dict, base_args: dict | None = None, **head_args) -> MultiTaskUPerNet:
    return upernet_multitask(tasks, "upernet_r101", base_args, **head_args)


# names used before the rename; checkpoints store them in config.json and model_config.name
register_alias("upernet_upp", "upernet_multitask")
register_alias("upernet_upp_r50", "upernet_multitask_r50")
register_alias("upernet_upp_r101", "upernet_multitask_r101")


DEFAULT_LOSS_WEIGHTS = {"object": 1.0, "part": 0.5, "scene": 0.25, "material": 1.0, "texture": 1.0}


def part_loss(part_logits: torch.Tensor, object_labels: torch.Tensor, part_labels: torch.Tensor,
              layout: PartLayout, ignore_index: int = 255) -> torch.Tensor | None:
    """Cross-entropy of each object's part slice, only inside that object's pixels.

    An (image, object) pair counts only where its labelled pixels carry >= 2 distinct parts (the
    paper trains parts only on objects annotated with several parts). None when nothing counts.
    """
    total, count = part_logits.new_zeros(()), 0
    for obj, logits in layout.split(part_logits.float()):
        inside = (object_labels == obj) & (part_labels != ignore_index)
        for n in range(part_logits.shape[0]):
            pixels = inside[n]
            if torch.unique(part_labels[n][pixels]).numel() < 2:
                continue
            targets = part_labels[n][pixels]
            if int(targets.max()) >= logits.shape[1]:
                raise ValueError(f"part label {int(targets.max())} outside object {obj}'s {logits.shape[1]} parts")
            total = total + F.cross_entropy(logits[n].permute(1, 2, 0)[pixels], targets, reduction="sum")
            count += int(pixels.sum())
    return total / count if count else None


def multitask_loss(model: "MultiTaskUPerNet", outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
             weights: dict[str, float] | None = None, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """Per-task losses for the tasks that `targets` annotates (a source without a task gives it no loss).

    Returns {task: weighted loss} plus "total"; a pixel task whose labels are all `ignore_index`
    contributes nothing (not a NaN).
    """
    weights = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    losses: dict[str, torch.Tensor] = {}
    for task in ("object", "material"):
        if task in targets and task in outputs and (targets[task] != ignore_index).any():
            losses[task] = F.cross_entropy(outputs[task].float(), targets[task].long(), ignore_index=ignore_index)
    for task in ("scene", "texture"):
        if task in targets and task in outputs:
            losses[task] = F.cross_entropy(outputs[task].float(), targets[task].long())
    if "part" in targets and "part" in outputs and "object" in targets:
        loss = part_loss(outputs["part"], targets["object"], targets["part"], model.part_layout, ignore_index)
        if loss is not None:
            losses["part"] = loss
    weighted = {task: weights[task] * loss for task, loss in losses.items()}
    weighted["total"] = sum(weighted.values()) if weighted else next(iter(outputs.values())).sum() * 0
    return weighted


def part_map(part_logits: torch.Tensor, objects: torch.Tensor, layout: dict) -> torch.Tensor:
    """Global part ids (1 + offset in the part list; 0 = no part) from each pixel's predicted object."""
    out = torch.zeros_like(objects)
    start = 0
    for obj, n in zip(layout["objects"], layout["num_parts"]):
        inside = objects == obj
        best = part_logits[:, start:start + n].argmax(1)
        out[inside & (best > 0)] = (start + best)[inside & (best > 0)] + 1  # part 0 = that object's background
        start += n
    return out
