"""The inference fast path: a prepared copy of a model that computes the same outputs with less work.

`prepare_for_inference(model)` returns an eval-mode copy in which every module that knows how to
prepare itself does (as timm's `reparameterize_model` asks each block to fuse itself):

- every `ConvBNReLU` folds its BatchNorm into its conv;
- the `UPerHead` runs its 3x3 convs as Winograd F(2x2, 3x3) (2.25x fewer multiply-adds), its
  convs over concatenations as one conv per input, the coarse levels' parts before their resize
  (`upernet.ops.concat_conv`, strategy "winograd"), and returns float32 logits, so that the final
  upsampling to the image size is done in float32;
- a `UPerNet` drops its auxiliary head (training only);

and the backbone's conv -> BN pairs are folded where torch.fx can trace it. Weights are bfloat16 on
hardware with native bf16 (AVX512-BF16/AMX CPUs, CUDA GPUs with bf16) when `dtype="auto"`, tensors
are channels_last, a forward pre-hook casts the input images to match and every floating output
leaves in float32. No class is swapped: the prepared model has every method of the original
(`decode_head.pyramid`, `fuse_levels`, the multi-task model's heads).

Outputs stay within 1e-4 of the unprepared model in float32; bf16 predictions agree with float32 on
>= 99.5% of pixels (tests/test_fast.py, tests/test_prepare.py).
"""
from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

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
            raise UserError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype_for(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The `--precision` of predict/eval -> the dtype they run in (None: float32).

    "auto" is bf16 where the hardware runs it natively (`native_bf16`), else float32. predict and eval
    turn bf16 into real bf16 weights (`prepare_for_inference(model, "bf16")`) and fp16 into autocast.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---- preparation ------------------------------------------------------------------------------
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


def _match_input(model: nn.Module, args: tuple, memory_format: torch.memory_format) -> tuple:
    """Forward pre-hook: cast the images to the model's dtype, device and memory format."""
    images, *rest = args
    param = next(model.parameters())
    return (images.to(device=param.device, dtype=param.dtype, memory_format=memory_format), *rest)


def _float32_outputs(model: nn.Module, args: tuple, outputs):
    """Forward hook: floating tensors of a dict output leave the model in float32."""
    if isinstance(outputs, dict):
        return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
    return outputs


def prepare_for_inference(
    model: nn.Module,
    dtype: str | torch.dtype = "auto",
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """An eval-mode copy of `model` for fast inference; `model` itself is left untouched.

    Every submodule with a `prepare_for_inference()` method prepares itself (`ConvBNReLU` folds its
    BatchNorm, `UPerHead` selects Winograd, `UPerNet` drops its auxiliary head); the backbone's
    BatchNorms are folded through torch.fx; then the copy is cast. Works for any torch module (a
    UPerNet, the multi-task `MultiTaskUPerNet`); a model that is not a torch module (an `OnnxModel`) is
    returned as it is.

    Args:
        model: the model, on the device it should run on.
        dtype: "auto" (bf16 where the hardware runs it natively, else fp32), "fp32" or "bf16".
        channels_last: keep activations channels_last (faster convolutions with oneDNN and cuDNN).
        compile: wrap the result in `torch.compile` (compiles at the first call of each input shape).

    Returns:
        A model with the same call signature and methods; it accepts float32 images and casts them
        itself, and returns its outputs (e.g. {"out": logits at input size}) in float32.
    """
    if not isinstance(model, nn.Module):
        return model
    device = next(model.parameters()).device
    target = resolve_dtype(dtype, device)
    prepared = copy.deepcopy(model).eval()
    for module in list(prepared.modules()):
        if hasattr(module, "prepare_for_inference"):
            module.prepare_for_inference()
    if isinstance(getattr(prepared, "backbone", None), nn.Module):
        prepared.backbone = fold_backbone_batchnorms(prepared.backbone)
    prepared = prepared.to(dtype=target)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    prepared.register_forward_pre_hook(functools.partial(_match_input, memory_format=memory_format))
    prepared.register_forward_hook(_float32_outputs)
    for p in prepared.parameters():
        p.requires_grad_(False)
    if compile:
        return torch.compile(prepared)
    return prepared
