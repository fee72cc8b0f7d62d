"""UPerNet, its heads, the backbones, the registry of named variants and our weight format."""
from . import multitask, zoo  # noqa: F401  (register the variants)
from .registry import build_model, list_models, register_model
from .upernet import FCNHead, UPerHead, UPerNet
from .weights import save_model

__all__ = ["UPerNet", "UPerHead", "FCNHead", "build_model", "list_models", "register_model", "save_model"]
