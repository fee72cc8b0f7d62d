"""Multi-task UPerNet: one UPerNet, heads for scene, object, part, material and texture.

The model of "Unified Perceptual Parsing for Scene Understanding" (Xiao et al. 2018).

Where each head reads (Xiao et al. 2018, Fig. 3):
    scene    <- PPM output (1/32): 3x3 ConvBNReLU -> global average pool -> linear
    object   <- fused FPN features (1/4): the UPerHead's own fusion conv -> 1x1 classifier
    part     <- fused FPN features: 3x3 ConvBNReLU -> 1x1, one channel per (object, part) pair
    material <- P2, the stride-4 FPN level: 3x3 ConvBNReLU -> 1x1 classifier
    texture  <- C2, the stride-4 backbone level, gradient stopped: a few convs -> pool -> linear

Two head layouts read the same levels:
    "paper" (the default when tasks are given): mmsegmentation's UPerHead, adaptive average pooling
        in the PPM, the object classifier a 1x1 conv after dropout.
    "csail": the network the authors released (CSAILVision/unifiedparsing `models/models.py`), whose
        trained Broden+ weights `upernet convert` reads: the PPM pools with Precise RoI Pooling over
        the whole map, resizes, then 1x1 conv (512 wide whatever the FPN width); the object head is a
        3x3 ConvBNReLU -> 1x1 conv like the part and material heads; no dropout. Their network has
        no texture head; ours keeps the paper's when the tasks include texture.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..labelsets import broden_plus_meta, broden_plus_tasks
from ..ops.prroi_pool import prroi_pool2d_whole
from .registry import register_alias, register_model
from .upernet import ConvBNReLU, UPerHead, resize

TASKS = ("scene", "object", "part", "material", "texture")
LAYOUTS = ("paper", "csail")
# The authors' input: BGR 0-255 minus (102.9801, 115.9465, 122.7717), std 1. Converted weights take RGB
# (their first conv's input channels are reversed), so the mean is given in RGB order.
CSAIL_MEAN = (122.7717, 115.9465, 102.9801)
CSAIL_STD = (1.0, 1.0, 1.0)


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


class CsailUPerHead(UPerHead):
    """UPerHead with the authors' PPM and object head (layout "csail").

    Args:
        in_channels: channels of each backbone level, finest (stride 4) first.
        num_classes: object classes.
        channels: FPN width (`fpn_dim`: 512 for their `upernet`, 256 for `upernet_lite`).
        pool_scales: output sizes of the Precise RoI Pooling of the PPM.
        ppm_channels: width of each PPM branch's 1x1 conv (512 in both of their decoders).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_channels: int = 512):
        super().__init__(in_channels, num_classes, channels, pool_scales, dropout=0.0, ppm_upsample_first=True)
        top = in_channels[-1]
        if ppm_channels != channels:  # UPerHead has one width; theirs differ in upernet_lite
            self.ppm = nn.ModuleList(ConvBNReLU(top, ppm_channels, 1) for _ in self.pool_scales)
            self.ppm_bottleneck = ConvBNReLU(top + len(self.pool_scales) * ppm_channels, channels, 3)
        # Their object head: 3x3 ConvBNReLU -> 1x1 conv (with bias), in place of UPerHead's bare 1x1.
        self.classifier = nn.Sequential(ConvBNReLU(channels, channels, 3), nn.Conv2d(channels, num_classes, 1))

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        """PPM on the stride-32 map: Precise RoI Pooling of the whole map to each scale, resize back,
        1x1 conv, concat with the map, 3x3 conv."""
        size = x.shape[-2:]
        branches = [x]
        for scale, conv in zip(self.pool_scales, self.ppm):
            branches.append(conv(resize(prroi_pool2d_whole(x, scale), size, self.align_corners)))
        return self.concat_conv(self.ppm_bottleneck, branches, size)


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
        layout: "paper" or "csail" (the authors' released network, see the module docstring).
        ppm_channels: width of the PPM branches in the "csail" layout (None: 512).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: dict,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        texture_convs: int = 2,
        layout: str = "paper",
        ppm_channels: int | None = None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if ppm_channels is not None and layout != "csail":
            raise ValueError("ppm_channels is an option of the csail layout")
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {sorted(tasks)}")
        if "part" in tasks and "object" not in tasks:
            raise ValueError("the part task needs the object task (parts are classified within objects)")
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.layout = layout
        # The UPerHead's classifier is the object classifier (a 1-class stub when there is no object task).
        if layout == "csail":
            self.decode_head = CsailUPerHead(backbone.channels, tasks.get("object", 1), channels, pool_scales,
                                             512 if ppm_channels is None else ppm_channels)
        else:
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

    @property
    def in_channels(self) -> int:
        """Channels of the input images (the backbone's; 3 unless built with `in_channels`)."""
        return int(getattr(self.backbone, "in_channels", 3))

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


def _backbone_of(base: str, base_args: dict | None, in_channels: int = 3) -> nn.Module:
    """The backbone of any registered UPerNet variant (its tiny throw-away head is discarded)."""
    from .registry import build_model  # noqa: PLC0415 (the registry is filled after this module loads)

    args = dict(base_args or {})
    if in_channels != 3:  # left out at 3, as the single-task variants do
        args["in_channels"] = in_channels
    return build_model(base, num_classes=1, aux_head=False, channels=8, **args).backbone


def _broden_plus_defaults(tasks: dict | None, layout: str | None) -> tuple[dict, str, dict]:
    """(tasks, layout, meta): no tasks means the authors' Broden+ network (layout "csail", class names,
    part hierarchy and their input normalisation in the meta); given tasks keep the "paper" layout."""
    if tasks is not None:
        return tasks, layout or "paper", {}
    meta = {"tasks_meta": broden_plus_meta(), "mean": list(CSAIL_MEAN), "std": list(CSAIL_STD)}
    return broden_plus_tasks(), layout or "csail", meta


@register_model
def upernet_multitask(tasks: dict | None = None, base: str = "upernet_r50", base_args: dict | None = None,
                      layout: str | None = None, in_channels: int = 3, **head_args) -> MultiTaskUPerNet:
    """Multi-task UPerNet on the backbone of any registered variant `base` (no tasks: Broden+, layout csail);
    `in_channels`: channels of the input images, as for every single-task variant."""
    tasks, layout, meta = _broden_plus_defaults(tasks, layout)
    model = MultiTaskUPerNet(_backbone_of(base, base_args, in_channels), tasks, layout=layout, **head_args)
    model.meta.update(meta)
    return model


def _csail_resnet_args(layout: str | None, tasks: dict | None, base_args: dict | None) -> dict | None:
    """The csail layout's ResNet has the authors' deep stem, 3x3 convs 64-64-128 (ours: 32-32-64)."""
    if (layout or ("paper" if tasks is not None else "csail")) == "csail":
        base_args = dict(base_args or {})
        base_args["backbone_args"] = {"stem_width": 64, **(base_args.get("backbone_args") or {})}
    return base_args


@register_model
def upernet_multitask_r50(tasks: dict | None = None, base_args: dict | None = None, layout: str | None = None,
                          in_channels: int = 3, **head_args) -> MultiTaskUPerNet:
    """The paper's UPerNet-50 multi-task network (ResNet-50, output stride 32); no arguments: the
    authors' released Broden+ network (`upernet convert` reads their weights)."""
    return upernet_multitask(tasks, "upernet_r50", _csail_resnet_args(layout, tasks, base_args), layout, in_channels,
                             **head_args)


@register_model
def upernet_multitask_r101(tasks: dict | None = None, base_args: dict | None = None, layout: str | None = None,
                           in_channels: int = 3, **head_args) -> MultiTaskUPerNet:
    """UPerNet-101 multi-task network; no arguments: the authors' released Broden+ network."""
    return upernet_multitask(tasks, "upernet_r101", _csail_resnet_args(layout, tasks, base_args), layout, in_channels,
                             **head_args)


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
