"""DCNv3 speed on CPU: our gather formulation against the straightforward grid_sample one.

The straightforward formulation is the one of InternImage's pure-PyTorch fallback
(`dcnv3_core_pytorch`): pad the input, one `grid_sample` over all K points of all groups on a
(N * groups, C / groups, H, W) copy, multiply by the mask, sum over the points. It is written out
below (our code) and swapped into the same model, so both run on identical weights and inputs.

Measured, in one run with interleaved repetitions and medians (the machine may be shared):
  1. one DCNv3 layer (the whole module: projections, offset/mask branch, sampling) at the size of
     each InternImage-T level for a 512x512 image, and the sum over T's 30 layers;
  2. the whole UPerNet InternImage-T forward at 512x512;
in float32 and bfloat16, as wall time and as CPU time of this process (less sensitive to other
processes on a shared machine). Ratios > 1 mean ours is faster.

    python benchmarks/dcnv3.py                     # 512x512, 5 repetitions
    python benchmarks/dcnv3.py --size 1024 --reps 3 --threads 2
    python benchmarks/dcnv3.py --smoke             # tiny input and model: checks the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import upernet
from upernet.models.backbones import dcnv3 as dcnv3_module


def straightforward_core(x, offset, mask, kernel_size, groups, offset_scale=1.0, stride=1, pad=None, dilation=1):
    """DCNv3 sampling with one grid_sample over every point (InternImage's pure-PyTorch formulation)."""
    n, h, w, c = x.shape
    _, h_out, w_out, _ = offset.shape
    k, gc = kernel_size * kernel_size, c // groups
    pad = (dilation * (kernel_size - 1)) // 2 if pad is None else pad
    half = (dilation * (kernel_size - 1)) // 2
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    steps = torch.arange(kernel_size, dtype=torch.float32, device=x.device) * dilation - half
    grid_x, grid_y = steps.repeat_interleave(kernel_size), steps.repeat(kernel_size)
    ref_x = (half + 0.5 + torch.arange(w_out, device=x.device) * stride) / wp
    ref_y = (half + 0.5 + torch.arange(h_out, device=x.device) * stride) / hp
    off = offset.float().view(n, h_out, w_out, groups, k, 2)
    loc_x = ref_x.view(1, 1, w_out, 1, 1) + (grid_x + off[..., 0]) * offset_scale / wp
    loc_y = ref_y.view(1, h_out, 1, 1, 1) + (grid_y + off[..., 1]) * offset_scale / hp
    grid = (torch.stack([loc_x, loc_y], -1) * 2 - 1).to(x.dtype)
    grid = grid.view(n, h_out * w_out, groups, k, 2).transpose(1, 2).reshape(n * groups, h_out * w_out, k, 2)
    planes = padded.reshape(n, hp * wp, c).transpose(1, 2).reshape(n * groups, gc, hp, wp)
    samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, h_out * w_out, groups, k).transpose(1, 2).reshape(n * groups, 1, h_out * w_out, k)
    out = (samples * weights.to(x.dtype)).sum(-1).view(n, c, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, c)


@contextlib.contextmanager
def use_core(core):
    """Run every DCNv3 module with `core` as its sampling function."""
    saved = dcnv3_module.dcnv3_core
    dcnv3_module.dcnv3_core = core
    try:
        yield
    finally:
        dcnv3_module.dcnv3_core = saved


CORES = {"ours": dcnv3_module.dcnv3_core, "grid_sample": straightforward_core}


def compare(fn, reps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of fn() under each core, repetitions interleaved."""
    times = {name: {"wall": [], "cpu": []} for name in CORES}
    for name, core in CORES.items():  # warm-up
        with use_core(core):
            fn()
    for _ in range(reps):
        for name, core in CORES.items():
            with use_core(core):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {kind: 1e3 * statistics.median(v) for kind, v in t.items()} for name, t in times.items()}


def row(label: str, t: dict[str, dict[str, float]]) -> str:
    ours, ref = t["ours"], t["grid_sample"]
    return (f"{label:<34} wall {ours['wall']:9.1f} vs {ref['wall']:9.1f} ms  x{ref['wall'] / ours['wall']:5.2f}   "
            f"cpu {ours['cpu']:9.1f} vs {ref['cpu']:9.1f} ms  x{ref['cpu'] / ours['cpu']:5.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side (the levels are size/4 ... size/32)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--smoke", action="store_true", help="tiny input, reduced model, one repetition")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, reps = (64, 1) if args.smoke else (args.size, args.reps)
    small = {"channels": 16, "aux_channels": 8, "backbone_args": {"channels": 8, "depths": (1, 1, 1, 1), "groups": (1, 2, 2, 4)}}
    model_args = small if args.smoke else {}
    torch.manual_seed(0)
    model = upernet.build_model("upernet_internimage_t", **model_args).eval()
    # Random offsets and masks (trained models have them; the init is all zeros and uniform).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, dcnv3_module.DCNv3):
                module.offset.weight.normal_(0, 0.1)
                module.mask.weight.normal_(0, 0.1)
    backbone = model.backbone
    print(f"DCNv3 ours (gather + embedding_bag) vs straightforward (grid_sample); InternImage-T, {size}x{size}, "
          f"{torch.get_num_threads()} threads, median of {reps}; ratio = straightforward / ours")
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        model.to(dtype)
        totals = {name: {"wall": 0.0, "cpu": 0.0} for name in CORES}
        with torch.no_grad():
            for i, level in enumerate(backbone.levels):
                layer = level.blocks[0].dcn
                side = size // 4 // 2**i
                x = torch.randn(1, side, side, backbone.channels[i], dtype=dtype)
                diff = (layer(x).float() - _with(straightforward_core, layer, x).float()).abs().max().item()
                t = compare(lambda: layer(x), reps)
                print(row(f"{str(dtype)[6:]} DCNv3 layer {side}x{side}x{backbone.channels[i]}", t)
                      + f"   max diff {diff:.1e}")
                for name in CORES:
                    for kind in ("wall", "cpu"):
                        totals[name][kind] += t[name][kind] * len(level.blocks)
            print(row(f"{str(dtype)[6:]} all {sum(backbone.depths)} DCNv3 layers", totals))
            images = torch.randn(1, 3, size, size, dtype=dtype)
            print(row(f"{str(dtype)[6:]} UPerNet InternImage-T forward", compare(lambda: model(images), reps)))


def _with(core, fn, *args):
    with use_core(core):
        return fn(*args)


if __name__ == "__main__":
    main()
