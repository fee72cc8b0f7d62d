"""Parameter and FLOP counts, measured on the real forward pass."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: torch.nn.Module, shape: tuple[int, int], batch: int = 1, published: bool = True) -> int:
    """Multiply-adds of one eval-mode forward at `shape`, from torch's FLOP counter (FLOPs / 2).

    Counted: convolutions, matmuls and attention. Not counted (as in mmcv/fvcore, whose counts the
    published tables report): normalisation, activations, pooling, interpolation, element-wise ops.
    A module with work the counter cannot see (DCNv3's deformable sampling) defines
    `extra_macs(output) -> int`, its published convention, which is added for each call.
    `published=True` counts UPerHead's fusion as the conv over the concatenation of the resized
    levels (as the published tables do: `concat_strategy = "literal"`); False counts what our forward
    computes (the head's own `concat_strategy`, "split": about 1/3 fewer multiply-adds).
    """
    heads = [m for m in model.modules() if hasattr(m, "concat_strategy")]
    saved = [m.concat_strategy for m in heads]
    for m in heads:
        m.concat_strategy = "literal" if published else m.concat_strategy
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(batch, 3, *shape, dtype=param.dtype, device=param.device)
    extra = [0]
    hooks = [m.register_forward_hook(lambda m, args, out: extra.__setitem__(0, extra[0] + m.extra_macs(out)))
             for m in model.modules() if hasattr(m, "extra_macs")]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, strategy in zip(heads, saved):
            m.concat_strategy = strategy
    model.train(was_training)
    return counter.get_total_flops() // 2 + extra[0]


def model_stats(model: torch.nn.Module, shape: tuple[int, int] = (512, 512)) -> dict:
    def params(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {
        "params": params(model),
        "params_backbone": params(model.backbone),
        "params_decode_head": params(model.decode_head),
        "params_aux_head": params(getattr(model, "aux_head", None)),
        "macs": count_macs(model, shape),
        "channels": list(model.backbone.channels),
        "strides": list(model.backbone.strides),
    }
