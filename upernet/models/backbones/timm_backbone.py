"""Any timm model as a UPerNet backbone, through timm's `features_only` feature extraction."""
from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from ...errors import UserError


def input_conv_name(model: nn.Module, in_channels: int) -> str:
    """Module name of the conv that meets the image in a timm model (features_only or not).

    timm names it in `pretrained_cfg["first_conv"]` (e.g. "stem.0"); `features_only` wrappers flatten
    the first dot of such names ("stem_0"). Models without it: the first conv taking `in_channels`.
    """
    modules = dict(model.named_modules())
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for name in ([first, first.replace(".", "_", 1)] if isinstance(first, str) else []):
        if isinstance(modules.get(name), nn.Conv2d):
            return name
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels:
            return name
    raise ValueError(f"no input conv found in {type(model).__name__}")


class TimmBackbone(nn.Module):
    """The last 4 feature levels of a timm model, optionally each followed by a LayerNorm.

    Args:
        model_name: a timm model name (see `timm.list_models()`).
        out_indices: which of timm's feature levels to return; default: its last 4.
        output_norms: add a channels-first LayerNorm (eps 1e-6) per level, as UPerNet ConvNeXt
            checkpoints carry them.
        pretrained: load timm's pretrained weights (downloads them; needs a network); with `in_chans`
            other than 3, timm adapts their first conv (`timm.models.adapt_input_conv`).
        model_args: passed to `timm.create_model` (e.g. `drop_path_rate`, `output_stride`, `depths`,
            `in_chans`: channels of the input images).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        output_norms: bool = False,
        pretrained: bool = False,
        **model_args,
    ):
        super().__init__()
        extra = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        self.body = timm.create_model(model_name, features_only=True, pretrained=pretrained, **extra, **model_args)
        channels, strides = self.body.feature_info.channels(), self.body.feature_info.reduction()
        if len(channels) < 4:
            raise UserError(f"timm model {model_name!r} gives {len(channels)} feature levels; UPerNet needs 4")
        # The finer levels timm may add (e.g. a ResNet's stride-2 map) cost nothing extra to skip.
        self.levels = list(range(len(channels) - 4, len(channels)))
        self.channels = [channels[i] for i in self.levels]
        self.strides = [strides[i] for i in self.levels]
        self.output_norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.channels) if output_norms else None
        self.in_channels = int(model_args.get("in_chans", 3))
        self.input_conv = "body." + input_conv_name(self.body, self.in_channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        all_levels = self.body(images)
        features = [all_levels[i] for i in self.levels]
        if self.output_norms is not None:
            features = [norm(f) for norm, f in zip(self.output_norms, features)]
        return features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the timm model's stages (see `UPerNet.set_grad_checkpointing`)."""
        self.body.set_grad_checkpointing(enable)
