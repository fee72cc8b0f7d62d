"""Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 3x3 conv as 16 matmuls on 4x4 input tiles that overlap
by 2, 2.25x fewer multiply-adds than direct convolution. V = B^T d B, U = G g G^T, y = A^T (V U) A.

For inference only: the element-wise transforms write into reused `scratch` buffers (no autograd).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .scratch import padded_scratch, scratch

_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """A conv's (C_out, C_in, 3, 3) weight -> U = G g G^T as (16, C_in, C_out), in the weight's dtype.

    Computed in float64; channels can be split along dim 1 like the conv's input channels.
    """
    u = torch.einsum("ai,ocij,bj->abco", _G, weight.detach().double(), _G)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _pad(x: torch.Tensor, slot: str) -> torch.Tensor:
    """(N, C, H, W) -> NHWC zero-padded by 1, and to 2T + 2 x 2S + 2 for T x S output tiles of 2x2."""
    h, w = x.shape[-2:]
    t, s = (h + 1) // 2, (w + 1) // 2
    return padded_scratch(slot, x.permute(0, 2, 3, 1), (1, 2 * t + 1 - h), (1, 2 * s + 1 - w))


def _input_transform(xp: torch.Tensor) -> torch.Tensor:
    """Padded NHWC rows (N, 2t + 2, 2s + 2, C) -> V (16, N*t*s, C), B^T d B of every 4x4 tile."""
    n, rows, cols, c = xp.shape
    t, s = (rows - 2) // 2, (cols - 2) // 2
    r = [xp[:, i:i + 2 * t:2] for i in range(4)]  # tile row i of every tile row
    u = scratch("winograd u", (4, n, t, cols, c), xp)
    torch.sub(r[0], r[2], out=u[0])
    torch.add(r[1], r[2], out=u[1])
    torch.sub(r[2], r[1], out=u[2])
    torch.sub(r[1], r[3], out=u[3])
    q = [u[:, :, :, j:j + 2 * s:2] for j in range(4)]  # tile column j
    v = scratch("winograd v", (4, 4, n, t, s, c), xp)
    torch.sub(q[0], q[2], out=v[:, 0])
    torch.add(q[1], q[2], out=v[:, 1])
    torch.sub(q[2], q[1], out=v[:, 2])
    torch.sub(q[1], q[3], out=v[:, 3])
    return v.view(16, n * t * s, c)


def _output_transform(m: torch.Tensor, out: torch.Tensor) -> None:
    """M (16, N*t*s, C) -> `out` (N, 2t, 2s, C) NHWC, A^T M A of every tile."""
    n, rows, cols, c = out.shape
    t, s = rows // 2, cols // 2
    m = m.view(4, 4, n, t, s, c)
    z = scratch("winograd z", (2, 4, n, t, s, c), m)
    torch.add(m[0], m[1], out=z[0]).add_(m[2])
    torch.sub(m[1], m[2], out=z[1]).sub_(m[3])
    y = out.view(n, t, 2, s, 2, c)
    left, right = y[:, :, :, :, 0].permute(2, 0, 1, 3, 4), y[:, :, :, :, 1].permute(2, 0, 1, 3, 4)
    torch.add(z[:, 0], z[:, 1], out=left).add_(z[:, 2])
    torch.sub(z[:, 1], z[:, 2], out=right).sub_(z[:, 3])


def winograd_conv3x3(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    band_tiles: int | None = None,
) -> torch.Tensor:
    """`sum_i conv2d(inputs[i], w_i, padding=1) + bias` for inputs of one size, w_i given as
    `winograd_weight(w_i)`. The sum is accumulated in the Winograd domain (one output transform),
    in bands of tile rows so that the transformed tensors stay small.

    Args:
        inputs: (N, C_i, H, W) maps; channels_last memory avoids a copy.
        weights: (16, C_i, C_out) transformed weight of each input.
        bias: (C_out,) or None.
        band_tiles: tiles per batched matmul; None chooses by thread count (measured at 512x512:
            single-threaded, 512-tile bands are 15% faster (cache); with 2 threads fewer, larger ops win).

    Returns:
        (N, C_out, H, W), channels_last in memory.
    """
    n, _, h, w = inputs[0].shape
    padded = [_pad(x, f"winograd input {i}") for i, x in enumerate(inputs)]
    t, s = (h + 1) // 2, (w + 1) // 2
    out = padded[0].new_empty(n, 2 * t, 2 * s, weights[0].shape[-1])
    tiles = band_tiles or (512 if torch.get_num_threads() == 1 else 4096)
    band = max(1, tiles // (n * s))  # tile rows per band: the buffers stay small
    for r0 in range(0, t, band):
        r1 = min(t, r0 + band)
        m = None
        for xp, u in zip(padded, weights):
            v = _input_transform(xp[:, 2 * r0:2 * r1 + 2])
            if m is None:
                m = torch.bmm(v, u, out=scratch("winograd m", (16, v.shape[1], u.shape[-1]), v))
            else:
                m.baddbmm_(v, u)
        if bias is not None:
            m[5].add_(bias)  # A^T carries tile entry (1, 1) into every output with weight 1
        _output_transform(m, out[:, 2 * r0:2 * r1])
    return out[:, :h, :w].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
