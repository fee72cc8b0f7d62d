"""The inference fast path: a prepared copy of a UPerNet that computes the same logits with less work.

`prepare_for_inference(model)` returns an eval-mode copy in which

- every BatchNorm that follows a convolution is folded into it (the head's `ConvBNReLU`s, and a
  backbone's conv -> BN pairs where torch.fx can trace it);
- the decode head is a `FastUPerHead`: the fusion conv over the 4-level concatenation is computed
  as the sum of one conv per level (the same maths without the 2048-channel concat): the coarse
  levels' parts before their resize (`resized_conv3x3`, as the training head does), the stride-4
  level's and the FPN convs as Winograd F(2x2, 3x3); the auxiliary head is never run and the head
  returns float32 logits, so the final upsampling to the image size is done in float32;
- weights are bfloat16 on hardware with native bf16 (AVX512-BF16/AMX CPUs, CUDA GPUs with bf16) when
  `dtype="auto"`, and tensors are channels_last; a forward pre-hook casts the input images to match.

Outputs stay within 1e-4 of the unprepared model in float32; bf16 predictions agree with float32 on
>= 99.5% of pixels (tests/test_fast.py).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.scratch import padded_scratch, scratch as _scratch
from ..models.upernet import ConvBNReLU, UPerHead, UPerNet, resize, resized_conv3x3, worth_resizing_after

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- hardware --------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 convolutions and matmuls run in hardware (so bf16 is faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" -> bf16 where `native_bf16(device)`, else fp32; "fp32"/"bf16" (or a torch dtype) as given."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype_for(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The `--precision` of predict/eval -> the dtype they run in (None: float32).

    "auto" is bf16 where the hardware runs it natively (`native_bf16`), else float32; with a UPerNet
    "bf16" means real bf16 weights (`fast_path`), for other models bf16 autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---- BatchNorm folding -----------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` into `conv` in place: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def fold_head_batchnorms(model: nn.Module) -> int:
    """Fold the BN of every `ConvBNReLU` in `model` into its conv; returns how many were folded."""
    count = 0
    for module in model.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module.bn, nn.BatchNorm2d):
            fold_batchnorm(module.conv, module.bn)
            module.bn = nn.Identity()
            count += 1
    return count


def fold_backbone_batchnorms(backbone: nn.Module) -> nn.Module:
    """A copy of the backbone's `body` with conv -> BN pairs folded, through torch.fx.

    Backbones without BatchNorm are returned as they are; one that fx cannot trace keeps its BNs
    (a slower but correct model), which is logged.
    """
    body = getattr(backbone, "body", None)
    if body is None or not any(isinstance(m, nn.BatchNorm2d) for m in body.modules()):
        return backbone
    from torch.fx.experimental.optimization import fuse

    try:
        backbone.body = fuse(body)
    except Exception as e:  # fx cannot trace data-dependent Python control flow; folding is optional
        log.info("backbone BatchNorms not folded (torch.fx cannot trace %s: %s)", type(body).__name__, e)
    return backbone


# ---- the inference head ----------------------------------------------------------------------
def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """`resize`, except during ONNX export, where the resize is always recorded: a size that happens
    to match at the traced input size need not match at others."""
    if torch.onnx.is_in_onnx_export():
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return resize(x, size, align_corners)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 3x3 conv as 16 matmuls on 4x4 input tiles that overlap by
# 2, 2.25x fewer multiply-adds than direct convolution. V = B^T d B, U = G g G^T, y = A^T (V U) A.
_WINOGRAD_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)


def _winograd_pad(x: torch.Tensor, slot: str) -> torch.Tensor:
    """(N, C, H, W) -> NHWC zero-padded by 1, and to 2T + 2 x 2S + 2 for T x S output tiles of 2x2."""
    h, w = x.shape[-2:]
    t, s = (h + 1) // 2, (w + 1) // 2
    return padded_scratch(slot, x.permute(0, 2, 3, 1), (1, 2 * t + 1 - h), (1, 2 * s + 1 - w))


def _winograd_input(xp: torch.Tensor) -> torch.Tensor:
    """Padded NHWC rows (N, 2t + 2, 2s + 2, C) -> V (16, N*t*s, C), B^T d B of every 4x4 tile."""
    n, rows, cols, c = xp.shape
    t, s = (rows - 2) // 2, (cols - 2) // 2
    r = [xp[:, i:i + 2 * t:2] for i in range(4)]  # tile row i of every tile row
    u = _scratch("winograd u", (4, n, t, cols, c), xp)
    torch.sub(r[0], r[2], out=u[0])
    torch.add(r[1], r[2], out=u[1])
    torch.sub(r[2], r[1], out=u[2])
    torch.sub(r[1], r[3], out=u[3])
    q = [u[:, :, :, j:j + 2 * s:2] for j in range(4)]  # tile column j
    v = _scratch("winograd v", (4, 4, n, t, s, c), xp)
    torch.sub(q[0], q[2], out=v[:, 0])
    torch.add(q[1], q[2], out=v[:, 1])
    torch.sub(q[2], q[1], out=v[:, 2])
    torch.sub(q[1], q[3], out=v[:, 3])
    return v.view(16, n * t * s, c)


def _winograd_output(m: torch.Tensor, out: torch.Tensor) -> None:
    """M (16, N*t*s, C) -> `out` (N, 2t, 2s, C) NHWC, A^T M A of every tile."""
    n, rows, cols, c = out.shape
    t, s = rows // 2, cols // 2
    m = m.view(4, 4, n, t, s, c)
    z = _scratch("winograd z", (2, 4, n, t, s, c), m)
    torch.add(m[0], m[1], out=z[0]).add_(m[2])
    torch.sub(m[1], m[2], out=z[1]).sub_(m[3])
    y = out.view(n, t, 2, s, 2, c)
    left, right = y[:, :, :, :, 0].permute(2, 0, 1, 3, 4), y[:, :, :, :, 1].permute(2, 0, 1, 3, 4)
    torch.add(z[:, 0], z[:, 1], out=left).add_(z[:, 2])
    torch.sub(z[:, 1], z[:, 2], out=right).sub_(z[:, 3])


class ConcatConv(nn.Module):
    """A 3x3 conv + ReLU over the channel concatenation of its inputs, as a sum over the inputs.

    conv(cat(x_1..x_k)) == sum_i conv_i(x_i), where conv_i holds the input channels of x_i: the
    concatenation is never built, and each input is resized to the size of the first on the way
    (inputs with at most half its pixels are convolved first and resized after: `resized_conv3x3`).
    3x3 convs with stride 1 run as Winograd F(2x2, 3x3) (2.25x fewer multiply-adds; the sum is
    accumulated in the Winograd domain, so there is one output transform), in bands of tile rows
    so that the transformed tensors stay small; other convs, ONNX export and autograd run directly.

    Args:
        conv: the (BN-folded) convolution over the concatenation.
        widths: channels of each input, in concatenation order.
        align_corners: `align_corners` of the resizes.
    """

    def __init__(self, conv: nn.Conv2d, widths: Sequence[int], align_corners: bool = False):
        super().__init__()
        if sum(widths) != conv.in_channels:
            raise ValueError(f"input widths {list(widths)} do not add up to the conv's {conv.in_channels} channels")
        starts = [sum(widths[:i]) for i in range(len(widths))]
        parts = [conv.weight[:, s:s + w].detach() for s, w in zip(starts, widths)]
        self.weights = nn.ParameterList(nn.Parameter(p.clone()) for p in parts)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.padding, self.dilation, self.stride, self.groups = conv.padding, conv.dilation, conv.stride, conv.groups
        self.align_corners = align_corners
        # Winograd tiles per batched matmul (None: by thread count). Measured here at 512x512: single-
        # threaded, 512-tile bands are 15% faster (cache); with 2 threads fewer, larger ops win.
        self.band_tiles: int | None = None
        self.winograd = (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1)
                         and conv.padding == (1, 1) and conv.groups == 1)
        if self.winograd:  # U = G g G^T per input, as (16, C_in, C_out) for batched matmuls
            g = _WINOGRAD_G
            self.winograd_weights = nn.ParameterList(
                nn.Parameter(torch.einsum("ai,ocij,bj->abco", g, p.double(), g).reshape(16, p.shape[1], p.shape[0])
                             .to(p.dtype).contiguous())
                for p in parts
            )

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        if not self.winograd or torch.onnx.is_in_onnx_export() or torch.is_grad_enabled():
            return self._direct(inputs, size)
        n, h, w = inputs[0].shape[0], *size
        # Coarse inputs are convolved before their resize (resized_conv3x3), the rest by Winograd.
        small = [i for i, x in enumerate(inputs) if worth_resizing_after(x, size)]
        before_resize = None
        for i in small:
            y = resized_conv3x3(inputs[i], self.weights[i], size, self.align_corners)
            before_resize = y if before_resize is None else before_resize.add_(y)
        winograd_weights = [u for i, u in enumerate(self.winograd_weights) if i not in small]
        padded = [_winograd_pad(resize(x, size, self.align_corners), f"winograd input {i}")
                  for i, x in enumerate(inputs) if i not in small]
        t, s = (h + 1) // 2, (w + 1) // 2
        out = padded[0].new_empty(n, 2 * t, 2 * s, self.winograd_weights[0].shape[-1])
        tiles = self.band_tiles or (512 if torch.get_num_threads() == 1 else 4096)
        band = max(1, tiles // (n * s))  # tile rows per band: the buffers stay small
        for r0 in range(0, t, band):
            r1 = min(t, r0 + band)
            m = None
            for xp, u in zip(padded, winograd_weights):
                v = _winograd_input(xp[:, 2 * r0:2 * r1 + 2])
                if m is None:
                    m = torch.bmm(v, u, out=_scratch("winograd m", (16, v.shape[1], u.shape[-1]), v))
                else:
                    m.baddbmm_(v, u)
            if self.bias is not None:
                m[5].add_(self.bias)  # A^T carries tile entry (1, 1) into every output with weight 1
            _winograd_output(m, out[:, 2 * r0:2 * r1])
        out = out[:, :h, :w].permute(0, 3, 1, 2)
        if before_resize is not None:
            out = out + before_resize
        return out.relu_().contiguous(memory_format=torch.channels_last)

    def _direct(self, inputs: Sequence[torch.Tensor], size) -> torch.Tensor:
        out = None
        for x, weight in zip(inputs, self.weights):
            if self.winograd and worth_resizing_after(x, size):
                y = resized_conv3x3(x, weight, size, self.align_corners)
            else:
                y = F.conv2d(_resize(x, size, self.align_corners), weight, None, self.stride, self.padding,
                             self.dilation, self.groups)
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out.relu()


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


class FastUPerHead(UPerHead):
    """UPerHead for inference: folded BNs, the FPN and fusion convs as `ConcatConv`s, float32 logits.

    Built from a trained head by `FastUPerHead.from_head`; holds the same modules otherwise.
    """

    fusion: ConcatConv

    @classmethod
    def from_head(cls, head: UPerHead) -> "FastUPerHead":
        """Turn `head` (eval mode) into a FastUPerHead in place; returns it."""
        fold_head_batchnorms(head)
        channels = head.fusion.conv.out_channels
        widths = [channels] * (len(head.lateral_convs) + 1)
        head.fusion = ConcatConv(head.fusion.conv, widths, head.align_corners)
        head.fpn_convs = nn.ModuleList(ConcatConv(block.conv, [channels]) for block in head.fpn_convs)
        head.__class__ = cls  # same attributes, new forward (as torch.nn.utils.parametrize does)
        return head

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().pyramid_pooling(x)
        size = x.shape[-2:]
        branches = [x]
        for scale, conv in zip(self.pool_scales, self.ppm):
            pooled = adaptive_avg_pool2d_exportable(x, scale)
            if self.ppm_upsample_first:
                branches.append(conv(_resize(pooled, size, self.align_corners)))
            else:
                branches.append(_resize(conv(pooled), size, self.align_corners))
        return self.ppm_bottleneck(torch.cat(branches, dim=1))

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.pyramid_pooling(features[-1]))
        # Top-down: 1/32 -> 1/16 -> 1/8 -> 1/4.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv([lat]) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        # Fusion: every level resized to 1/4 and convolved, summed (no concat).
        return self.fusion(outs)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # Dropout is the identity at inference; the logits leave the head in float32.
        return self.classifier(self.fuse(features)).float()


# ---- preparation -----------------------------------------------------------------------------
def _match_input(model: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: cast the images to the model's dtype and memory format."""
    images, *rest = args
    param = next(model.parameters())
    memory_format = torch.channels_last if getattr(model, "channels_last", False) else torch.contiguous_format
    return (images.to(device=param.device, dtype=param.dtype, memory_format=memory_format), *rest)


def prepare_for_inference(
    model: UPerNet,
    dtype: str | torch.dtype = "auto",
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """An eval-mode copy of `model` for fast inference; `model` itself is left untouched.

    Args:
        model: a UPerNet (any backbone), on the device it should run on.
        dtype: "auto" (bf16 where the hardware runs it natively, else fp32), "fp32" or "bf16".
        channels_last: keep activations channels_last (faster convolutions with oneDNN and cuDNN).
        compile: wrap the result in `torch.compile` (compiles at the first call of each input shape).

    Returns:
        A model with the same call signature that returns {"out": float32 logits at input size}; it
        accepts float32 images and casts them itself.
    """
    if not isinstance(model, UPerNet):
        raise ValueError(f"prepare_for_inference needs a UPerNet, got {type(model).__name__}")
    device = next(model.parameters()).device
    target = resolve_dtype(dtype, device)
    fast = copy.deepcopy(model).eval()
    fast.aux_head = None  # never run at inference
    if type(fast.decode_head) is UPerHead:  # a subclass may compute something else: leave it as it is
        fast.decode_head = FastUPerHead.from_head(fast.decode_head)
    fast.backbone = fold_backbone_batchnorms(fast.backbone)
    fast = fast.to(dtype=target)
    fast.channels_last = channels_last
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    fast.inference_dtype = target
    fast.register_forward_pre_hook(_match_input)
    for p in fast.parameters():
        p.requires_grad_(False)
    if compile:
        return torch.compile(fast)
    return fast


def fast_path(model: nn.Module, autocast_dtype: torch.dtype | None = None) -> tuple[nn.Module, torch.dtype | None]:
    """What `predict` and `eval` run: (prepared model, autocast dtype still to apply).

    A UPerNet becomes `prepare_for_inference(model)` in fp32, or with real bf16 weights when bf16
    autocast was asked for (faster than autocast: no per-call weight casts). Other models (ONNX,
    multi-task, wrapped) are returned as they are.
    """
    if not isinstance(model, UPerNet):
        return model, autocast_dtype
    if autocast_dtype == torch.bfloat16:
        return prepare_for_inference(model, "bf16"), None
    return prepare_for_inference(model, "fp32"), autocast_dtype
