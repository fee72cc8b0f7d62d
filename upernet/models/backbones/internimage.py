"""InternImage (Wang et al., CVPR 2023): a ConvNeXt-like hierarchy whose token mixer is DCNv3.

Module and parameter names are those of the reference implementation (OpenGVLab/InternImage,
`intern_image.py`), down to the index of the LayerNorm inside its small `Sequential` wrappers
(`norm1.0`, `downsample.norm.1`, `dcn.dw_conv.1.1`), so that official weights load as they are.
Feature maps travel channels-last (N, H, W, C) inside the levels; the outputs are (N, C, H, W).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ...errors import MissingFile, UserError
from .dcnv3 import DCNv3, ToChannelsLast


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _layer_norm(channels: int, channels_first_in: bool = False, channels_first_out: bool = False) -> nn.Sequential:
    """LayerNorm (eps 1e-6) over channels, wrapped with permutes exactly as the reference wraps it."""
    layers: list[nn.Module] = [ToChannelsLast()] if channels_first_in else []
    layers.append(nn.LayerNorm(channels, eps=1e-6))
    if channels_first_out:
        layers.append(ToChannelsFirst())
    return nn.Sequential(*layers)


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs (in -> C/2 -> C) with LayerNorm and GELU: (N, in, H, W) -> (N, H/4, W/4, C)."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = _layer_norm(out_chans // 2, channels_first_in=True, channels_first_out=True)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = _layer_norm(out_chans, channels_first_in=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv (no bias) doubling the channels, then LayerNorm; channels-last in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = _layer_norm(2 * channels, channels_first_in=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """Linear -> GELU -> Linear, with dropout after each activation as in the reference."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InternImageLayer(nn.Module):
    """One block: DCNv3 then MLP, each residual; pre-norm, post-norm or res-post-norm; layer scale.

    Args:
        channels: width of the block.
        groups: DCNv3 groups.
        mlp_ratio: hidden width of the MLP relative to `channels`.
        drop: dropout inside the MLP.
        drop_path: stochastic depth probability of both residual branches.
        post_norm: normalise each branch's output instead of its input.
        layer_scale: initial value of the per-channel branch scales `gamma1`/`gamma2` (None: no scale).
        offset_scale: DCNv3 `offset_scale`.
        dw_kernel_size: DCNv3 depthwise kernel (None: 3).
        res_post_norm: pre-norm plus a LayerNorm on each branch output (InternImage-H/G).
        center_feature_scale: DCNv3 centre-feature gate (InternImage-H/G).
        with_cp: recompute the block in backward (gradient checkpointing) to save memory.
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        post_norm: bool = False,
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        with_cp: bool = False,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.with_cp = with_cp
        self.norm1 = _layer_norm(channels)
        self.dcn = DCNv3(channels, kernel_size=3, dw_kernel_size=dw_kernel_size, group=groups,
                         offset_scale=offset_scale, center_feature_scale=center_feature_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _layer_norm(channels)
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale)))
        if res_post_norm:
            self.res_post_norm1 = _layer_norm(channels)
            self.res_post_norm2 = _layer_norm(channels)

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            mixer, mlp = (lambda t: self.norm1(self.dcn(t))), (lambda t: self.norm2(self.mlp(t)))
        elif self.res_post_norm and not self.layer_scale:  # the reference ignores it with layer scale
            mixer = lambda t: self.res_post_norm1(self.dcn(self.norm1(t)))  # noqa: E731
            mlp = lambda t: self.res_post_norm2(self.mlp(self.norm2(t)))  # noqa: E731
        else:
            mixer, mlp = (lambda t: self.dcn(self.norm1(t))), (lambda t: self.mlp(self.norm2(t)))
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * mixer(x))
            return x + self.drop_path(self.gamma2 * mlp(x))
        x = x + self.drop_path(mixer(x))
        return x + self.drop_path(mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._branches, x, use_reentrant=False)
        return self._branches(x)


class InternImageBlock(nn.Module):
    """One level: `depth` layers, a final LayerNorm (pre-norm models), then the downsampling.

    `forward` returns (downsampled map for the next level, this level's output feature).
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        groups: int,
        downsample: bool,
        drop_path: Sequence[float],
        post_norm: bool,
        center_feature_scale: bool,
        post_norm_block_ids: Sequence[int] | None,
        **layer_args,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.center_feature_scale = center_feature_scale
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, groups, drop_path=drop_path[i], post_norm=post_norm,
                             center_feature_scale=center_feature_scale, **layer_args)
            for i in range(depth)
        )
        if not post_norm or center_feature_scale:
            self.norm = _layer_norm(channels)
        self.post_norm_block_ids = list(post_norm_block_ids) if post_norm_block_ids is not None else None
        if self.post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList(_layer_norm(channels) for _ in self.post_norm_block_ids)
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.post_norm_block_ids is not None and i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if not self.post_norm or self.center_feature_scale:
            x = self.norm(x)
        feature = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, feature


class InternImage(nn.Module):
    """InternImage backbone returning the 4 level outputs (strides 4, 8, 16, 32) before downsampling.

    Args:
        channels: width of the first level; level i has channels * 2**i.
        depths: layers per level.
        groups: DCNv3 groups per level.
        mlp_ratio: MLP hidden width relative to the level width.
        drop_rate: dropout after the stem and inside the MLPs.
        drop_path_rate: stochastic depth of the last layer (rising linearly from 0 over all layers).
        drop_path_type: "linear" (rising) or "uniform" (every layer `drop_path_rate`).
        layer_scale: initial value of the per-channel branch scales (None: no layer scale).
        offset_scale: DCNv3 `offset_scale` (1.0 for T/S/B, 2.0 for L/XL).
        post_norm: normalise branch outputs (S and up) instead of inputs (T).
        dw_kernel_size: DCNv3 depthwise kernel (InternImage-H/G; None: 3).
        level2_post_norm: extra LayerNorms after some layers of level 2 (InternImage-H/G).
        level2_post_norm_block_ids: the layers of level 2 followed by such a LayerNorm.
        res_post_norm: LayerNorm on each branch output of pre-norm layers (InternImage-H/G).
        center_feature_scale: DCNv3 centre-feature gate (InternImage-H/G).
        with_cp: gradient checkpointing of every layer (saves memory in training).
        in_chans: channels of the input images.
    """

    def __init__(
        self,
        channels: int = 64,
        depths: Sequence[int] = (4, 4, 18, 4),
        groups: Sequence[int] = (4, 8, 16, 32),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        drop_path_type: str = "linear",
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        post_norm: bool = False,
        dw_kernel_size: int | None = None,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: Sequence[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        with_cp: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        if len(depths) != 4 or len(groups) != 4:
            raise UserError(f"InternImage needs 4 levels: got depths {list(depths)} and groups {list(groups)}")
        if drop_path_type not in ("linear", "uniform"):
            raise UserError(f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        self.depths = list(depths)
        self.channels = [channels * 2**i for i in range(4)]
        self.strides = [4, 8, 16, 32]
        self.patch_embed = StemLayer(in_chans, channels)
        self.in_channels = in_chans
        self.input_conv = "patch_embed.conv1"  # the conv that meets the image (see `adapt_input_channels`)
        self.pos_drop = nn.Dropout(drop_rate)
        if drop_path_type == "linear":
            rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        else:
            rates = [drop_path_rate] * sum(depths)
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.levels.append(InternImageBlock(
                self.channels[i], depth, groups[i], downsample=i < 3, drop_path=rates[first:first + depth],
                post_norm=post_norm, center_feature_scale=center_feature_scale,
                post_norm_block_ids=level2_post_norm_block_ids if level2_post_norm and i == 2 else None,
                mlp_ratio=mlp_ratio, drop=drop_rate, layer_scale=layer_scale, offset_scale=offset_scale,
                dw_kernel_size=dw_kernel_size, res_post_norm=res_post_norm, with_cp=with_cp,
            ))
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, in_chans, H, W) -> 4 maps (N, C_i, H / s_i, W / s_i), s_i = 4, 8, 16, 32 (sizes rounded up)."""
        x = self.pos_drop(self.patch_embed(images))
        features = []
        for level in self.levels:
            x, feature = level(x)
            features.append(feature.permute(0, 3, 1, 2).contiguous())
        return features



def load_classification_checkpoint(backbone: InternImage, path: str | Path) -> list[str]:
    """Initialise `backbone` from an official InternImage ImageNet checkpoint (`{"model": ...}`).

    The published segmentation runs start from these. Their classifier keys (`conv_head`, `head`,
    ...) are skipped; layer scales the checkpoint lacks (InternImage-T has none) keep their initial
    value. The stem's first conv is adapted to the backbone's `in_chans` (`adapt_input_channels`).
    Returns the names of those left at their initial value; anything else that does not fit is an
    error naming the file.
    """
    from ...io import load_torch_file
    from ..weights import adapt_input_channels, load_state_dict_strict

    source = str(path)
    if not Path(source).is_file():
        raise MissingFile(f"{source}: no such checkpoint file")
    checkpoint = load_torch_file(source)
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint)) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{source}: not an InternImage checkpoint (expected a dict of tensors under 'model')")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    weights = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "levels."))}
    adapt_input_channels(weights, backbone)  # an RGB checkpoint for a backbone of other `in_chans`
    own = backbone.state_dict()
    kept = [k for k in own if k not in weights and k.rsplit(".", 1)[-1] in ("gamma1", "gamma2")]
    load_state_dict_strict(backbone, {**weights, **{k: own[k] for k in kept}}, source)
    return kept
