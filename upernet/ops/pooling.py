"""Adaptive average pooling that exports to ONNX for any input size."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_avg_pool2d_exportable(x: torch.Tensor, output_size: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, output_size)` from operators that export to ONNX for any input size.

    Bin i of an axis of length n covers [floor(i * n / s), ceil((i + 1) * n / s)), as in PyTorch. The
    bins become an (s, n) averaging matrix built from the runtime shape, applied to each axis.
    """
    def bins(n: torch.Tensor | int) -> torch.Tensor:
        n = torch.as_tensor(n, device=x.device)
        i = torch.arange(output_size, device=x.device).unsqueeze(1)
        start = torch.div(i * n, output_size, rounding_mode="floor")
        end = torch.div((i + 1) * n + output_size - 1, output_size, rounding_mode="floor")
        pos = torch.arange(n, device=x.device).unsqueeze(0)
        inside = ((pos >= start) & (pos < end)).to(x.dtype)
        return inside / (end - start).to(x.dtype)

    rows, cols = bins(x.shape[-2]), bins(x.shape[-1])
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def adaptive_avg_pool2d(x: torch.Tensor, output_size: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d`, except during ONNX export: `adaptive_avg_pool2d_exportable`, whose bins
    follow the runtime size (torch's export fixes them at the traced size)."""
    if torch.onnx.is_in_onnx_export():
        return adaptive_avg_pool2d_exportable(x, output_size)
    return F.adaptive_avg_pool2d(x, output_size)
