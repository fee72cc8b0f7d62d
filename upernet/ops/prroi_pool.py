"""Precise RoI Pooling (Jiang et al. 2018, "Acquisition of Localization Confidence"), plain PyTorch.

Each output bin is the exact average, over the bin's rectangle, of the bilinear interpolation of the
feature map, the surface f(x, y) = sum_ij F[i, j] hat(y - i) hat(x - j) with hat(t) = max(0, 1 - |t|):
samples sit at integer coordinates, and the surface falls to 0 outside the map (pixels outside read
as 0), as in the authors' CUDA kernel. RoI corners are multiplied by `spatial_scale`, not shifted by
half a pixel; a bin of zero area pools to 0.

The surface is a sum of separable terms, so the integral over a bin is too: a (bins, H) weight matrix
per axis, whose entries are integrals of the hat function, and two matrix products. No loop over
pixels, differentiable in the features and in the RoI corners, and it exports to ONNX.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def hat_antiderivative(t: torch.Tensor) -> torch.Tensor:
    """The integral of hat(s) = max(0, 1 - |s|) from -inf to t: 0 below -1, 1 above 1, quadratic between."""
    c = t.clamp(-1.0, 1.0)
    return c + 0.5 - 0.5 * c * c.abs()


def bin_weights(start: torch.Tensor, end: torch.Tensor, bins: int, size: int | torch.Tensor) -> torch.Tensor:
    """(R, bins, size): the integral of the hat function of each pixel over each bin of one axis.

    Args:
        start: (R,) RoI start on this axis, in feature-map pixels.
        end: (R,) RoI end; the RoI is cut into `bins` equal bins (an inverted RoI has zero-width bins).
        bins: number of output bins along the axis.
        size: number of pixels along the axis.
    """
    width = (end - start).clamp(min=0) / bins
    edges = start[:, None] + width[:, None] * torch.arange(bins + 1, device=start.device, dtype=start.dtype)
    pixels = torch.arange(size, device=start.device).to(start.dtype)
    cumulative = hat_antiderivative(edges[:, :, None] - pixels)  # (R, bins + 1, size)
    return cumulative[:, 1:] - cumulative[:, :-1]


def prroi_pool2d(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int],
                 spatial_scale: float = 1.0) -> torch.Tensor:
    """Precise RoI Pooling of `rois` over `features`: (R, C, out_h, out_w).

    Args:
        features: (N, C, H, W) feature maps.
        rois: (R, 5) rows of (batch index, x0, y0, x1, y1) in input coordinates.
        output_size: bins per side, or (out_h, out_w).
        spatial_scale: factor from input coordinates to feature-map pixels (e.g. 1/32).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale
    x0, y0, x1, y1 = boxes.unbind(1)
    rows = bin_weights(y0, y1, out_h, features.shape[-2])  # (R, out_h, H)
    cols = bin_weights(x0, x1, out_w, features.shape[-1])  # (R, out_w, W)
    area = ((x1 - x0).clamp(min=0) / out_w) * ((y1 - y0).clamp(min=0) / out_h)
    inverse_area = torch.where(area > 0, 1 / area.clamp(min=torch.finfo(area.dtype).tiny), torch.zeros_like(area))
    maps = features[rois[:, 0].long()]
    pooled = torch.matmul(torch.matmul(rows[:, None], maps), cols[:, None].transpose(-1, -2))
    return pooled * inverse_area[:, None, None, None]


def prroi_pool2d_whole(features: torch.Tensor, output_size: int) -> torch.Tensor:
    """Precise RoI Pooling of each whole map (the RoI [0, W] x [0, H]) into `output_size` x `output_size`.

    What CSAIL's UPerNet PPM does (`PrRoIPool2D(s, s, 1.0)` on the RoI (0, 0, W, H)). Unlike adaptive
    average pooling, bins overlap pixel boundaries fractionally and the last half-pixel band towards
    the right and bottom edges falls off linearly to 0.
    """
    n, h, w = features.shape[0], features.shape[-2], features.shape[-1]
    zero = features.new_zeros(1)
    rows = bin_weights(zero, zero + h, output_size, h)[0]  # (s, H)
    cols = bin_weights(zero, zero + w, output_size, w)[0]  # (s, W)
    area = (h / output_size) * (w / output_size)
    return torch.matmul(torch.matmul(rows, features), cols.transpose(0, 1)) / area


class PrRoIPool2d(nn.Module):
    """Precise RoI Pooling as a module; `forward(features, rois=None)` pools whole maps without RoIs.

    Args:
        output_size: bins per side, or (out_h, out_w).
        spatial_scale: factor from RoI coordinates to feature-map pixels.
    """

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0):
        super().__init__()
        self.output_size = output_size if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = spatial_scale

    def forward(self, features: torch.Tensor, rois: torch.Tensor | None = None) -> torch.Tensor:
        if rois is None:
            if not isinstance(self.output_size, int) or self.spatial_scale != 1.0:
                raise ValueError("whole-map pooling takes a square output_size and spatial_scale 1.0")
            return prroi_pool2d_whole(features, self.output_size)
        return prroi_pool2d(features, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
