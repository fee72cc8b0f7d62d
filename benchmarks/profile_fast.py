"""Where the time of one UPerNet ConvNeXt-T 512x512 forward goes, per operator type (torch.profiler).

    .venv/bin/python benchmarks/profile_fast.py [--dtype bf16] [--threads 1]

Prints the share of each operator group of our fast path, and of transformers' model with bf16
weights + channels_last on the same weights.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from upernet.inference.peers import transformers_pair
from upernet.inference.prepare import prepare_for_inference

GROUPS = {  # aten op -> group
    "aten::mkldnn_convolution": "convolution", "aten::_slow_conv2d_forward": "convolution",
    "aten::bmm": "batched matmuls (Winograd; interpolation of resize-after convs)",
    "aten::baddbmm_": "batched matmuls (Winograd; interpolation of resize-after convs)",
    "aten::baddbmm": "batched matmuls (Winograd; interpolation of resize-after convs)",
    "aten::addmm": "linear (ConvNeXt MLPs)", "aten::mm": "matmuls (per-tap 1x1 convs of resize-after convs)",
    "aten::upsample_bilinear2d": "bilinear resize",
    "aten::native_layer_norm": "normalisation", "aten::native_batch_norm": "normalisation",
    "aten::gelu": "activations", "aten::relu_": "activations", "aten::clamp_min_": "activations",
    "aten::relu": "activations", "aten::clamp_min": "activations",
    "aten::cat": "concat / copies", "aten::copy_": "concat / copies", "aten::constant_pad_nd": "concat / copies",
}


def by_group(fn) -> dict[str, float]:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key in GROUPS:
            group = GROUPS[event.key]
        elif event.key in ("aten::add", "aten::sub", "aten::add_", "aten::sub_", "aten::mul"):
            group = "element-wise (adds, Winograd transforms)"
        else:
            group = "other"
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, peer = transformers_pair("upernet_convnext_tiny")
    images = torch.randn(1, 3, 512, 512)
    fast = prepare_for_inference(ours, args.dtype)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peer = copy.deepcopy(peer).to(dtype).to(memory_format=torch.channels_last)
    peer_images = images.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        results = {"upernet": by_group(lambda: fast(images)),
                   "transformers": by_group(lambda: peer(pixel_values=peer_images))}
    groups = sorted({g for r in results.values() for g in r}, key=lambda g: -results["upernet"].get(g, 0))
    print(f"| operator group ({args.dtype}) | upernet s | share | transformers s | share |")
    print("|---|---|---|---|---|")
    totals = {k: sum(v.values()) for k, v in results.items()}
    for g in groups:
        a, b = results["upernet"].get(g, 0.0), results["transformers"].get(g, 0.0)
        print(f"| {g} | {a:.2f} | {a / totals['upernet']:.0%} | {b:.2f} | {b / totals['transformers']:.0%} |")
    print(f"| total | {totals['upernet']:.2f} | | {totals['transformers']:.2f} | |")


if __name__ == "__main__":
    main()
