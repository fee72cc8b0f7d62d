"""DCNv3, the deformable convolution of InternImage: projections, offsets and mask, channels-last layout.

The sampling itself (and its optional compiled CPU kernel) is `upernet.ops.dcnv3`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from ...ops.dcnv3 import DeformableSampling

class ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C); a module so that norm layers keep the reference's key names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class DCNv3(nn.Module):
    """DCNv3 on channels-last maps, with the reference's parameter names and initialisation.

    Args:
        channels: input and output channels.
        kernel_size: k of the k x k sampling grid.
        dw_kernel_size: kernel of the depthwise conv that predicts offsets and mask (default k).
        stride: stride of the sampling grid (the reference's InternImage uses 1).
        pad: implicit zero padding of the sampling grid (default: same size).
        dilation: spacing of the regular grid.
        group: number of groups (the reference's name).
        offset_scale: scales the regular grid and the learned offsets.
        center_feature_scale: blend the output with the projected input by a learned per-group gate.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int | None = None,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        center_feature_scale: bool = False,
    ):
        super().__init__()
        if channels % group:
            raise ValueError(f"DCNv3: channels ({channels}) must be divisible by group ({group})")
        dw_kernel_size = dw_kernel_size or kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = (dilation * (kernel_size - 1)) // 2 if pad is None else pad
        self.dilation = dilation
        self.group = group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        # Offsets and mask come from the unprojected input: depthwise conv -> LayerNorm -> GELU -> Linear.
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels),
            nn.Sequential(ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6)),
            nn.GELU(),
        )
        points = kernel_size * kernel_size
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: zero offsets and uniform mask logits, Xavier projections."""
        for layer in (self.offset, self.mask):
            constant_(layer.weight, 0.0)
            constant_(layer.bias, 0.0)
        for layer in (self.input_proj, self.output_proj):
            xavier_uniform_(layer.weight)
            constant_(layer.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H, W, C)."""
        n, h, w, c = x.shape
        groups, k = self.group, self.kernel_size ** 2
        projected = self.input_proj(x)
        features = self.dw_conv(x.permute(0, 3, 1, 2))  # back to (N, H, W, C) after the norm
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        sampling = DeformableSampling(projected, (h, w), groups, self.kernel_size, self.offset_scale, self.stride,
                                      self.pad, self.dilation, features.dtype, grad)
        # The `offset` projection computed as two, x and y: each comes out contiguous (.., G, K),
        # which the elementwise work of the sampling reads several times faster than every other
        # value of the interleaved [x, y] layout. Same weights, same values. Offsets, mask logits,
        # sampling and output projection are computed band by band (on CPU: a few rows at a time,
        # all in the CPU caches), the output projection straight into the output.
        weight, bias = self._offset_xy(grad)
        if not grad:  # each band's output projection goes straight into the output
            out = torch.empty_like(projected)  # in the dtype linear layers compute in (autocast's, if on)
            # addmm(out=) is not seen by autocast: cast as it would.
            out_weight, out_bias = (t.to(out.dtype) for t in (self.output_proj.weight, self.output_proj.bias))
        parts = []
        for index in sampling.bands():
            band = features[index]
            offset_x, offset_y, logits = (F.linear(band, wt, bt).view(*band.shape[:-1], groups, k) for wt, bt in
                                          ((weight[0], bias[0]), (weight[1], bias[1]),
                                           (self.mask.weight, self.mask.bias)))
            sampled = sampling.sample_from_logits(index, offset_x, offset_y, logits)  # see set_dcnv3_kernel
            sampled = sampled.to(projected.dtype).view(band.shape)
            if self.center_feature_scale:
                gate = torch.sigmoid(F.linear(band, self.center_feature_scale_proj_weight,
                                              self.center_feature_scale_proj_bias))
                gate = gate.repeat_interleave(self.channels // self.group, dim=-1)
                sampled = sampled * (1 - gate) + projected[index] * gate
            if grad:
                parts.append(self.output_proj(sampled))
            else:
                torch.addmm(out_bias, sampled.view(-1, c), out_weight.t(), out=out[index].view(-1, c))
        if grad:
            out = parts[0] if len(parts) == 1 else torch.cat(parts).view(n, h, w, c)
        return out

    def _offset_xy(self, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The `offset` projection's weight and bias with the x rows first, then the y rows:
        (2, groups * K, C) and (2, groups * K). Without autograd, kept until the parameters change."""
        params = (self.offset.weight, self.offset.bias)
        cached = None if grad else self.__dict__.get("_offset_xy_cache")
        # Same storage (the cache holds it, so no new tensor can take its address) and no write since.
        if cached is not None and all(p.data_ptr() == q.data_ptr() and p.dtype == q.dtype and p._version == v
                                      for p, (q, v) in zip(params, cached[0])):
            return cached[1]
        weight, bias = params
        rows = weight.shape[0] // 2
        split = weight.view(rows, 2, -1).transpose(0, 1).contiguous(), bias.view(rows, 2).t().contiguous()
        if not grad:
            self.__dict__["_offset_xy_cache"] = (tuple((p.detach(), p._version) for p in params), split)
        return split

    def extra_macs(self, output: torch.Tensor) -> int:
        """Multiply-adds of the deformable sampling, which torch's FLOP counter does not see.

        InternImage's convention (its `get_flops.py`): 5 * pixels * K * channels per layer, added to
        the conv/linear count.
        """
        n, h, w, c = output.shape
        return 5 * n * h * w * self.kernel_size ** 2 * c
