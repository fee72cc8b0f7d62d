"""Bilinear resizing as PyTorch computes it, and the linear algebra that moves work before a resize.

`resize` is the one resize of the package (a no-op at the same size). The rest writes PyTorch's
bilinear resize of one axis as a matrix, so that a 3x3 conv after a resize can run on the small map
(`resized_conv3x3`), a loss can resize its logits band by band, and a many-class map can be resized
in stripes of rows.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to an exact (H, W); a no-op when the size already matches, except during ONNX
    export, where the resize is always recorded (sizes that match at the traced input need not match
    at others)."""
    if tuple(x.shape[-2:]) == tuple(size) and not torch.onnx.is_in_onnx_export():
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


@functools.lru_cache(maxsize=256)
def resize_matrix(out_size: int, in_size: int, align_corners: bool) -> torch.Tensor:
    """(out_size, in_size) float64: PyTorch's bilinear resize of one axis as a matrix (2 taps per row)."""
    j = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        src = j * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:  # PyTorch's source index: (j + 0.5) * in / out - 0.5, clamped at 0
        src = ((j + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    weight = src - i0
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix[j.long(), i0] += 1 - weight
    matrix[j.long(), i1] += weight
    return matrix


def bands(matrix: torch.Tensor, block: int) -> tuple:
    """(row0, row1, col0, col1) blocks of `block` rows of `matrix`, each with the columns it uses."""
    bands = []
    for r0 in range(0, matrix.shape[0], block):
        r1 = min(matrix.shape[0], r0 + block)
        used = matrix[r0:r1].ne(0).any(0).nonzero()
        bands.append((r0, r1, int(used.min()), int(used.max()) + 1))
    return tuple(bands)


@functools.lru_cache(maxsize=256)
def banded_resize(out_size: int, in_size: int, align_corners: bool, block: int = 64) -> tuple:
    """`resize_matrix` and its `bands`."""
    matrix = resize_matrix(out_size, in_size, align_corners)
    return matrix, bands(matrix, block)


@functools.lru_cache(maxsize=256)
def shifted_interpolation(out_size: int, in_size: int, align_corners: bool, block: int = 64) -> tuple:
    """The bilinear resize of one axis, shifted by -1, 0, +1 output pixels, as one banded matrix.

    Returns (matrix, bands): `matrix` is (out_size, 3 * in_size) float64 with column 3k + d holding
    the weight of source pixel k in output pixel j + d - 1 (zero outside the axis, as a conv's zero
    padding); `bands` lists (row0, row1, col0, col1) blocks of `block` output rows with the columns
    they touch, so that the product skips the zeros of a large matrix.
    """
    resized = resize_matrix(out_size, in_size, align_corners)
    matrix = torch.zeros(out_size, in_size, 3, dtype=torch.float64)
    matrix[1:, :, 0] = resized[:-1]  # output j reads resized pixel j - 1
    matrix[:, :, 1] = resized
    matrix[:-1, :, 2] = resized[1:]  # ... and j + 1
    matrix = matrix.reshape(out_size, 3 * in_size)
    return matrix, bands(matrix, block)


def banded_matmul(matrix: torch.Tensor, bands: tuple, x: torch.Tensor) -> torch.Tensor:
    """matrix @ x for x (B, K, N), computed one band of rows at a time over the columns it uses."""
    parts = [torch.matmul(matrix[r0:r1, c0:c1], x[:, c0:c1]) for r0, r1, c0, c1 in bands]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def resized_conv3x3(x: torch.Tensor, weight: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """`conv2d(resize(x, size), weight, padding=1)`, computed at x's own (smaller) resolution.

    Bilinear resizing and the channel mixing of each of the 9 taps are both linear and act on different
    axes, so they commute: the taps' 1x1 convs run on the small map (9 outputs per channel), and the
    resize, the tap shifts and their sum become two banded matmuls, one per axis. Exact up to float
    rounding; for a level at 1/2, 1/4, 1/8 of the size it costs about 1/4, 1/16, 1/64 of the
    multiply-adds of the conv after resizing. UPerNet's fusion conv spends 2/3 of the model's
    multiply-adds on the resized levels.

    Args:
        x: (N, C, h, w) map; channels_last memory avoids a copy.
        weight: (C_out, C, 3, 3) weight of a stride-1, padding-1, undilated, ungrouped conv (no bias).
        size: output (H, W).
        align_corners: `align_corners` of the resize.

    Returns:
        (N, C_out, H, W), channels_last in memory.
    """
    n, c, h, w = x.shape
    height, width = (int(v) for v in size)
    out_channels = weight.shape[0]
    # One 1x1 conv per tap; outputs ordered (dx, dy, C_out) so the first pass contracts (column, dx).
    # (A reused output buffer for this product measured no faster in the interleaved benchmark.)
    taps = weight.permute(3, 2, 0, 1).reshape(9 * out_channels, c)
    z = F.linear(x.permute(0, 2, 3, 1), taps.to(x.dtype)).reshape(n * h, 3 * w, 3 * out_channels)
    cols, col_bands = shifted_interpolation(width, w, align_corners)
    t = banded_matmul(cols.to(z), col_bands, z)  # (N*h, W, [dy, C_out])
    t = t.view(n, h, width, 3, out_channels).permute(0, 1, 3, 2, 4).reshape(n, 3 * h, width * out_channels)
    rows, row_bands = shifted_interpolation(height, h, align_corners)
    y = banded_matmul(rows.to(t), row_bands, t)  # (N, H, W * C_out)
    return y.view(n, height, width, out_channels).permute(0, 3, 1, 2)


def convolve_before_resize(x: torch.Tensor, size: Sequence[int]) -> bool:
    """True when a 3x3 conv of `resize(x, size)` is cheaper computed before the resize
    (`resized_conv3x3`): when `x` has at most half the output pixels."""
    return 2 * x.shape[-2] * x.shape[-1] <= int(size[0]) * int(size[1])


def _bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of a bilinear resize (align_corners=False), as `F.interpolate` computes them."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    return low, (low + 1).clamp(max=n_in - 1), (src - low).float()


def resize_in_stripes(x: torch.Tensor, size: Sequence[int], rows: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
    """Bilinear resize of (N, C, h, w) to `size`, yielded as (row slice, (N, C, rows, W)) stripes.

    The values of `F.interpolate(x, size, mode="bilinear")` (up to float rounding) without ever
    holding the full (N, C, H, W) result: many-class maps of large images in bounded memory.
    """
    height, width = size
    y0, y1, wy = _bilinear_taps(x.shape[-2], height)
    x0, x1, wx = _bilinear_taps(x.shape[-1], width)
    for start in range(0, height, rows):
        part = slice(start, min(start + rows, height))
        a = wy[part].view(-1, 1)
        stripe = x[..., y0[part], :] * (1 - a) + x[..., y1[part], :] * a
        yield part, stripe[..., x0] * (1 - wx) + stripe[..., x1] * wx
