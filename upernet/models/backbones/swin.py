"""Swin Transformer backbone with the padding rules of mmsegmentation and Hugging Face's SwinBackbone.

Why not timm's Swin: timm rolls the map (cyclic shift) before padding it to a window multiple;
the UPerNet checkpoints were trained with "pad first, then shift", so at 512x512 (stage maps of
128, 64, 32, 16 with window 7) timm's blocks give different numbers. This file pads first:

1. patch embedding: pad the image right/bottom to a multiple of the patch size, strided conv, LayerNorm;
2. every block: LayerNorm, pad right/bottom to a window multiple, cyclic shift (odd blocks),
   window attention with relative position bias (+ the shifted-window mask), shift back, crop;
   every window is partitioned at every input size (no shrinking of the window for small maps);
3. patch merging between stages: pad to even, concat the 2x2 neighbours, LayerNorm, Linear 4C -> 2C;
4. each stage's map before merging, after its own output LayerNorm, is one feature level.

Tensors inside are channels-last (B, H, W, C); the levels are returned NCHW.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ...errors import UserError


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the ((2w-1)^2, heads) bias table for every query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # N, N, 2 in [0, 2w-2]
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B, num_windows, window_size^2, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_merge(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B, num_windows, window_size^2, C) -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device=None) -> torch.Tensor:
    """(num_windows, N, N) additive mask: -100 between tokens that the cyclic shift brought together.

    Along each axis of the padded, shifted map the positions fall in 3 regions: [0, size - window),
    [size - window, size - shift) and [size - shift, size); tokens of different regions (9 in 2D)
    must not attend to each other.
    """
    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift).long()

    labels = (regions(height)[:, None] * 3 + regions(width)[None, :]).float()
    labels = window_partition(labels[None, :, :, None], window_size)[0, :, :, 0]  # num_windows, N
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    Args:
        dim: channels of the tokens.
        num_heads: attention heads.
        window_size: side of the square window (tokens per window: window_size^2).
        qkv_bias: learn biases of the fused query/key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"Swin: {dim} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # [query; key; value] stacked on the output axis
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Recomputed from the window size, so it is not part of the weights.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """windows: (B, num_windows, N, C); mask: (num_windows, N, N) or None."""
        b, nw, n, c = windows.shape
        q, k, v = self.qkv(windows).view(b, nw, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # heads, N, N
        if mask is not None:
            bias = bias + mask[:, None]  # num_windows, heads, N, N (broadcast over the batch)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # B, num_windows, heads, N, C/heads
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each pre-normed, residual, with stochastic depth.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: side of the attention window.
        shift: cyclic shift before partitioning (window_size // 2 on odd blocks, 0 on even ones).
        mlp_ratio: hidden width of the MLP relative to `dim`.
        qkv_bias: learn biases of the query/key/value projection.
        drop_path: probability of dropping each residual branch per sample in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H, W, C); mask: this stage's shifted-window mask, used by shifted blocks only."""
        _, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift
        y = self.norm1(x)
        # Pad to a window multiple first, then shift: the order the checkpoints were trained with.
        y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))  # non-negative operands: exports cleanly
        hp, wp = y.shape[1:3]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, ws), mask if shift else None), ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x downsampling: pad to even size, concat each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Channel order of the original Swin: (top-left, bottom-left, top-right, bottom-right).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then an optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this stage's map, the input of the next stage)."""
        ws = self.window_size
        hp, wp = (x.shape[1] + ws - 1) // ws * ws, (x.shape[2] + ws - 1) // ws * ws  # padded map size
        mask = shifted_window_mask(hp, wp, ws, ws // 2, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinTransformer(nn.Module):
    """Swin Transformer returning one NCHW map per stage (strides 4, 8, 16, 32 for patch size 4).

    Any input size works: the image is padded to a multiple of `patch_size`, each stage's map to
    a multiple of `window_size`, and odd maps to even before merging (so a level is ceil(H / stride)).

    Args:
        embed_dim: channels of the first stage (doubled at every following stage).
        depths: number of blocks per stage.
        num_heads: attention heads per stage.
        window_size: side of the attention windows.
        mlp_ratio: MLP hidden width relative to the channels.
        patch_size: side of the patches of the stem (the stride of the first level).
        in_chans: channels of the input images.
        qkv_bias: learn biases of the query/key/value projections.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 at the first block.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise UserError(f"Swin: depths {list(depths)} and num_heads {list(num_heads)} must have the same length")
        self.patch_size = patch_size
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        self.strides = [patch_size * 2**i for i in range(len(depths))]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.in_channels = in_chans
        self.input_conv = "patch_embed.proj"  # the conv that meets the image (see `adapt_input_channels`)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(dim, depth, heads, window_size, mlp_ratio, qkv_bias, rates[start:start + depth], i < len(depths) - 1)
            for i, (dim, depth, heads, start) in enumerate(zip(self.channels, depths, num_heads, starts))
        )
        self.output_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        p = self.patch_size
        x = F.pad(images, (0, (p - images.shape[-1] % p) % p, 0, (p - images.shape[-2] % p) % p))
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))  # B, H/4, W/4, C
        features = []
        for stage, norm in zip(self.stages, self.output_norms):
            level, x = stage(x)
            features.append(norm(level).permute(0, 3, 1, 2).contiguous())
        return features
