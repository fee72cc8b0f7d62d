// DCNv3's deformable sampling on CPU in one pass: an optional path of upernet (the default is the
// plain-PyTorch one in dcnv3.py). Built at run time by torch.utils.cpp_extension; see
// `set_dcnv3_kernel` in dcnv3.py. Inference only (no autograd).
//
// Same arithmetic as the plain path: a float32 table with a zero border (1 pixel before, 2 after),
// positions clamped to it so that every bilinear corner is inside, softmax over the K points of a
// group, float32 sums. The speed comes from doing it per output pixel in registers and L1 cache,
// with the per-point work vectorised across the groups x K points of the pixel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// exp(x) for x <= 0 in plain arithmetic that compilers vectorise (std::exp is a scalar call unless
// -ffast-math): x = n ln2 + r with n the nearest integer, exp(r) by Cephes' polynomial, 2^n written
// into the exponent bits. Relative error ~1e-7. Below -87 it returns exp(-87) (a softmax term
// smaller than 1e-37 of the top one); NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float finite = x > -87.f ? x : -87.f;  // NaN -> -87: no int conversion of NaN
  const int32_t n = (int32_t)(finite * 1.44269504f - 0.5f);  // truncation of a value <= 0 is its ceil
  const float r = (x - (float)n * 0.693359375f) + (float)n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * __builtin_bit_cast(float, (n + 127) << 23);
}

// Scratch of one pixel: per point (groups x K of them) its softmax weight, top-left corner's offset
// into the table and 4 corner weights (bilinear weight x softmax weight); one group's sums.
struct Points {
  std::vector<float> mask, w00, w01, w10, w11, sum;
  std::vector<int32_t> corner;
  Points(int64_t points, int64_t channels)
      : mask(points), w00(points), w01(points), w10(points), w11(points), sum(channels), corner(points) {}
};

// Constants of a call, the same for every pixel.
struct Geometry {
  std::vector<float> step_x, step_y;  // per point: kernel grid x offset scale, in pixels
  std::vector<int32_t> channel;       // per point: first channel of its group
  int64_t groups, k, gc, c, wp;
  float scale, x_max, y_max;
};

// One output pixel, all groups: `out` = sum over points of 4 corner weights x table rows. GC > 0
// fixes the channels per group at compile time (16 in every InternImage).
template <int GC, typename scalar_t>
void sample_pixel(const float* __restrict table, const scalar_t* __restrict off_x, const scalar_t* __restrict off_y,
                  const scalar_t* __restrict logits, scalar_t* __restrict out, Points& pts, const Geometry& geo,
                  float x_base, float y_base) {
  const int64_t groups = geo.groups, k = geo.k, gk = groups * k, gc = GC > 0 ? GC : geo.gc, c = geo.c, wp = geo.wp;
  const float scale = geo.scale, x_max = geo.x_max, y_max = geo.y_max;
  const float *__restrict step_x = geo.step_x.data(), *__restrict step_y = geo.step_y.data();
  const int32_t* __restrict channel = geo.channel.data();
  float* __restrict mask = pts.mask.data();
  float *__restrict w00 = pts.w00.data(), *__restrict w01 = pts.w01.data();
  float *__restrict w10 = pts.w10.data(), *__restrict w11 = pts.w11.data();
  int32_t* __restrict corner = pts.corner.data();

  for (int64_t g = 0; g < groups; ++g) {  // softmax over the K points of each group
    const scalar_t* lg = logits + g * k;
    float top = lg[0];
    for (int64_t p = 1; p < k; ++p) top = std::max(top, (float)lg[p]);
    for (int64_t p = 0; p < k; ++p) mask[g * k + p] = (float)lg[p] - top;
  }
#pragma omp simd
  for (int64_t i = 0; i < gk; ++i) mask[i] = exp_nonpositive(mask[i]);
  for (int64_t g = 0; g < groups; ++g) {
    float total = 0.f;
    for (int64_t p = 0; p < k; ++p) total += mask[g * k + p];
    const float inv = 1.f / total;
    for (int64_t p = 0; p < k; ++p) mask[g * k + p] *= inv;
  }
#pragma omp simd
  for (int64_t i = 0; i < gk; ++i) {  // positions in the bordered table, corners, weights
    const float ux = x_base + step_x[i] + (float)off_x[i] * scale, uy = y_base + step_y[i] + (float)off_y[i] * scale;
    float px = ux > 0.f ? ux : 0.f, py = uy > 0.f ? uy : 0.f;  // a NaN offset reads pixel 0 ...
    px = px < x_max ? px : x_max;
    py = py < y_max ? py : y_max;
    const float m = ux == ux && uy == uy ? mask[i] : ux + uy;  // ... with a NaN weight, as the plain path
    const int32_t ix = (int32_t)px, iy = (int32_t)py;  // floor: px, py >= 0
    const float fx = px - (float)ix, fy = py - (float)iy;
    const float wy1 = fy * m, wy0 = m - wy1;
    w01[i] = wy0 * fx;
    w11[i] = wy1 * fx;
    w00[i] = wy0 - w01[i];
    w10[i] = wy1 - w11[i];
    corner[i] = (iy * (int32_t)wp + ix) * (int32_t)c + channel[i];
  }
  for (int64_t g = 0; g < groups; ++g) {  // the gathers
    float acc[GC > 0 ? GC : 1];  // in registers when the size is known
    float* __restrict sum = GC > 0 ? acc : pts.sum.data();
    for (int64_t q = 0; q < gc; ++q) sum[q] = 0.f;
    for (int64_t i = g * k; i < (g + 1) * k; ++i) {
      const float* t00 = table + corner[i];
      const float *t01 = t00 + c, *t10 = t00 + wp * c, *t11 = t10 + c;
      const float a = w00[i], b = w01[i], d = w10[i], e = w11[i];
#pragma omp simd
      for (int64_t q = 0; q < gc; ++q) sum[q] += a * t00[q] + b * t01[q] + d * t10[q] + e * t11[q];
    }
    for (int64_t q = 0; q < gc; ++q) out[g * gc + q] = (scalar_t)sum[q];
  }
}

template <typename scalar_t>
void sample_all(const float* table, const scalar_t* offset_x, const scalar_t* offset_y, const scalar_t* logits,
                scalar_t* out, const Geometry& geo, int64_t n, int64_t rows, int64_t w_out, int64_t hp,
                int64_t first_row, int64_t stride, int64_t shift) {
  const int64_t gk = geo.groups * geo.k;
  at::parallel_for(0, n * rows * w_out, 16, [&](int64_t begin, int64_t end) {
    Points pts(gk, geo.gc);  // once per chunk
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t b = pixel / (rows * w_out), i = first_row + (pixel / w_out) % rows, j = pixel % w_out;
      const float x_base = (float)(j * stride + shift), y_base = (float)(i * stride + shift);
      const float* tb = table + b * hp * geo.wp * geo.c;
      const scalar_t *ox = offset_x + pixel * gk, *oy = offset_y + pixel * gk, *lp = logits + pixel * gk;
      if (geo.gc == 16)
        sample_pixel<16>(tb, ox, oy, lp, out + pixel * geo.c, pts, geo, x_base, y_base);
      else
        sample_pixel<0>(tb, ox, oy, lp, out + pixel * geo.c, pts, geo, x_base, y_base);
    }
  });
}

}  // namespace

// table: (N, H + 3, W + 3, C) float32, the projected input with a zero border of 1 pixel before and
// 2 after. offset_x, offset_y, logits: (N, R, Wo, G * K), the offsets and mask logits (before their
// softmax) of output rows first_row ... first_row + R - 1, laid out [group][point]; float32 or
// bfloat16, all three alike. Returns the sampled rows, (N, R, Wo, C), in their dtype.
torch::Tensor dcnv3_sample(torch::Tensor table, torch::Tensor offset_x, torch::Tensor offset_y, torch::Tensor logits,
                           int64_t groups, int64_t kernel, double scale, int64_t stride, int64_t pad,
                           int64_t dilation, int64_t first_row) {
  const std::vector<torch::Tensor> per_point{offset_x, offset_y, logits};
  TORCH_CHECK(table.device().is_cpu() && table.dtype() == torch::kFloat32 && table.dim() == 4 && table.is_contiguous(),
              "dcnv3_sample: the table must be a contiguous 4-d float32 CPU tensor");
  for (const auto& t : per_point)
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous() && t.sizes() == logits.sizes() &&
                t.dtype() == logits.dtype() && (t.dtype() == torch::kFloat32 || t.dtype() == torch::kBFloat16),
                "dcnv3_sample: offset_x, offset_y and logits must be contiguous 4-d CPU tensors of one shape and "
                "one dtype, float32 or bfloat16");
  const int64_t n = logits.size(0), rows = logits.size(1), w_out = logits.size(2), k = kernel * kernel;
  const int64_t hp = table.size(1), wp = table.size(2), c = table.size(3);
  const int64_t half = (dilation * (kernel - 1)) / 2;
  TORCH_CHECK(groups > 0 && c % groups == 0 && table.size(0) == n && logits.size(3) == groups * k,
              "dcnv3_sample: table and offset/logits shapes do not match groups and kernel");
  TORCH_CHECK(hp * wp * c < (int64_t(1) << 31), "dcnv3_sample: map too large for int32 indices");
  Geometry geo{std::vector<float>(groups * k), std::vector<float>(groups * k), std::vector<int32_t>(groups * k),
               groups, k, c / groups, c, wp, (float)scale, (float)(wp - 2), (float)(hp - 2)};
  for (int64_t i = 0; i < groups * k; ++i) {  // point p = ix * kernel + iy: x outer, the reference's order
    const int64_t p = i % k;
    geo.step_x[i] = (float)((p / kernel) * dilation - half) * (float)scale;
    geo.step_y[i] = (float)((p % kernel) * dilation - half) * (float)scale;
    geo.channel[i] = (int32_t)((i / k) * geo.gc);
  }
  auto out = torch::empty({n, rows, w_out, c}, logits.options());
  const int64_t shift = half - pad + 1;  // kernel centre of output (0, 0) in the bordered table
  if (logits.dtype() == torch::kFloat32)
    sample_all(table.data_ptr<float>(), offset_x.data_ptr<float>(), offset_y.data_ptr<float>(),
               logits.data_ptr<float>(), out.data_ptr<float>(), geo, n, rows, w_out, hp, first_row, stride, shift);
  else
    sample_all(table.data_ptr<float>(), offset_x.data_ptr<c10::BFloat16>(), offset_y.data_ptr<c10::BFloat16>(),
               logits.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), geo, n, rows, w_out, hp, first_row,
               stride, shift);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dcnv3_sample", &dcnv3_sample, "DCNv3 sampling (softmax of the mask included), CPU, inference");
}
