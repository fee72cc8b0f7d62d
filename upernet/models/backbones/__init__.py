"""Backbones: modules that return 4 feature maps and carry `channels` and `strides` for them."""
from .internimage import InternImage
from .swin import SwinTransformer
from .timm_backbone import TimmBackbone

__all__ = ["InternImage", "SwinTransformer", "TimmBackbone"]
