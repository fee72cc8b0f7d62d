"""UPerNet: a backbone's 4 feature levels -> UPerHead (PPM + FPN + fusion) -> per-pixel logits.

Semantics follow mmsegmentation's `UPerHead` and `FCNHead`, which the published checkpoints
(mmsegmentation, Hugging Face, InternImage) were trained with.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..errors import UserError
from ..ops.concat_conv import concat_conv
from ..ops.pooling import adaptive_avg_pool2d
from ..ops.resize import banded_resize, resize
from ..ops.winograd import winograd_weight

MIN_SIDE = 32  # inputs are padded up to this many pixels per side (the coarsest feature stride)


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, the building block of every UPerNet head."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        # `winograd_weight(conv.weight)`, kept by `prepare_winograd` for inference (not saved).
        self.register_buffer("winograd_weight", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_concat(self, inputs: Sequence[torch.Tensor], size: Sequence[int], strategy: str = "literal",
                       align_corners: bool = False) -> torch.Tensor:
        """`self(cat([resize(x, size) for x in inputs]))` for a 3x3 block, computed by `strategy`
        (`upernet.ops.concat_conv`)."""
        out = concat_conv(inputs, self.conv.weight, self.conv.bias, size, align_corners, strategy, self.winograd_weight)
        return self.act(self.bn(out))

    @torch.no_grad()
    def fuse_batchnorm(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv, which gains a bias: same outputs, one op less."""
        if isinstance(self.bn, nn.BatchNorm2d):
            bn = self.bn
            self.conv.weight, self.conv.bias = fuse_conv_bn_weights(
                self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            self.bn = nn.Identity()

    def prepare_winograd(self) -> None:
        """Precompute the Winograd transform of the (folded) 3x3 weight for `forward_concat(..., "winograd")`."""
        self.winograd_weight = winograd_weight(self.conv.weight)

    def prepare_for_inference(self) -> None:
        """What `upernet.inference.prepare_for_inference` asks of every block: fold the BatchNorm."""
        self.fuse_batchnorm()


class UPerHead(nn.Module):
    """Pyramid Pooling Module on the last level, FPN top-down path, fusion of all levels.

    The 3x3 convs over concatenations (PPM bottleneck, fusion) run by `concat_strategy`, one of
    `upernet.ops.concat_conv.STRATEGIES`: "split" (the default, what training runs: coarse inputs
    convolved before their resize, a third of the head's multiply-adds), "literal" (resize, concat,
    conv, as published: FLOP counting) or "winograd" (inference, set by `prepare_for_inference`).

    Args:
        in_channels: channels of each backbone level, finest (stride 4) first.
        num_classes: output classes of the classifier.
        channels: width of every internal feature map.
        pool_scales: output sizes of the adaptive average pools of the PPM.
        dropout: Dropout2d probability before the classifier.
        align_corners: `align_corners` of every bilinear resize inside the head.
        ppm_upsample_first: resize pooled maps before their 1x1 conv (CSAIL's order) instead of after.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
        ppm_upsample_first: bool = False,
    ):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.align_corners = align_corners
        self.ppm_upsample_first = ppm_upsample_first
        top = in_channels[-1]
        self.ppm = nn.ModuleList(ConvBNReLU(top, channels, 1) for _ in self.pool_scales)
        self.ppm_bottleneck = ConvBNReLU(top + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fusion = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.concat_strategy = "split"
        self.float32_logits = False  # set by `prepare_for_inference`: logits leave in float32

    @property
    def fuse_before_resize(self) -> bool:
        """Older switch: True = "split" (or "winograd"), False = "literal" `concat_strategy`."""
        return self.concat_strategy != "literal"

    @fuse_before_resize.setter
    def fuse_before_resize(self, value: bool) -> None:
        self.concat_strategy = "split" if value else "literal"

    def concat_conv(self, block: ConvBNReLU, inputs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """`block(cat([resize(x, size) for x in inputs]))` by the head's `concat_strategy`."""
        return block.forward_concat(inputs, size, self.concat_strategy, self.align_corners)

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        """PPM on the stride-32 map: pool to each scale, 1x1 conv, resize back, concat, 3x3 conv."""
        size = x.shape[-2:]
        branches = [x]
        for scale, conv in zip(self.pool_scales, self.ppm):
            pooled = adaptive_avg_pool2d(x, scale)
            if self.ppm_upsample_first:
                branches.append(conv(resize(pooled, size, self.align_corners)))
            else:
                branches.append(conv(pooled))  # resized by concat_conv
        return self.concat_conv(self.ppm_bottleneck, branches, size)

    def pyramid(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The FPN levels [P2 (1/4), P3 (1/8), P4 (1/16), PPM output (1/32)], each `channels` wide."""
        # Lateral 1x1 convs on levels 1/4, 1/8, 1/16; the PPM output stands for 1/32.
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.pyramid_pooling(features[-1]))

        # Top-down: 1/32 -> 1/16 -> 1/8 -> 1/4, each coarser map resized and added.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)

        # 3x3 FPN convs on the three finer levels (a concatenation of one input, so that the strategy
        # decides how they run); the PPM level is used as it is.
        outs = [self.concat_conv(conv, [lat], lat.shape[-2:]) for conv, lat in zip(self.fpn_convs, laterals)]
        return outs + [laterals[-1]]

    def fuse_levels(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The output of `pyramid` -> the fused stride-4 map."""
        # Every level resized to 1/4, concatenated, fused by a 3x3 conv.
        return self.concat_conv(self.fusion, outs, outs[0].shape[-2:])

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """All levels -> one stride-4 feature map (before dropout and classifier)."""
        return self.fuse_levels(self.pyramid(features))

    def classify(self, fused: torch.Tensor) -> torch.Tensor:
        """The fused map -> logits at stride 4 (dropout, 1x1 classifier)."""
        logits = self.classifier(self.dropout(fused))
        return logits.float() if self.float32_logits else logits

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.fuse(features))

    def prepare_for_inference(self) -> None:
        """Fold every BatchNorm, run the 3x3 convs as Winograd (precomputed weights), float32 logits.

        The upsampling of the logits to the image size is then done in float32 in a bf16 model.
        """
        for block in self.modules():
            if isinstance(block, ConvBNReLU):
                block.fuse_batchnorm()
        for block in (self.ppm_bottleneck, self.fusion, *self.fpn_convs):
            block.prepare_winograd()
        self.concat_strategy = "winograd"
        self.float32_logits = True


class FCNHead(nn.Module):
    """Auxiliary head: `num_convs` 3x3 ConvBNReLU -> Dropout2d -> 1x1 classifier on one level.

    Args:
        in_channels: channels of the level it reads.
        num_classes: output classes.
        channels: width of its convs.
        num_convs: number of 3x3 convs (0 puts the classifier on the features directly).
        dropout: Dropout2d probability before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvBNReLU(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UPerNet(nn.Module):
    """UPerNet on any backbone that exposes `channels` and `strides` for its 4 feature levels.

    Input: normalised images (N, in_channels, H, W) of any H and W. Convolutions and poolings floor odd sizes
    (backbones that need it, like Swin, pad internally); the head resizes every level to the size of
    the stride-4 map, and the logits are resized bilinearly to exactly (H, W), so any size works.
    A side shorter than 32 pixels (the coarsest stride) is zero-padded to 32 at the bottom/right and
    the logits cropped back, so that no backbone runs out of pixels.

    Args:
        backbone: module returning a list of 4 maps; has `channels` and `strides` lists.
        num_classes: number of classes.
        channels: width of the UPerHead.
        pool_scales: PPM pooling sizes.
        dropout: Dropout2d before both classifiers.
        aux_head: build the auxiliary FCN head (used for the training loss only).
        aux_level: index of the backbone level the auxiliary head reads (2 = stride 16).
        aux_channels: width of the auxiliary head.
        aux_num_convs: number of 3x3 convs in the auxiliary head.
        aux_loss_weight: weight of the auxiliary loss in `loss`.
        align_corners: `align_corners` of the resizes inside the head.
        ppm_upsample_first: PPM order of CSAIL's implementation (resize, then 1x1 conv).
        output_align_corners: `align_corners` of the final resize of the logits to the input size
            (segmentation-models-pytorch upsamples its stride-4 logits with True).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_head: bool = True,
        aux_level: int = 2,
        aux_channels: int = 256,
        aux_num_convs: int = 1,
        aux_loss_weight: float = 0.4,
        align_corners: bool = False,
        ppm_upsample_first: bool = False,
        output_align_corners: bool = False,
    ):
        super().__init__()
        if len(backbone.channels) != 4:
            raise ValueError(f"UPerNet needs a backbone with 4 feature levels, got channels {backbone.channels}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_level = aux_level
        self.aux_loss_weight = aux_loss_weight
        self.output_align_corners = output_align_corners
        self.decode_head = UPerHead(
            backbone.channels, num_classes, channels, pool_scales, dropout, align_corners, ppm_upsample_first
        )
        self.aux_head = (
            FCNHead(backbone.channels[aux_level], num_classes, aux_channels, aux_num_convs, dropout) if aux_head else None
        )
        self.config: dict = {}  # set by build_model: the name and arguments that rebuild this model
        self.meta: dict = {}  # class names, palette, normalisation: what predict needs besides weights

    @property
    def in_channels(self) -> int:
        """Channels of the input images (the backbone's; 3 unless built with `in_channels`)."""
        return int(getattr(self.backbone, "in_channels", 3))

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = 255, average: str = "valid"
    ) -> dict[str, torch.Tensor]:
        """Returns {"out": logits at input size}, plus {"aux": ...} in training mode.

        With `labels` (N, H, W), returns {"loss": `loss` of those outputs} instead, computed by
        `upsampled_cross_entropy` so that no logits at input size are kept: what training runs.
        """
        height, width = images.shape[-2:]
        pad_h, pad_w = max(0, MIN_SIDE - height), max(0, MIN_SIDE - width)
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        features = self.backbone(images)
        size = images.shape[-2:]
        if labels is not None:
            loss = upsampled_cross_entropy(self.decode_head(features), labels, size, ignore_index, average,
                                           self.output_align_corners)
            if self.training and self.aux_head is not None:
                aux = self.aux_head(features[self.aux_level])
                loss = loss + self.aux_loss_weight * upsampled_cross_entropy(aux, labels, size, ignore_index, average)
            return {"loss": loss}
        outputs = {"out": resize(self.decode_head(features), size, self.output_align_corners)}
        if self.training and self.aux_head is not None:
            outputs["aux"] = resize(self.aux_head(features[self.aux_level]), size)
        if pad_h or pad_w:
            outputs = {k: v[..., :height, :width] for k, v in outputs.items()}
        return outputs

    def prepare_for_inference(self) -> None:
        """The auxiliary head only serves the training loss: dropped."""
        self.aux_head = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in backward instead of storing them (less memory).

        Uses the backbone's own `set_grad_checkpointing` (timm's name; the timm backbones have it).

        Args:
            enable: switch checkpointing on (True) or off (False).
        """
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)
        elif enable:
            raise UserError(f"backbone {type(self.backbone).__name__} does not support activation checkpointing; "
                            f"use a timm backbone (e.g. upernet_convnext_tiny) or leave checkpointing off")

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, ignore_index: int = 255, average: str = "valid"
    ) -> torch.Tensor:
        """Cross-entropy on "out" plus `aux_loss_weight` x cross-entropy on "aux".

        `average="valid"` divides by the number of non-ignored pixels (PyTorch's and Hugging Face's
        rule); `average="all"` divides by all pixels, mmsegmentation's default (`avg_non_ignore=False`).
        """
        total = segmentation_loss(outputs["out"], labels, ignore_index, average)
        if "aux" in outputs:
            total = total + self.aux_loss_weight * segmentation_loss(outputs["aux"], labels, ignore_index, average)
        return total

    def save(self, path: str) -> None:
        """Write `config.json` + `model.safetensors` into the folder `path`."""
        from .weights import save_model

        save_model(self, path)


def _band_loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, width: int, ignore_index: int,
               align_corners: bool) -> torch.Tensor:
    """Summed cross-entropy of a band of output rows: `rows` resizes the height, interpolate the width
    (then cropped to the labels' width)."""
    band = torch.matmul(rows, logits)  # (N, C, rows, w): the height resized by its matrix
    band = F.interpolate(band, size=(band.shape[-2], width), mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(band[..., :labels.shape[-1]], labels, ignore_index=ignore_index, reduction="sum")


def upsampled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    size: Sequence[int] | None = None,
    ignore_index: int = 255,
    average: str = "valid",
    align_corners: bool = False,
    band_rows: int = 64,
) -> torch.Tensor:
    """`segmentation_loss(resize(logits, size)[..., :H, :W], labels)` without the full-size logits.

    The resized logits and their log-softmax are what fill a training step's memory (150 classes at
    512x512 are 157 MB per image, each). Here they exist one band of `band_rows` rows at a time, and
    are recomputed band by band in backward (activation checkpointing), for a few % of the step time.

    Args:
        logits: (N, C, h, w) low-resolution logits.
        labels: (N, H, W) class indices.
        size: (H', W') the logits are resized to before the crop to (H, W); default (H, W).
        ignore_index, average: as in `segmentation_loss`.
        align_corners: `align_corners` of the resize.
        band_rows: output rows per band.
    """
    from torch.utils.checkpoint import checkpoint

    height, width = labels.shape[-2:]
    size = (height, width) if size is None else (int(size[0]), int(size[1]))
    logits = logits.float()
    matrix, bands = banded_resize(size[0], logits.shape[-2], align_corners, band_rows)
    rows = matrix.to(logits)
    total = logits.new_zeros(())
    with torch.autocast(logits.device.type, enabled=False):  # the resize and the loss in float32
        for r0, r1, lo, hi in bands:
            if r0 >= height:  # rows of a zero-padded input beyond the labels
                break
            r1 = min(r1, height)
            total = total + checkpoint(_band_loss, logits[..., lo:hi, :], rows[r0:r1, lo:hi], labels[:, r0:r1],
                                       size[1], ignore_index, align_corners, use_reentrant=False)
    return _average(total, labels, ignore_index, average)


def _average(total: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: str) -> torch.Tensor:
    """A summed loss divided as `average` says (see `UPerNet.loss`)."""
    if average == "valid":
        return total / labels.ne(ignore_index).sum()
    if average == "all":
        return total / labels.numel()
    raise ValueError(f"average must be 'valid' or 'all', got {average!r}")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, average: str = "valid") -> torch.Tensor:
    """Per-pixel cross-entropy; see `UPerNet.loss` for `average`."""
    summed = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="sum")
    return _average(summed, labels, ignore_index, average)
