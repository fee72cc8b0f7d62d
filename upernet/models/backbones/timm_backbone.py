"""Any timm model as a UPerNet backbone, through timm's `features_only` feature extraction."""
from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from ...errors import UserError


class TimmBackbone(nn.Module):
    """The last 4 feature levels of a timm model, optionally each followed by a LayerNorm.

    Args:
        model_name: a timm model name (see `timm.list_models()`).
        out_indices: which of timm's feature levels to return; default: its last 4.
        output_norms: add a channels-first LayerNorm (eps 1e-6) per level, as UPerNet ConvNeXt
            checkpoints carry them.
        pretrained: load timm's pretrained weights (downloads them; needs a network).
        model_args: passed to `timm.create_model` (e.g. `drop_path_rate`, `output_stride`, `depths`).
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

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        all_levels = self.body(images)
        features = [all_levels[i] for i in self.levels]
        if self.output_norms is not None:
            features = [norm(f) for norm, f in zip(self.output_norms, features)]
        return features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the timm model's stages (see `UPerNet.set_grad_checkpointing`)."""
        self.body.set_grad_checkpointing(enable)
