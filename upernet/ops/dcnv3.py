"""DCNv3's deformable sampling (InternImage's deformable convolution) in plain PyTorch: CPU, CUDA and
ONNX, no extension; and its optional compiled CPU kernel.

The algorithm is the reference one (InternImage `ops_dcnv3`): every output pixel of every group
reads `K = k * k` points of the projected input at `reference + (grid + learned offset) * offset_scale`
(in pixels), by bilinear interpolation with zero padding (`align_corners=False` semantics), and sums
them with softmax-normalised weights ("mask") over the K points of its group.

How we compute it. The straightforward formulation (the reference's `dcnv3_core_pytorch`) calls
`grid_sample` on a (N * groups, C / groups, H, W) copy of the input, materialises a
(N * groups, C / groups, H * W, K) tensor of samples, multiplies by the mask and sums: two big
permutes and a K-times larger intermediate. Here each output pixel and group is a weighted sum of
4 * K rows of the channels-last input seen as a table of (N * H * W * groups) rows of C / groups
values. We compute the 4 * K row indices and weights (bilinear weight x mask, 0 outside the image)
and let `F.embedding_bag(mode="sum", per_sample_weights=...)` do the gather and the weighted sum
in one pass, straight into the channels-last output: no permute, no intermediate. Gradients flow to
the input (through the table) and to offsets and mask (through the weights), exactly as through
`grid_sample`. Under ONNX export the same indices and weights are reduced with Gather + MatMul,
standard operators every runtime has. On CPU without autograd, `DCNv3` runs band by band so that
the memory-bound elementwise work stays in the CPU caches (`DeformableSampling`).

Optionally (`set_dcnv3_kernel("compiled")`), CPU inference runs the sampling as one compiled C++
pass instead (`dcnv3_cpu.cpp`, built on first use): same arithmetic, several times faster.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .scratch import padded_scratch


def _sampling_grid(
    h_out: int, w_out: int, kernel_size: int, stride: int, pad: int, dilation: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y positions (Ho, Wo, 1, K) of the kernel points, in padded-map pixels.

    The reference enumerates points with x outer and y inner (point p = ix * k + iy); offsets and
    mask channels of official checkpoints follow that order. It places the kernel centre of output
    (i, j) at (j * stride + half - pad, i * stride + half - pad) with half = dilation * (k - 1) // 2,
    and `offset_scale` scales the kernel points around that centre; +1 for our 1-pixel zero border.
    """
    half = (dilation * (kernel_size - 1)) // 2
    steps = (torch.arange(kernel_size, dtype=torch.float32) * dilation - half) * scale
    xs = torch.arange(w_out, dtype=torch.float32) * stride + (half - pad + 1)
    ys = torch.arange(h_out, dtype=torch.float32) * stride + (half - pad + 1)
    grid_x = xs.view(1, w_out, 1, 1) + steps.repeat_interleave(kernel_size)  # x outer
    grid_y = ys.view(h_out, 1, 1, 1) + steps.repeat(kernel_size)  # y inner
    return grid_x.to(device), grid_y.to(device)


_CONSTANTS: dict = {}


def _constants(h_out, w_out, groups, kernel_size, stride, pad, dilation, scale, dtype, index_dtype, device):
    """Regular sampling grid x and y, (Ho, Wo, G, K), and the group of each point, (G, K).

    Full-size and contiguous on purpose: broadcasting over a 9-long innermost dimension makes
    PyTorch's CPU elementwise kernels several times slower. Cached per shape (a few MB at most).
    """
    key = (h_out, w_out, groups, kernel_size, stride, pad, dilation, scale, dtype, index_dtype, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        grid_x, grid_y = _sampling_grid(h_out, w_out, kernel_size, stride, pad, dilation, scale, torch.device("cpu"))
        k = kernel_size * kernel_size
        full = (h_out, w_out, groups, k)
        group = torch.arange(groups).view(groups, 1).expand(groups, k)
        hit = tuple(t.to(dtype).expand(full).contiguous().to(device) for t in (grid_x, grid_y))
        hit += (group.to(index_dtype).contiguous().to(device),)
        if len(_CONSTANTS) >= 32:
            _CONSTANTS.pop(next(iter(_CONSTANTS)))
        _CONSTANTS[key] = hit
    return hit


_WORKSPACE_BYTES = 2**25  # larger tables are not kept (memory held between calls)
_BAND_POINTS = 2**16  # sampling points per band on CPU (x 4 bytes per intermediate)
_BAND_PIXELS = 1024  # and at least as many pixels, for efficient matrix products
_BANDED_DEVICES = ("cpu",)  # elsewhere (CUDA) many small kernels would cost more than they save


def _padded(x: torch.Tensor, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
    """`x` (N, H, W, C) as `dtype` with a zero border: 1 pixel before and 2 after in H and W.

    With `reuse` (CPU, nothing saved for backward), in a buffer reused between calls: a fresh
    multi-MB buffer costs more than the copy (it is zero-filled, and the allocator often hands back
    memory the OS must map again).
    """
    n, h, w, c = x.shape
    if not reuse or n * (h + 3) * (w + 3) * c * dtype.itemsize > _WORKSPACE_BYTES:
        return F.pad(x.to(dtype), (0, 0, 1, 2, 1, 2))
    return padded_scratch("dcnv3 table", x, (1, 2), (1, 2), dtype)


class DeformableSampling:
    """The deformable sampling of one input `x` (N, H, W, C), computed band by band.

    What does not depend on the band (the zero-padded table, the regular grid) is set up once;
    `bands()` lists the bands and `sample()` computes one from its offsets and mask. On CPU without
    autograd, a band is a few output rows of one image, small enough for every intermediate to stay
    in the CPU caches (the work is memory-bound: a whole 128x128 map makes 2.4 MB per intermediate)
    and computed in place where possible. Otherwise (autograd, CUDA, ONNX export) there is one band,
    the whole batch, and no operation overwrites a value autograd needs. Same arithmetic either way.
    """

    def __init__(self, x, out_size, groups, kernel_size, offset_scale, stride, pad, dilation, offset_dtype, grad):
        n, h, w, c = x.shape
        h_out, w_out = out_size
        if c % groups:
            raise ValueError(f"DCNv3: {c} channels are not divisible by {groups} groups")
        self.n, self.h, self.w, self.c, self.h_out, self.w_out = n, h, w, c, h_out, w_out
        self.groups, self.k, self.offset_scale, self.dtype = groups, kernel_size * kernel_size, offset_scale, x.dtype
        self.kernel_size, self.stride, self.pad, self.dilation = kernel_size, stride, pad, dilation
        self.exporting = torch.onnx.is_in_onnx_export()
        self.inplace = not grad
        banded = not grad and not self.exporting and x.device.type in _BANDED_DEVICES
        # Zero padding made explicit: 1 pixel before and 2 after each side. Positions clamped to
        # [-1, size] then have all 4 bilinear corners inside the padded map, so no corner needs a
        # validity test, and clamping changes nothing (beyond one pixel outside, every corner is
        # zero). The table is float32 at least: bfloat16 gathers are not faster on CPU, and the sums
        # are more exact. Seen as (rows, C / G): the row of (y, x, g) is (y * Wp + x) * G + g.
        hp, wp = h + 3, w + 3
        self.table = _padded(x, torch.promote_types(x.dtype, torch.float32), reuse=banded)
        self.table = self.table.view(n, hp * wp * groups, c // groups)
        self.index_dtype = torch.int32 if n * hp * wp * groups < 2**31 else torch.int64
        # Positions in float32 at least (bf16 would put them on a 0.5-pixel raster at 128 pixels).
        self.real = torch.promote_types(offset_dtype, self.table.dtype)
        self.grid_x, self.grid_y, group = _constants(h_out, w_out, groups, kernel_size, stride, pad, dilation,
                                                     offset_scale, self.real, self.index_dtype, x.device)
        if banded:
            bands = max(1, min(h_out * w_out * groups * self.k // _BAND_POINTS, h_out * w_out // _BAND_PIXELS))
            self.band = -(-h_out // bands)
            self.first_row = group  # per image: table[i], rows from (G, K)
        else:
            self.band = None
            image = torch.arange(n, device=x.device, dtype=self.index_dtype).view(n, 1, 1, 1, 1) * (hp * wp * groups)
            self.first_row = image + group  # (N, 1, 1, G, K): the whole batch in one table
            self.table = self.table.view(n * hp * wp * groups, c // groups)

    def bands(self):
        """Indices of the bands into (N, H_out, W_out, ...) tensors: (image, rows) or the whole batch."""
        if self.band is None:
            yield (slice(None),)
            return
        for i in range(self.n):
            for top in range(0, self.h_out, self.band):
                yield i, slice(top, min(top + self.band, self.h_out))

    def sample(self, index, offset_x, offset_y, mask, mask_logits=False, out=None):
        """The band's output, (bags, C / G) in float32 at least (into `out` if given): bags = its
        pixels x groups. `offset_x`, `offset_y` and `mask` are the band's (..., W_out, G, K) values,
        the mask normalised or, with `mask_logits`, its logits (the softmax is computed here)."""
        inplace, groups, k, wp = self.inplace, self.groups, self.k, self.w + 3
        grid = index[-1]
        table = self.table if self.band is None else self.table[index[0]]
        # Sampling positions in padded-map pixels: regular grid + offset_scale * (kernel point +
        # learned offset), the kernel points being in the grid already.
        px = torch.add(self.grid_x[grid], offset_x, alpha=self.offset_scale).clamp_(0.0, self.w + 1.0)
        py = torch.add(self.grid_y[grid], offset_y, alpha=self.offset_scale).clamp_(0.0, self.h + 1.0)
        x0, y0 = px.floor(), py.floor()
        fx, fy = px.sub_(x0), py.sub_(y0)  # fractional parts: px and py are not needed any more
        # Top-left corner's row; y * Wp + x is exact in float32 (below 2**24 pixels per map), int32
        # rows halve the index traffic.
        rows = torch.add(self.first_row, x0.add_(y0, alpha=wp).to(self.index_dtype), alpha=groups).view(-1, k)

        mask = mask.to(self.real)
        if mask_logits:  # softmax over the K points, written out: PyTorch's kernel is slow on 9 values
            mask = torch.sub(mask, mask.amax(dim=-1, keepdim=True))
            mask = mask.exp_() if inplace else mask.exp()
            total = mask.sum(dim=-1, keepdim=True)
            mask = mask.div_(total) if inplace else mask / total

        # Bilinear weight x mask of the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1).
        wy1 = torch.mul(fy, mask)
        wy0 = torch.sub(mask, wy1)
        w01, w11 = wy0 * fx, wy1 * fx
        w00 = wy0.sub_(w01) if inplace else wy0 - w01
        w10 = wy1.sub_(w11) if inplace else wy1 - w11

        # One gather per corner: each output row is the weighted sum of K table rows (a "bag"). The
        # other corners are the same rows of the table shifted by 1 pixel, 1 row or both: a view.
        # In place is safe: the gathers' backward ignores their outputs.
        corners = ((0, w00), (groups, w01), (wp * groups, w10), ((wp + 1) * groups, w11))
        result = None
        for j, (shift, weight) in enumerate(corners):
            weight = weight.view(rows.shape)
            if self.exporting:
                part = torch.matmul(weight.unsqueeze(1), table[shift:][rows]).squeeze(1)
            else:
                part = F.embedding_bag(rows, table[shift:], mode="sum", per_sample_weights=weight)
            if result is None:
                result = part
            elif out is not None and j == len(corners) - 1:
                result = torch.add(result, part, out=out)
            else:
                result = result.add_(part)
        return result

    def sample_from_logits(self, index, offset_x, offset_y, logits):
        """`sample(..., mask_logits=True)` of one band, by the kernel `set_dcnv3_kernel` chose where it
        applies (the compiled one: CPU inference in float32 or bfloat16), else by PyTorch."""
        if _kernel == "compiled" and self.band is not None and self.dtype in (torch.float32, torch.bfloat16):
            return self.sample_compiled(index, offset_x, offset_y, logits)
        return self.sample(index, offset_x, offset_y, logits, mask_logits=True)

    def sample_compiled(self, index, offset_x, offset_y, logits):
        """`sample(index, offset_x, offset_y, logits, mask_logits=True)` by the compiled kernel, as
        (rows, W_out, C) in the dtype of the offsets (float32 or bfloat16). Banded CPU path only."""
        image, rows = index
        per_point = (t.reshape(1, *t.shape[:-2], -1) for t in (offset_x, offset_y, logits))
        table = self.table[image].view(1, self.h + 3, self.w + 3, self.c)
        return compiled_kernel().dcnv3_sample(table, *per_point, self.groups, self.kernel_size, self.offset_scale,
                                              self.stride, self.pad, self.dilation, rows.start)[0]


def dcnv3_core(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size: int,
    groups: int,
    offset_scale: float = 1.0,
    stride: int = 1,
    pad: int | None = None,
    dilation: int = 1,
) -> torch.Tensor:
    """Deformable sampling and weighted sum of DCNv3.

    Args:
        x: projected input, (N, H, W, C) channels-last.
        offset: (N, H_out, W_out, groups * K * 2), laid out [group][point][x, y], in pixels.
        mask: (N, H_out, W_out, groups * K), already softmax-normalised over the K points of a group.
        kernel_size: k, with K = k * k sampling points.
        groups: number of groups; each reads its own C / groups channels.
        offset_scale: multiplies both the regular kernel grid and the learned offsets.
        stride: stride of the output grid.
        pad: implicit zero padding; default (dilation * (k - 1)) // 2 keeps the size at stride 1.
        dilation: spacing of the regular kernel grid.

    Returns:
        (N, H_out, W_out, C) in the dtype of `x`.
    """
    n, h_out, w_out, _ = offset.shape
    k = kernel_size * kernel_size
    if offset.shape[-1] != groups * k * 2 or mask.shape[-1] != groups * k:
        raise ValueError(f"DCNv3: offset/mask have {offset.shape[-1]}/{mask.shape[-1]} channels, expected "
                         f"{groups * k * 2}/{groups * k} for {groups} groups and kernel {kernel_size}")
    pad = (dilation * (kernel_size - 1)) // 2 if pad is None else pad
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, offset, mask))
    sampling = DeformableSampling(x, (h_out, w_out), groups, kernel_size, offset_scale, stride, pad, dilation,
                         torch.promote_types(offset.dtype, mask.dtype), grad)
    offset = offset.view(n, h_out, w_out, groups, k, 2)
    mask = mask.view(n, h_out, w_out, groups, k)
    out = None if grad else x.new_empty(n, h_out, w_out, x.shape[-1])
    parts = [sampling.sample(i, offset[i][..., 0], offset[i][..., 1], mask[i],
                             out=None if out is None else out[i].view(-1, x.shape[-1] // groups))
             for i in sampling.bands()]
    if out is not None:
        return out
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype).view(n, h_out, w_out, -1)


_KERNELS = ("torch", "compiled")
_kernel = "torch"


def set_dcnv3_kernel(name: str) -> None:
    """Choose how DCNv3 layers sample at CPU inference: "torch" (the default: plain PyTorch, nothing
    to build) or "compiled" (`dcnv3_cpu.cpp`, one pass per pixel, built here on first use by
    `torch.utils.cpp_extension`: needs a C++ compiler and the `ninja` package). Training (autograd),
    CUDA, ONNX export and dtypes other than float32/bfloat16 always take the plain path.
    """
    global _kernel
    if name not in _KERNELS:
        raise ValueError(f"DCNv3 kernel {name!r}: expected one of {', '.join(_KERNELS)}")
    if name == "compiled":
        compiled_kernel()  # a missing compiler fails here, not in the middle of a run
    _kernel = name


@functools.cache
def compiled_kernel():
    """The compiled CPU sampling extension (`dcnv3_cpu.cpp`), built once per source and torch
    version and cached by torch (in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load

    source = Path(__file__).with_name("dcnv3_cpu.cpp")
    if sys.platform == "win32":
        raise RuntimeError(f"DCNv3: the compiled kernel ({source}) needs GCC or Clang; use the default 'torch' kernel")
    # -fno-trapping-math lets the compiler vectorise the clamps and int conversions (no -ffast-math:
    # the arithmetic stays IEEE). -march=native: it is built for this CPU, so the build's name carries
    # the CPU's feature flags (a home folder shared by machines of several CPU types keeps one each).
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
    try:
        return load(f"upernet_dcnv3_cpu_{_cpu_fingerprint()}", [str(source)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"])
    except Exception as e:  # compiler or ninja missing, compile error
        raise RuntimeError(f"DCNv3: could not build the compiled kernel {source}: {e}. It needs a C++ compiler "
                           f"(g++ or clang) and `pip install ninja`; the default 'torch' kernel needs neither.") from e


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's model and feature flags (Linux's /proc/cpuinfo, else the platform)."""
    import hashlib
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "\n".join(sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))}))
    except OSError:
        text = platform.platform() + platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]
