"""DCNv3 (InternImage's deformable convolution) in plain PyTorch: CPU, CUDA and ONNX, no extension.

The algorithm is the reference one (InternImage `ops_dcnv3`): every output pixel of every group
reads `K = k * k` points of the projected input at `reference + (grid + learned offset) * offset_scale`
(in pixels), by bilinear interpolation with zero padding (`align_corners=False` semantics), and sums
them with softmax-normalised weights ("mask") over the K points of its group.

How we compute it. The straightforward formulation (the reference's `dcnv3_core_pytorch`) calls
`grid_sample` on a (N * groups, C / groups, H, W) copy of the input, materialises a
(N * groups, C / groups, H * W, K) tensor of samples, multiplies by the mask and sums: two big
permutes and a K-times larger intermediate. Here each output pixel and group is a weighted sum of
4 * K rows of the channels-last input seen as a table of (N * H * W * groups) rows of C / groups
values. We compute the 4 * K row indices and weights (bilinear weight x mask, 0 outside the image)
and let `F.embedding_bag(mode="sum", per_sample_weights=...)` do the gather and the weighted sum
in one pass, straight into the channels-last output: no permute, no intermediate. Gradients flow to
the input (through the table) and to offsets and mask (through the weights), exactly as through
`grid_sample`. Under ONNX export the same indices and weights are reduced with Gather + MatMul,
standard operators every runtime has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_uniform_


def _sampling_grid(
    h_out: int, w_out: int, kernel_size: int, stride: int, pad: int, dilation: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y positions (Ho, Wo, 1, K) of the kernel points, in padded-map pixels.

    The reference enumerates points with x outer and y inner (point p = ix * k + iy); offsets and
    mask channels of official checkpoints follow that order. It places the kernel centre of output
    (i, j) at (j * stride + half - pad, i * stride + half - pad) with half = dilation * (k - 1) // 2,
    and `offset_scale` scales the kernel points around that centre; +1 for our 1-pixel zero border.
    """
    half = (dilation * (kernel_size - 1)) // 2
    steps = (torch.arange(kernel_size, dtype=torch.float32) * dilation - half) * scale
    xs = torch.arange(w_out, dtype=torch.float32) * stride + (half - pad + 1)
    ys = torch.arange(h_out, dtype=torch.float32) * stride + (half - pad + 1)
    grid_x = xs.view(1, w_out, 1, 1) + steps.repeat_interleave(kernel_size)  # x outer
    grid_y = ys.view(h_out, 1, 1, 1) + steps.repeat(kernel_size)  # y inner
    return grid_x.to(device), grid_y.to(device)


def dcnv3_core(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: int,
    groups: int,
    offset_scale: float = 1.0,
    stride: int = 1,
    pad: int | None = None,
    dilation: int = 1,
) -> torch.Tensor:
    """Deformable sampling and weighted sum of DCNv3.

    Args:
        x: projected input, (N, H, W, C) channels-last.
        offset: (N, H_out, W_out, groups * K * 2), laid out [group][point][x, y], in pixels.
        mask: (N, H_out, W_out, groups * K), already softmax-normalised over the K points of a group.
        kernel_size: k, with K = k * k sampling points.
        groups: number of groups; each reads its own C / groups channels.
        offset_scale: multiplies both the regular kernel grid and the learned offsets.
        stride: stride of the output grid.
        pad: implicit zero padding; default (dilation * (k - 1)) // 2 keeps the size at stride 1.
        dilation: spacing of the regular kernel grid.

    Returns:
        (N, H_out, W_out, C) in the dtype of `x`.
    """
    n, h, w, c = x.shape
    _, h_out, w_out, _ = offset.shape
    if c % groups:
        raise ValueError(f"DCNv3: {c} channels are not divisible by {groups} groups")
    k = kernel_size * kernel_size
    if offset.shape[-1] != groups * k * 2 or mask.shape[-1] != groups * k:
        raise ValueError(f"DCNv3: offset/mask have {offset.shape[-1]}/{mask.shape[-1]} channels, expected "
                         f"{groups * k * 2}/{groups * k} for {groups} groups and kernel {kernel_size}")
    if pad is None:
        pad = (dilation * (kernel_size - 1)) // 2
    device = x.device

    # Zero padding made explicit: 1 pixel before and 2 after each side. Positions clamped to
    # [-1, size] then have all 4 bilinear corners inside the padded map, so no corner needs a
    # validity test, and clamping changes nothing (beyond one pixel outside, every corner is zero).
    xp = F.pad(x, (0, 0, 1, 2, 1, 2))
    hp, wp = h + 3, w + 3

    # Sampling positions in padded-map pixels, in float32 at least (bf16 would put them on a
    # 0.5-pixel raster at 128 pixels): regular grid + offset_scale * (kernel point + learned offset).
    # x and y are kept as separate contiguous (N, Ho, Wo, G, K) tensors: elementwise ops with a
    # tiny innermost dimension are several times slower on CPU.
    real = torch.promote_types(offset.dtype, torch.float32)
    grid_x, grid_y = _sampling_grid(h_out, w_out, kernel_size, stride, pad, dilation, offset_scale, device)
    grid_x, grid_y = grid_x.to(real), grid_y.to(real)
    offset = offset.to(real).view(n, h_out, w_out, groups, k, 2)
    px = torch.add(grid_x, offset[..., 0], alpha=offset_scale).clamp_(0.0, w + 1.0)
    py = torch.add(grid_y, offset[..., 1], alpha=offset_scale).clamp_(0.0, h + 1.0)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0

    # Bilinear weights x mask of the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1).
    bags = n * h_out * w_out * groups
    mask = mask.to(real).view(n, h_out, w_out, groups, k)
    wy1 = fy * mask
    wy0 = mask - wy1
    wx0 = 1 - fx

    # Row of (n, y, x, g) in the padded input seen as a (N * Hp * Wp * G, C / G) table.
    # y * Wp + x is exact in float32 below 2**24 pixels per map; int32 rows halve the index traffic.
    index_dtype = torch.int32 if n * hp * wp * groups < 2**31 else torch.int64
    top_left = torch.add(x0, y0, alpha=wp).to(index_dtype)
    start = torch.arange(n, device=device, dtype=index_dtype).view(n, 1, 1, 1, 1) * (hp * wp * groups)
    start = start + torch.arange(groups, device=device, dtype=index_dtype).view(1, 1, 1, groups, 1)
    rows = torch.add(start, top_left, alpha=groups).view(bags, k)

    # One gather per corner: each output row is the weighted sum of K table rows (a "bag").
    # Four bags of K are about twice as fast as one bag of 4K (and need no stacking). The other
    # corners are the same rows of the table shifted by 1 pixel, 1 row or both: a view, no new index.
    table = xp.reshape(n * hp * wp * groups, c // groups)
    corners = [(0, wy0 * wx0), (groups, wy0 * fx), (wp * groups, wy1 * wx0), ((wp + 1) * groups, wy1 * fx)]
    exporting = torch.onnx.is_in_onnx_export()
    out = None
    for shift, weight in corners:
        weight = weight.to(x.dtype).view(bags, k)
        if exporting:
            part = torch.matmul(weight.unsqueeze(1), table[shift:][rows]).squeeze(1)
        else:
            part = F.embedding_bag(rows, table[shift:], mode="sum", per_sample_weights=weight)
        # Sum the corners in float32 at least; in place is safe (the gathers' backward ignores outputs).
        out = part.to(torch.promote_types(x.dtype, torch.float32)) if out is None else out.add_(part)
    out = out.to(x.dtype)
    return out.view(n, h_out, w_out, c)


def softmax_last(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written out: PyTorch's CPU kernel is ~5x slower on 9 values."""
    exp = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return exp / exp.sum(dim=-1, keepdim=True)


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
        """(N, H, W, C) -> (N, H_out, W_out, C)."""
        n, h, w, _ = x.shape
        projected = self.input_proj(x)
        features = self.dw_conv(x.permute(0, 3, 1, 2))  # back to (N, H, W, C) after the norm
        offset = self.offset(features)
        mask = softmax_last(self.mask(features).view(n, h, w, self.group, -1)).view(n, h, w, -1)
        out = dcnv3_core(projected, offset, mask, self.kernel_size, self.group, self.offset_scale,
                         self.stride, self.pad, self.dilation)
        if self.center_feature_scale:
            gate = torch.sigmoid(F.linear(features, self.center_feature_scale_proj_weight,
                                          self.center_feature_scale_proj_bias))
            gate = gate.repeat_interleave(self.channels // self.group, dim=-1)
            out = out * (1 - gate) + projected * gate
        return self.output_proj(out)

    def extra_macs(self, output: torch.Tensor) -> int:
        """Multiply-adds of the deformable sampling, which torch's FLOP counter does not see.

        InternImage's convention (its `get_flops.py`): 5 * pixels * K * channels per layer, added to
        the conv/linear count.
        """
        n, h, w, c = output.shape
        return 5 * n * h * w * self.kernel_size ** 2 * c
