"""The 3x3 conv over a channel concatenation of resized inputs, `conv(cat([resize(x, size) ...]))`,
UPerNet's PPM bottleneck and fusion conv, by three strategies that compute the same maths:

- "literal": resize, concatenate, convolve, as published. FLOP counting (`count_macs`) and ONNX
  export use it (during export every strategy runs as "literal").
- "split": the conv over a concatenation is the sum of one conv per input; inputs with at most half
  the output pixels are convolved before their resize (`resized_conv3x3`), a third of the head's
  multiply-adds. What training runs.
- "winograd": "split" for the coarse inputs, Winograd F(2x2, 3x3) for the full-size ones. Inference
  only: under autograd it runs as "split".
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .resize import convolve_before_resize, resize, resized_conv3x3
from .winograd import winograd_conv3x3, winograd_weight

STRATEGIES = ("literal", "split", "winograd")


def concat_conv(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    size: Sequence[int],
    align_corners: bool = False,
    strategy: str = "split",
    transformed_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`conv2d(cat([resize(x, size) for x in inputs]), weight, bias, padding=1)` by `strategy`.

    Args:
        inputs: (N, C_i, h_i, w_i) maps, in concatenation order.
        weight: (C_out, sum C_i, 3, 3) weight of the stride-1, padding-1 conv.
        bias: (C_out,) or None.
        size: (H, W) every input is resized to.
        align_corners: `align_corners` of the resizes.
        strategy: one of `STRATEGIES`.
        transformed_weight: `winograd_weight(weight)` for "winograd", precomputed (else computed here).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"concat strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if torch.onnx.is_in_onnx_export():
        strategy = "literal"  # one Concat + Conv; resizes always recorded (`resize`)
    elif strategy == "winograd" and torch.is_grad_enabled():
        strategy = "split"  # Winograd writes into reused buffers: no autograd
    coarse = [strategy != "literal" and convolve_before_resize(x, size) for x in inputs]
    if strategy == "literal" or (strategy == "split" and not any(coarse)):
        return F.conv2d(torch.cat([resize(x, size, align_corners) for x in inputs], dim=1), weight, bias, padding=1)

    widths = [x.shape[1] for x in inputs]
    out = None
    for x, part, is_coarse in zip(inputs, torch.split(weight, widths, dim=1), coarse):
        if is_coarse:
            y = resized_conv3x3(x, part, size, align_corners)
        elif strategy == "split":
            y = F.conv2d(resize(x, size, align_corners), part, None, 1, 1)
        else:
            continue  # full-size inputs of "winograd": below
        out = y if out is None else out + y
    if strategy == "winograd" and not all(coarse):
        if transformed_weight is None:
            transformed_weight = winograd_weight(weight)
        parts = torch.split(transformed_weight, widths, dim=1)
        full = [(resize(x, size, align_corners), u) for x, u, c in zip(inputs, parts, coarse) if not c]
        y = winograd_conv3x3([x for x, _ in full], [u for _, u in full], bias)
        return y if out is None else y.add_(out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
