"""Named UPerNet variants: each sets architecture arguments and calls one creator.

Every variant takes `num_classes`, `in_channels` (channels of the input images, default 3; the
backbone's first conv takes that many), `backbone_args` (overrides of the backbone's arguments, e.g.
smaller `depths` for tests), `pretrained_backbone` where timm provides ImageNet weights, and any
`UPerNet` head argument (`channels`, `aux_head`, ...).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from .backbones import TimmBackbone
from .registry import register_model
from .upernet import UPerNet


def _create(backbone: nn.Module, num_classes: int, **head_args: Any) -> UPerNet:
    return UPerNet(backbone, num_classes, **head_args)


def _timm(model_name: str, defaults: dict, backbone_args: dict | None, pretrained: bool, in_channels: int = 3,
          **kw: Any) -> TimmBackbone:
    if in_channels != 3:  # timm's name; left out at 3 so that timm's defaults stay untouched
        kw["in_chans"] = in_channels
    return TimmBackbone(model_name, pretrained=pretrained, **{**defaults, **kw, **(backbone_args or {})})


# ---- any timm model --------------------------------------------------------------------------
@register_model
def upernet_timm(
    model_name: str = "convnext_tiny",
    num_classes: int = 150,
    backbone_args: dict | None = None,
    pretrained_backbone: bool = False,
    output_norms: bool = False,
    in_channels: int = 3,
    **head_args: Any,
) -> UPerNet:
    """UPerNet on the last 4 feature levels of any timm model (`model_name`)."""
    backbone = _timm(model_name, {}, backbone_args, pretrained_backbone, in_channels, output_norms=output_norms)
    return _create(backbone, num_classes, **head_args)


# ---- ConvNeXt (timm's, plus the per-level output LayerNorms of the UPerNet checkpoints) ------
def _convnext(model_name: str, drop_path_rate: float, num_classes: int, backbone_args, pretrained_backbone,
              in_channels: int = 3, **head_args):
    defaults = {"drop_path_rate": drop_path_rate, "output_norms": True}
    return _create(_timm(model_name, defaults, backbone_args, pretrained_backbone, in_channels), num_classes, **head_args)


@register_model
def upernet_convnext_tiny(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _convnext("convnext_tiny", 0.4, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_convnext_small(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _convnext("convnext_small", 0.3, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_convnext_base(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _convnext("convnext_base", 0.4, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_convnext_large(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _convnext("convnext_large", 0.4, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_convnext_xlarge(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _convnext("convnext_xlarge", 0.4, num_classes, backbone_args, pretrained_backbone, **head_args)


# ---- ResNet V1c (deep 3x3 stem 32-32-64), output stride 32, 16 (D16) or 8 (D8) -----------------
# timm dilates a stage's first block with the previous stage's dilation, which is exactly
# mmsegmentation's `contract_dilation=True` (D8: strides 1,2,1,1 dilations 1,1,2,4).
def _resnet(model_name: str, output_stride: int, num_classes: int, backbone_args, pretrained_backbone,
            in_channels: int = 3, **head_args):
    defaults = {"out_indices": (1, 2, 3, 4), "output_stride": output_stride}
    return _create(_timm(model_name, defaults, backbone_args, pretrained_backbone, in_channels), num_classes, **head_args)


@register_model
def upernet_r50(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet50c", 32, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_r101(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet101c", 32, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_r50_d8(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet50c", 8, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_r50_d16(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet50c", 16, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_r101_d8(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet101c", 8, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_r101_d16(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    return _resnet("resnet101c", 16, num_classes, backbone_args, pretrained_backbone, **head_args)


# ---- Swin (ours: pads before the cyclic shift, like mmsegmentation and Hugging Face) ----------
# The published UPerNet settings; base and large use window 12 (ImageNet-22K 384x384 pretraining),
# as the Hugging Face checkpoints openmmlab/upernet-swin-{base,large} do. No ImageNet weights here:
# start from a converted checkpoint (`upernet convert`) instead.
def _swin(embed_dim: int, depths, num_heads, window_size: int, num_classes: int, backbone_args, pretrained_backbone,
          in_channels: int = 3, **head_args):
    if pretrained_backbone:
        raise UserError("pretrained_backbone is not available for Swin; convert a Hugging Face checkpoint "
                         "(`upernet convert`) and load it with `upernet.load_model` instead")
    from .backbones import SwinTransformer

    defaults = {"embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, "window_size": window_size,
                "drop_path_rate": 0.3, "in_chans": in_channels}
    return _create(SwinTransformer(**{**defaults, **(backbone_args or {})}), num_classes, **head_args)


@register_model
def upernet_swin_tiny(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """Swin-T: 96 channels, depths 2-2-6-2, heads 3-6-12-24, window 7 (no pretrained backbone)."""
    return _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_swin_small(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """Swin-S: 96 channels, depths 2-2-18-2, heads 3-6-12-24, window 7 (no pretrained backbone)."""
    return _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_swin_base(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """Swin-B: 128 channels, depths 2-2-18-2, heads 4-8-16-32, window 12 (no pretrained backbone)."""
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, num_classes, backbone_args, pretrained_backbone, **head_args)


@register_model
def upernet_swin_large(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """Swin-L: 192 channels, depths 2-2-18-2, heads 6-12-24-48, window 12 (no pretrained backbone)."""
    return _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, num_classes, backbone_args, pretrained_backbone, **head_args)


# ---- InternImage (DCNv3 in plain PyTorch; the published ADE20K UPerNet settings) ---------------
# Every variant has layer scale 1.0 (the T classification checkpoint has none: load it non-strictly).
def _internimage(width: int, depths, groups, drop_path_rate: float, post_norm: bool, offset_scale: float,
                 num_classes: int, backbone_args, pretrained_backbone, in_channels: int = 3, **head_args):
    if pretrained_backbone:
        raise UserError("pretrained_backbone is not available for InternImage; convert an official checkpoint "
                         "(`upernet convert`) and load it with `upernet.load_model` instead")
    from .backbones import InternImage

    defaults = {"channels": width, "depths": depths, "groups": groups, "drop_path_rate": drop_path_rate,
                "post_norm": post_norm, "offset_scale": offset_scale, "layer_scale": 1.0, "in_chans": in_channels}
    return _create(InternImage(**{**defaults, **(backbone_args or {})}), num_classes, **head_args)


@register_model
def upernet_internimage_t(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """InternImage-T: 64 channels, depths 4-4-18-4, groups 4-8-16-32, pre-norm, drop path 0.2."""
    return _internimage(64, (4, 4, 18, 4), (4, 8, 16, 32), 0.2, False, 1.0, num_classes, backbone_args,
                        pretrained_backbone, **head_args)


@register_model
def upernet_internimage_s(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """InternImage-S: 80 channels, depths 4-4-21-4, groups 5-10-20-40, post-norm, drop path 0.3."""
    return _internimage(80, (4, 4, 21, 4), (5, 10, 20, 40), 0.3, True, 1.0, num_classes, backbone_args,
                        pretrained_backbone, **head_args)


@register_model
def upernet_internimage_b(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """InternImage-B: 112 channels, depths 4-4-21-4, groups 7-14-28-56, post-norm, drop path 0.4."""
    return _internimage(112, (4, 4, 21, 4), (7, 14, 28, 56), 0.4, True, 1.0, num_classes, backbone_args,
                        pretrained_backbone, **head_args)


@register_model
def upernet_internimage_l(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """InternImage-L: 160 channels, depths 5-5-22-5, groups 10-20-40-80, post-norm, offset scale 2, drop path 0.4."""
    return _internimage(160, (5, 5, 22, 5), (10, 20, 40, 80), 0.4, True, 2.0, num_classes, backbone_args,
                        pretrained_backbone, **head_args)


@register_model
def upernet_internimage_xl(num_classes: int = 150, backbone_args=None, pretrained_backbone=False, **head_args) -> UPerNet:
    """InternImage-XL: 192 channels, depths 5-5-24-5, groups 12-24-48-96, post-norm, offset scale 2, drop path 0.4."""
    return _internimage(192, (5, 5, 24, 5), (12, 24, 48, 96), 0.4, True, 2.0, num_classes, backbone_args,
                        pretrained_backbone, **head_args)
