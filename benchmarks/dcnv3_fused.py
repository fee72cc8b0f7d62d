"""Experiment: what a fused (compiled) DCNv3 sampling kernel would give on CPU. Not used by upernet.

Issue 4 asks for a DCNv3 layer at least 3x faster than the straightforward `grid_sample`
formulation and allows an optional compiled path only beside the plain-PyTorch default. Our plain
path is 7-8x faster on the float32 sampling but 2.4-2.7x on the whole layer; the rest of its cost
is some 25 eager passes over the sampling points. This script measures what one pass would give:
a small C++ kernel (softmax over the points, positions, bilinear weights and the 4-corner gathers
of one output pixel and group, all in registers), compiled at run time with
`torch.utils.cpp_extension.load_inline` (needs a C++ compiler and ninja; about 40 s the first time),
swapped into the same DCNv3 modules as `benchmarks/dcnv3.py` does with the baseline. Float32 only.

    python benchmarks/dcnv3_fused.py --threads 2 --reps 9
    python benchmarks/dcnv3_fused.py --smoke
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

import torch

from upernet.models.backbones import dcnv3 as dcnv3_module

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// One output pixel and group: sum over the K points of softmax(logits) x bilinear sample of the
// zero-bordered table (1 pixel before, 2 after, as upernet's plain path pads it), into `out`.
// GC > 0 fixes the channel count at compile time (InternImage's 16); 0 takes `gc`. `weights` holds K
// floats of scratch.
template <int GC>
static void pixel_group(const float* table, const float* off, const float* logits, float* out, float* weights,
                        int64_t k, int64_t kernel, float x_base, float y_base, int64_t dilation, int64_t half,
                        float scale, int64_t h, int64_t w, int64_t wp, int64_t c, int64_t gc) {
  const int64_t channels = GC > 0 ? GC : gc;
  float top = logits[0];
  for (int64_t p = 1; p < k; ++p) top = std::max(top, logits[p]);
  float total = 0.f;
  for (int64_t p = 0; p < k; ++p) total += (weights[p] = std::exp(logits[p] - top));
  for (int64_t q = 0; q < channels; ++q) out[q] = 0.f;
  for (int64_t p = 0; p < k; ++p) {
    const int64_t ix = p / kernel, iy = p % kernel;  // x outer, y inner: the reference's point order
    float px = x_base + (float)(ix * dilation - half) * scale + off[2 * p] * scale;
    float py = y_base + (float)(iy * dilation - half) * scale + off[2 * p + 1] * scale;
    px = std::min(std::max(px, 0.f), (float)(w + 1));
    py = std::min(std::max(py, 0.f), (float)(h + 1));
    const float x0 = std::floor(px), y0 = std::floor(py), fx = px - x0, fy = py - y0;
    const float m = weights[p] / total, wy1 = fy * m, wy0 = m - wy1;
    const float w01 = wy0 * fx, w11 = wy1 * fx, w00 = wy0 - w01, w10 = wy1 - w11;
    const float* t00 = table + ((int64_t)y0 * wp + (int64_t)x0) * c;
    const float *t01 = t00 + c, *t10 = t00 + wp * c, *t11 = t10 + c;
    for (int64_t q = 0; q < channels; ++q) out[q] += w00 * t00[q] + w01 * t01[q] + w10 * t10[q] + w11 * t11[q];
  }
}

torch::Tensor dcnv3_fused(torch::Tensor table, torch::Tensor offset, torch::Tensor logits, int64_t groups,
                          int64_t kernel, double scale, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t n = offset.size(0), h_out = offset.size(1), w_out = offset.size(2);
  const int64_t hp = table.size(1), wp = table.size(2), c = table.size(3), gc = c / groups, k = kernel * kernel;
  const int64_t h = hp - 3, w = wp - 3, half = (dilation * (kernel - 1)) / 2;
  auto out = torch::empty({n, h_out, w_out, c}, table.options());
  const float *t = table.data_ptr<float>(), *o = offset.data_ptr<float>(), *l = logits.data_ptr<float>();
  float* r = out.data_ptr<float>();
  at::parallel_for(0, n * h_out * w_out, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(k);  // once per chunk, not per pixel and group
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t b = pixel / (h_out * w_out), i = (pixel / w_out) % h_out, j = pixel % w_out;
      const float x_base = (float)(j * stride + half - pad + 1), y_base = (float)(i * stride + half - pad + 1);
      for (int64_t g = 0; g < groups; ++g) {
        const float* tg = t + b * hp * wp * c + g * gc;
        const float* og = o + (pixel * groups + g) * k * 2;
        const float* lg = l + (pixel * groups + g) * k;
        float* rg = r + pixel * c + g * gc;
        auto sample = gc == 16 ? pixel_group<16> : pixel_group<0>;
        sample(tg, og, lg, rg, weights.data(), k, kernel, x_base, y_base, dilation, half, (float)scale, h, w, wp, c, gc);
      }
    }
  });
  return out;
}
"""


@functools.cache
def kernel():
    """The compiled extension (built on first use, then cached by torch under ~/.cache)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("upernet_dcnv3_fused_experiment", cpp_sources=_SOURCE, functions=["dcnv3_fused"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])


def fused_forward(self: dcnv3_module.DCNv3, x: torch.Tensor) -> torch.Tensor:
    """DCNv3.forward with the sampling (softmax included) in one compiled pass; float32, no autograd."""
    if self.center_feature_scale:
        raise NotImplementedError("the experiment leaves out center_feature_scale (InternImage-H/G)")
    projected = self.input_proj(x)
    features = self.dw_conv(x.permute(0, 3, 1, 2))
    offset, logits = self.offset(features).contiguous(), self.mask(features).contiguous()
    table = dcnv3_module._padded(projected, torch.float32, reuse=True)  # zero border: 1 before, 2 after
    sampled = kernel().dcnv3_fused(table, offset, logits, self.group, self.kernel_size, self.offset_scale,
                                   self.stride, self.pad, self.dilation)
    return self.output_proj(sampled)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny input, reduced model, one repetition")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("bench_dcnv3", Path(__file__).with_name("dcnv3.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    size, reps = (64, 1) if args.smoke else (args.size, args.reps)
    levels = bench.dcnv3_levels(bench.benchmark_model(args.smoke), size)  # InternImage-T's, or a tiny one
    forwards = {"ours": dcnv3_module.DCNv3.forward, "grid_sample": bench.straightforward_forward,
                "fused": fused_forward}
    print(f"DCNv3 layer, float32, InternImage-T levels at {size}x{size}, {torch.get_num_threads()} threads, "
          f"median wall ms of {reps}; x = grid_sample / the other")
    total = dict.fromkeys(forwards, 0.0)
    torch.manual_seed(0)
    for side, layer, depth in levels:
        with torch.no_grad():
            x = torch.randn(1, side, side, layer.channels)
            diff = (fused_forward(layer, x) - layer(x)).abs().max().item()
            t = bench.compare({name: functools.partial(f, layer, x) for name, f in forwards.items()}, reps)
        for name in total:
            total[name] += t[name]["wall"] * depth
        base = t["grid_sample"]["wall"]
        print(f"{side}x{side}x{layer.channels:<4} ours {t['ours']['wall']:7.2f} x{base / t['ours']['wall']:5.2f}  "
              f"fused {t['fused']['wall']:7.2f} x{base / t['fused']['wall']:5.2f}  grid_sample {base:7.2f}  "
              f"fused vs ours max diff {diff:.1e}")
    base = total["grid_sample"]
    print(f"all {sum(depth for *_, depth in levels)} layers   ours {total['ours']:7.1f} x{base / total['ours']:5.2f}  "
          f"fused {total['fused']:7.1f} x{base / total['fused']:5.2f}  grid_sample {base:7.1f}")


if __name__ == "__main__":
    main()
