"""DCNv3 speed on CPU: our gather formulation against the straightforward grid_sample one.

The straightforward formulation is the one of InternImage's pure-PyTorch module (`DCNv3_pytorch`
with `dcnv3_core_pytorch`): softmax of the mask, pad the input, one `grid_sample` over all K points
of all groups on a (N * groups, C / groups, H, W) copy, multiply by the mask, sum over the points.
It is written out below (our code) and swapped into the same model as `DCNv3.forward`, so both run
on identical weights and inputs.

Ours runs twice: with the default plain-PyTorch sampling ("ours") and with the optional compiled
CPU kernel (`set_dcnv3_kernel("compiled")`, "compiled"; built on first use, about 30 s, needs a C++
compiler and ninja; left out with a note if it cannot be built).

The sampling operator is also compared with torchvision's compiled deformable convolution
(`torchvision.ops.deform_conv2d`, DCNv2), which computes DCNv3's sampling with a depthwise all-ones
kernel: the compiled operator a user already has, with no build step (`torchvision_core`).

Measured, in one run with interleaved repetitions and medians (the machine may be shared):
  1. the sampling operator alone (what the reference's compiled DCNv3 op computes) and
  2. one DCNv3 layer (the whole module: projections, offset/mask branch, softmax, sampling),
     at the size of each InternImage-T level for a 512x512 image, and their sums over T's 30 layers;
  3. the whole UPerNet InternImage-T forward at 512x512;
in float32 and bfloat16, as wall time and as CPU time of this process (less sensitive to other
processes on a shared machine). Ratios > 1 mean ours is faster. Everything runs under
`torch.no_grad()`: ours takes its inference path (on CPU, band by band; see `dcnv3.py`).
On a shared machine pin it to one core: `taskset -c 1 python benchmarks/dcnv3.py --threads 1`.

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
from upernet.ops import dcnv3 as dcnv3_ops


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
    grid = torch.stack([loc_x, loc_y], -1) * 2 - 1
    grid = grid.view(n, h_out * w_out, groups, k, 2).transpose(1, 2).reshape(n * groups, h_out * w_out, k, 2)
    planes = padded.reshape(n, hp * wp, c).transpose(1, 2).reshape(n * groups, gc, hp, wp)
    # grid_sample in float32, as autocast runs it: its CPU bfloat16 kernel computes the sampling
    # coordinates in bfloat16 (errors of a pixel and more, garbage far outside the map).
    samples = F.grid_sample(planes.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples = samples.to(x.dtype)
    weights = mask.view(n, h_out * w_out, groups, k).transpose(1, 2).reshape(n * groups, 1, h_out * w_out, k)
    out = (samples * weights.to(x.dtype)).sum(-1).view(n, c, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, c)


def torchvision_core(x, offset, mask, kernel_size, groups, offset_scale=1.0):
    """DCNv3 sampling with torchvision's compiled DCNv2 operator (`torchvision.ops.deform_conv2d`).

    A depthwise all-ones k x k kernel turns DCNv2 (sum over points of mask x sample, weighted per
    channel) into DCNv3's sampling, with one offset group per DCNv3 group. torchvision lays points
    out row-major (y outer) with offsets as (y, x); DCNv3 x outer with (x, y). An integer
    `offset_scale` s becomes dilation s and offsets x s. Computed in float32 (no bfloat16 CPU kernel).
    """
    from torchvision.ops import deform_conv2d

    n, h, w, c = x.shape
    scale = int(offset_scale)
    if scale != offset_scale:
        raise ValueError(f"torchvision_core: offset_scale {offset_scale} is not an integer")
    k = kernel_size
    offset = offset.float().view(n, h, w, groups, k, k, 2).transpose(4, 5).flip(-1) * scale  # (.., y, x, [y, x])
    mask = mask.float().view(n, h, w, groups, k, k).transpose(4, 5)
    weight = torch.ones(c, 1, k, k)
    out = deform_conv2d(x.float().permute(0, 3, 1, 2), offset.reshape(n, h, w, -1).permute(0, 3, 1, 2), weight,
                        padding=scale * (k // 2), dilation=scale, mask=mask.reshape(n, h, w, -1).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).to(x.dtype)


def straightforward_forward(self: dcnv3_module.DCNv3, x: torch.Tensor) -> torch.Tensor:
    """DCNv3.forward as InternImage's pure-PyTorch module (`DCNv3_pytorch`) computes it."""
    n, h, w, _ = x.shape
    projected = self.input_proj(x)
    features = self.dw_conv(x.permute(0, 3, 1, 2))
    offset = self.offset(features)
    mask = F.softmax(self.mask(features).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
    out = straightforward_core(projected, offset, mask, self.kernel_size, self.group, self.offset_scale,
                               self.stride, self.pad, self.dilation)
    if self.center_feature_scale:
        gate = torch.sigmoid(F.linear(features, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias))
        gate = gate[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
        out = out * (1 - gate) + projected * gate
    return self.output_proj(out)


def compiled_core(x, offset, mask, kernel_size, groups, offset_scale=1.0):
    """DCNv3 sampling by our optional compiled kernel (it takes mask logits: log of the mask here)."""
    table = dcnv3_ops._padded(x, torch.float32, reuse=True)
    real = torch.promote_types(offset.dtype, torch.bfloat16)  # float32 or bfloat16
    offset = offset.to(real).unflatten(-1, (-1, 2))
    offset_x, offset_y = offset[..., 0].contiguous(), offset[..., 1].contiguous()
    return dcnv3_ops.compiled_kernel().dcnv3_sample(table, offset_x, offset_y, mask.to(real).log(), groups,
                                                       kernel_size, offset_scale, 1, (kernel_size - 1) // 2, 1,
                                                       0).to(x.dtype)


@contextlib.contextmanager
def use_forward(forward, kernel="torch"):
    """Run every DCNv3 module with `forward`, ours with sampling `kernel`."""
    saved = dcnv3_module.DCNv3.forward, dcnv3_ops._kernel
    dcnv3_module.DCNv3.forward, dcnv3_ops._kernel = forward, kernel
    try:
        yield
    finally:
        dcnv3_module.DCNv3.forward, dcnv3_ops._kernel = saved


def shared_forward(self: dcnv3_module.DCNv3, x: torch.Tensor) -> torch.Tensor:
    """Only what both formulations compute with the same modules: the input, offset, mask and output
    projections and the depthwise conv -> LayerNorm -> GELU branch. Its time bounds the gain a
    faster sampling can bring to a whole layer (straightforward / shared)."""
    projected = self.input_proj(x)
    features = self.dw_conv(x.permute(0, 3, 1, 2))
    self.offset(features), self.mask(features)
    return self.output_proj(projected)


FORWARDS = {"ours": (dcnv3_module.DCNv3.forward, "torch"), "compiled": (dcnv3_module.DCNv3.forward, "compiled"),
            "grid_sample": (straightforward_forward, "torch")}


def compiled_available() -> bool:
    """Build the optional compiled kernel; False (with the reason printed) if it cannot be built."""
    try:
        dcnv3_ops.compiled_kernel()
        return True
    except RuntimeError as e:
        print(f"note: no 'compiled' column: {e}")
        return False


def compare(fns: dict, reps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each of `fns` ({"ours": f, "grid_sample": g}), interleaved."""
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {kind: 1e3 * statistics.median(v) for kind, v in t.items()} for name, t in times.items()}


def under_each_forward(fn, names) -> dict:
    """{"ours": fn under our DCNv3.forward, "compiled": ... with the compiled kernel, "grid_sample": fn
    under the straightforward forward}, for those of `names`."""
    def run(forward, kernel):
        def call():
            with use_forward(forward, kernel):
                return fn()
        return call
    return {name: run(*FORWARDS[name]) for name in names}


def row(label: str, t: dict[str, dict[str, float]]) -> str:
    ours, ref = t["ours"], t["grid_sample"]
    text = (f"{label:<38} wall {ours['wall']:8.1f} vs {ref['wall']:8.1f} ms x{ref['wall'] / ours['wall']:5.2f}  "
            f"cpu {ours['cpu']:8.1f} vs {ref['cpu']:8.1f} ms x{ref['cpu'] / ours['cpu']:5.2f}")
    if "compiled" in t:  # our optional compiled kernel
        text += f"  compiled {t['compiled']['wall']:8.1f} ms x{ref['wall'] / t['compiled']['wall']:5.2f}"
    if "torchvision" in t:  # torchvision's compiled DCNv2 operator, used as DCNv3's sampling
        text += f"  torchvision {t['torchvision']['wall']:8.1f} ms x{t['torchvision']['wall'] / ours['wall']:5.2f}"
    if "shared" in t:  # the best a layer could gain with sampling for free
        text += f"  bound x{ref['wall'] / t['shared']['wall']:5.2f}"
    return text


def add(total: dict, t: dict, times: int) -> None:
    for name in t:
        for kind in ("wall", "cpu"):
            total[name][kind] += t[name][kind] * times


def benchmark_model(smoke: bool) -> torch.nn.Module:
    """UPerNet InternImage-T (with `smoke`, a tiny one) with random offsets and masks: trained models
    have them; the init is all zeros and uniform."""
    small = {"channels": 16, "aux_channels": 8, "backbone_args": {"channels": 8, "depths": (1, 1, 1, 1), "groups": (1, 2, 2, 4)}}
    torch.manual_seed(0)
    model = upernet.build_model("upernet_internimage_t", **(small if smoke else {})).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, dcnv3_module.DCNv3):
                module.offset.weight.normal_(0, 0.1)
                module.mask.weight.normal_(0, 0.1)
    return model


def dcnv3_levels(model: torch.nn.Module, size: int) -> list[tuple[int, dcnv3_module.DCNv3, int]]:
    """(side, first DCNv3 layer, number of layers) of each backbone level for a `size` x `size` image."""
    return [(size // 4 // 2**i, level.blocks[0].dcn, len(level.blocks)) for i, level in enumerate(model.backbone.levels)]


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
    model = benchmark_model(args.smoke)
    backbone = model.backbone
    names = [n for n in FORWARDS if n != "compiled" or compiled_available()]
    print(f"DCNv3: ours (gather + embedding_bag) vs straightforward (grid_sample); InternImage-T, {size}x{size}, "
          f"{torch.get_num_threads()} threads, median of {reps}; x = straightforward / ours (or / compiled)")
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        model.to(dtype)
        name = str(dtype)[6:]
        ops = {n: {"wall": 0.0, "cpu": 0.0} for n in (*names, "torchvision")}
        layers = {n: {"wall": 0.0, "cpu": 0.0} for n in (*names, "shared")}
        with torch.no_grad():
            for side, layer, depth in dcnv3_levels(model, size):
                channels, groups = layer.channels, layer.group
                x = torch.randn(1, side, side, channels, dtype=dtype)
                offset = torch.randn(1, side, side, groups * 18, dtype=dtype)
                mask = torch.randn(1, side, side, groups, 9).softmax(-1).to(dtype).view(1, side, side, -1)
                cores = {"ours": lambda: dcnv3_ops.dcnv3_core(x, offset, mask, 3, groups),
                         "compiled": lambda: compiled_core(x, offset, mask, 3, groups),
                         "grid_sample": lambda: straightforward_core(x, offset, mask, 3, groups),
                         "torchvision": lambda: torchvision_core(x, offset, mask, 3, groups)}
                t = compare({n: f for n, f in cores.items() if n in names or n == "torchvision"}, reps)
                print(row(f"{name} sampling op {side}x{side}x{channels}", t))
                add(ops, t, depth)
                t = compare({**under_each_forward(lambda: layer(x), names), "shared": lambda: shared_forward(layer, x)}, reps)
                outputs = {n: f().float() for n, f in under_each_forward(lambda: layer(x), names).items()}
                diffs = "  ".join(f"{n} vs grid_sample max diff {(outputs[n] - outputs['grid_sample']).abs().max():.1e}"
                                  for n in names if n != "grid_sample")
                print(row(f"{name} DCNv3 layer {side}x{side}x{channels}", t) + "  " + diffs)
                add(layers, t, depth)
            print(row(f"{name} sampling op, all {sum(backbone.depths)} layers", ops))
            print(row(f"{name} DCNv3 layer, all {sum(backbone.depths)} layers", layers))
            images = torch.randn(1, 3, size, size, dtype=dtype)
            print(row(f"{name} UPerNet InternImage-T forward", compare(under_each_forward(lambda: model(images), names),
                                                                           reps)))


if __name__ == "__main__":
    main()
