"""DCNv3: our vectorised sampling against a deliberately naive one, gradients, module semantics."""
import math

import pytest
import torch
import torch.nn.functional as F

from upernet.models.backbones.dcnv3 import DCNv3
from upernet.ops import dcnv3
from upernet.ops.dcnv3 import dcnv3_core


def naive_dcnv3_core(x, offset, mask, kernel_size, groups, offset_scale, pad, dilation=1, stride=1):
    """The reference algorithm written out point by point, in the reference's own terms.

    The reference pads the input, normalises the sampling location by the padded size and calls
    grid_sample(align_corners=False); here that location is turned back into padded-pixel coordinates
    (loc * size - 0.5) and interpolated by hand, reading zeros outside the padded map.
    """
    n, h, w, c = x.shape
    gc = c // groups
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    h_out = (hp - (dilation * (kernel_size - 1) + 1)) // stride + 1
    w_out = (wp - (dilation * (kernel_size - 1) + 1)) // stride + 1
    half = (dilation * (kernel_size - 1)) // 2
    out = torch.zeros(n, h_out, w_out, c, dtype=x.dtype)

    def pixel(b, yy, xx, g):
        if 0 <= yy < hp and 0 <= xx < wp:
            return padded[b, yy, xx, g * gc:(g + 1) * gc]
        return torch.zeros(gc, dtype=x.dtype)

    for b in range(n):
        for i in range(h_out):
            for j in range(w_out):
                ref_x = (half + 0.5 + j * stride) / wp  # normalised reference point (pixel centre)
                ref_y = (half + 0.5 + i * stride) / hp
                for g in range(groups):
                    acc = torch.zeros(gc, dtype=x.dtype)
                    p = 0
                    for ix in range(kernel_size):  # x outer, y inner: the reference's point order
                        for iy in range(kernel_size):
                            grid_x = (-half + ix * dilation) / wp
                            grid_y = (-half + iy * dilation) / hp
                            base = (g * kernel_size * kernel_size + p) * 2
                            loc_x = ref_x + grid_x * offset_scale + offset[b, i, j, base] * offset_scale / wp
                            loc_y = ref_y + grid_y * offset_scale + offset[b, i, j, base + 1] * offset_scale / hp
                            sx, sy = loc_x * wp - 0.5, loc_y * hp - 0.5
                            x0, y0 = math.floor(sx), math.floor(sy)
                            ax, ay = sx - x0, sy - y0
                            value = ((1 - ax) * (1 - ay) * pixel(b, y0, x0, g) + ax * (1 - ay) * pixel(b, y0, x0 + 1, g)
                                     + (1 - ax) * ay * pixel(b, y0 + 1, x0, g) + ax * ay * pixel(b, y0 + 1, x0 + 1, g))
                            acc = acc + mask[b, i, j, g * kernel_size * kernel_size + p] * value
                            p += 1
                    out[b, i, j, g * gc:(g + 1) * gc] = acc
    return out


def random_inputs(n, h, w, groups, group_channels, kernel_size, dtype=torch.float32, spread=2.0):
    k = kernel_size * kernel_size
    x = torch.randn(n, h, w, groups * group_channels, dtype=dtype)
    offset = torch.randn(n, h, w, groups * k * 2, dtype=dtype) * spread  # reaches outside the map
    mask = torch.randn(n, h, w, groups, k, dtype=dtype).softmax(-1).reshape(n, h, w, groups * k)
    return x, offset, mask


@pytest.mark.parametrize(
    "n,h,w,groups,group_channels,kernel_size,offset_scale",
    [
        (2, 5, 7, 3, 2, 3, 1.0),  # non-square, 3 groups
        (1, 6, 4, 2, 3, 3, 2.0),  # offset_scale 2 (InternImage-L/XL)
        (1, 5, 6, 4, 1, 5, 1.0),  # kernel 5, 4 groups
        (1, 4, 5, 1, 4, 5, 2.0),
    ],
)
def test_matches_naive_reference(n, h, w, groups, group_channels, kernel_size, offset_scale):
    torch.manual_seed(0)
    x, offset, mask = random_inputs(n, h, w, groups, group_channels, kernel_size)
    pad = (kernel_size - 1) // 2
    ours = dcnv3_core(x, offset, mask, kernel_size, groups, offset_scale)
    naive = naive_dcnv3_core(x, offset, mask, kernel_size, groups, offset_scale, pad)
    assert ours.shape == naive.shape == x.shape
    assert (ours - naive).abs().max().item() <= 1e-5


def test_far_offsets_read_zero_padding():
    """Points far outside the map contribute nothing; points on integer pixels read them exactly."""
    x, offset, mask = random_inputs(1, 4, 4, 1, 3, 3)
    far = dcnv3_core(x, torch.full_like(offset, 1e4), mask, 3, 1)
    assert far.abs().max().item() == 0.0
    # Zero offsets and all mask weight on the centre point (index 4) give back the input exactly.
    centre = torch.zeros_like(mask)
    centre[..., 4] = 1.0
    assert torch.equal(dcnv3_core(x, torch.zeros_like(offset), centre, 3, 1), x)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x, offset, mask = random_inputs(1, 3, 4, 2, 2, 3, dtype=torch.float64, spread=1.3)
    offset = offset + 0.05  # keep sampling points off integer pixels, where bilinear has kinks
    inputs = tuple(t.clone().requires_grad_() for t in (x, offset, mask))
    assert torch.autograd.gradcheck(lambda a, b, c: dcnv3_core(a, b, c, 3, 2, 2.0), inputs, eps=1e-6, atol=1e-5)


def test_module_uses_reference_parameters_and_init():
    module = DCNv3(channels=12, group=3, center_feature_scale=True)
    names = set(dict(module.named_parameters()))
    assert names == {
        "dw_conv.0.weight", "dw_conv.0.bias", "dw_conv.1.1.weight", "dw_conv.1.1.bias", "offset.weight", "offset.bias",
        "mask.weight", "mask.bias", "input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias",
        "center_feature_scale_proj_weight", "center_feature_scale_proj_bias",
    }
    assert module.offset.weight.abs().sum() == 0 and module.mask.weight.abs().sum() == 0
    assert module.offset.weight.shape == (3 * 9 * 2, 12) and module.mask.weight.shape == (3 * 9, 12)


@pytest.fixture
def small_bands(monkeypatch):
    """Bands of one or two output rows: the CPU inference path splits even tiny maps."""
    monkeypatch.setattr(dcnv3, "_BAND_POINTS", 1)
    monkeypatch.setattr(dcnv3, "_BAND_PIXELS", 1)


@pytest.mark.parametrize("banded", [True, False])
def test_bands_and_batch_match_naive_reference(small_bands, monkeypatch, banded):
    """Without autograd on CPU the sampling runs band by band per image, in place, from a reused
    padded buffer; on other devices (CUDA) in place over the whole batch: same values as the naive
    loop, for two different inputs in a row."""
    if not banded:
        monkeypatch.setattr(dcnv3, "_BANDED_DEVICES", ())
    torch.manual_seed(0)
    for _ in range(2):
        x, offset, mask = random_inputs(2, 5, 7, 3, 2, 3)
        with torch.no_grad():
            ours = dcnv3_core(x, offset, mask, 3, 3, 2.0)
        assert (ours - naive_dcnv3_core(x, offset, mask, 3, 3, 2.0, pad=1)).abs().max().item() <= 1e-5
    # The autograd path (one band: the whole batch, nothing in place) computes the same.
    inputs = [t.clone().requires_grad_() for t in (x, offset, mask)]
    assert (dcnv3_core(*inputs, 3, 3, 2.0) - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grad,banded,kernel", [
    (True, False, "torch"), (False, True, "torch"), (False, False, "torch"),
    # the compiled kernel is built on first use (a minute on 2 cores): slow, like every `compiled_dcnv3` test
    pytest.param(False, True, "compiled", marks=pytest.mark.slow),
    pytest.param(True, True, "compiled", marks=pytest.mark.slow)])
def test_module_forward_matches_its_definition(grad, banded, kernel, small_bands, monkeypatch, request):
    """Offsets/mask from the unprojected input (dwconv -> LN -> GELU -> Linear), softmax per group,
    sampling of the projected input, centre-feature gate, output projection; with autograd (one band)
    and without (band by band on CPU, the whole batch elsewhere; output projection straight into the
    output); with the optional compiled kernel (inference; with autograd it takes the plain path)."""
    if not banded:
        monkeypatch.setattr(dcnv3, "_BANDED_DEVICES", ())
    if kernel == "compiled":
        request.getfixturevalue("compiled_dcnv3")
        monkeypatch.setattr(dcnv3, "_kernel", "compiled")
    torch.manual_seed(0)
    module = DCNv3(channels=8, group=2, offset_scale=2.0, center_feature_scale=True).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 5, 6, 8)
    with torch.set_grad_enabled(grad):
        got = module(x)
    assert got.requires_grad == grad
    with torch.no_grad():
        feat = F.gelu(F.layer_norm(module.dw_conv[0](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), (8,),
                                   module.dw_conv[1][1].weight, module.dw_conv[1][1].bias, 1e-6))
        offset = module.offset(feat)
        mask = module.mask(feat).view(2, 5, 6, 2, 9).softmax(-1).view(2, 5, 6, 18)
        projected = module.input_proj(x)
        sampled = naive_dcnv3_core(projected, offset, mask, 3, 2, 2.0, pad=1)
        gate = torch.sigmoid(feat @ module.center_feature_scale_proj_weight.T + module.center_feature_scale_proj_bias)
        gate = gate.repeat_interleave(4, dim=-1)
        expected = module.output_proj(sampled * (1 - gate) + projected * gate)
        assert (got - expected).abs().max().item() <= 1e-5


def test_module_bfloat16_close_to_float32(small_bands):
    torch.manual_seed(0)
    module = DCNv3(channels=16, group=2).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.randn(1, 6, 7, 16)
        ours32 = module(x)
        ours16 = module.to(torch.bfloat16)(x.bfloat16())
    assert ours16.dtype == torch.bfloat16
    assert (ours16.float() - ours32).abs().max().item() < 0.1 * ours32.abs().max().item()


def test_bfloat16_close_to_float32():
    torch.manual_seed(0)
    x, offset, mask = (t.bfloat16() for t in random_inputs(1, 9, 11, 2, 8, 3))
    ours16 = dcnv3_core(x, offset, mask, 3, 2)
    ours32 = dcnv3_core(x.float(), offset.float(), mask.float(), 3, 2)
    assert ours16.dtype == torch.bfloat16
    assert (ours16.float() - ours32).abs().max().item() < 0.05


def test_bad_shapes_fail_early():
    x, offset, mask = random_inputs(1, 4, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="offset/mask"):
        dcnv3_core(x, offset, mask, 3, 4)
    with pytest.raises(ValueError, match="divisible"):
        DCNv3(channels=10, group=4)


def test_module_without_autograd_follows_parameter_changes():
    """Without autograd the de-interleaved offset projection is kept between calls: it must follow
    in-place updates (optimiser steps, load_state_dict) and dtype round trips of the parameters."""
    torch.manual_seed(0)
    module = DCNv3(channels=8, group=2).eval()
    x = torch.randn(1, 5, 6, 8)
    with torch.no_grad():
        module.offset.weight.normal_()
        first = module(x)
        module.offset.bias.normal_()
        module.offset.weight.mul_(2.0)
        second = module(x)
        reference = DCNv3(channels=8, group=2).eval()
        reference.load_state_dict(module.state_dict())
        assert (second - reference(x)).abs().max().item() <= 1e-6
        assert (second - first).abs().max().item() > 1e-3
        module.load_state_dict(DCNv3(channels=8, group=2).state_dict())
        module.to(torch.bfloat16).float()
        got = module(x)
    reference.load_state_dict(module.state_dict())
    expected = reference(x)  # with autograd: nothing kept between calls
    assert expected.requires_grad and (got - expected).abs().max().item() <= 1e-6


@pytest.fixture
def compiled(compiled_dcnv3, monkeypatch):
    """DCNv3 layers sample with the compiled kernel for this test."""
    monkeypatch.setattr(dcnv3, "_kernel", "compiled")
    return compiled_dcnv3


@pytest.mark.parametrize(
    "channels,group,kernel_size,offset_scale,dilation,center,shape",
    [
        (64, 4, 3, 1.0, 1, False, (2, 9, 13)),  # 16 channels per group (every InternImage): the specialised path
        (48, 8, 3, 2.0, 1, False, (1, 7, 5)),  # 6 per group (the generic path), offset_scale 2
        (32, 2, 5, 1.0, 1, True, (1, 6, 11)),  # kernel 5, centre-feature gate
        (32, 2, 3, 0.5, 2, False, (1, 8, 6)),  # dilation 2, a fractional offset_scale
        (16, 1, 3, 1.0, 1, False, (1, 1, 1)),  # a single pixel: every point but the centre in the border
    ],
)
def test_compiled_kernel_matches_plain_path(compiled, monkeypatch, channels, group, kernel_size, offset_scale,
                                            dilation, center, shape):
    """The optional compiled kernel computes what the plain path computes (which the tests above
    check against the naive loop): float32 within 1e-5, bfloat16 within one rounding step; offsets
    large enough to leave the map, mask logits far apart."""
    torch.manual_seed(0)
    layer = DCNv3(channels, kernel_size, group=group, offset_scale=offset_scale, dilation=dilation,
                  center_feature_scale=center).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        layer.offset.bias.normal_(0, 4.0)
        layer.mask.bias.normal_(0, 10.0)
        x = torch.randn(*shape, channels)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
            layer.to(dtype)
            monkeypatch.setattr(dcnv3, "_kernel", "compiled")
            got = layer(x.to(dtype))
            monkeypatch.setattr(dcnv3, "_kernel", "torch")
            expected = layer(x.to(dtype))
            assert got.dtype == dtype and got.shape == expected.shape
            scale = expected.float().abs().max().item()
            assert (got.float() - expected.float()).abs().max().item() <= tolerance * max(scale, 1.0)


def test_compiled_kernel_under_autocast_and_autograd(compiled):
    """Under bfloat16 autocast (offsets in bfloat16, the norm in float32) the compiled path matches
    the plain one; with autograd, and in float64, the plain path runs."""
    torch.manual_seed(0)
    layer = DCNv3(32, group=2).eval()
    with torch.no_grad():
        layer.offset.weight.normal_(0, 0.5)
        layer.mask.weight.normal_(0, 0.5)
    x = torch.randn(1, 6, 7, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        dcnv3._kernel = "torch"  # the fixture restores it
        expected = layer(x)
        dcnv3._kernel = "compiled"
    assert got.dtype == expected.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() <= 2**-7 * expected.float().abs().max().item()
    layer(x).sum().backward()
    assert layer.offset.weight.grad.abs().sum() > 0
    # float64 (the kernel computes in float32) takes the plain path too: bit-identical.
    layer.double()
    with torch.no_grad():
        got = layer(x.double())
        dcnv3._kernel = "torch"
        assert torch.equal(got, layer(x.double()))


def test_set_dcnv3_kernel_errors(monkeypatch):
    """An unknown name, and a kernel that cannot be built: both say what is wrong and what to do,
    and leave the default kernel in place."""
    monkeypatch.setattr(dcnv3, "_kernel", "torch")
    with pytest.raises(ValueError, match="expected one of torch, compiled"):
        dcnv3.set_dcnv3_kernel("triton")
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    dcnv3.compiled_kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"dcnv3_cpu\.cpp.*Ninja is required.*pip install ninja"):
            dcnv3.set_dcnv3_kernel("compiled")
    finally:
        dcnv3.compiled_kernel.cache_clear()  # the next use builds for real
    assert dcnv3._kernel == "torch"


def test_compiled_kernel_propagates_nan(compiled, monkeypatch):
    """A NaN offset or mask logit (a diverged or corrupt model) gives NaN outputs, as the plain path
    does, and never an out-of-range read."""
    torch.manual_seed(0)
    layer = DCNv3(32, group=2).eval()
    x = torch.randn(1, 5, 6, 32)
    with torch.no_grad():
        for bias in (layer.offset.bias, layer.mask.bias):
            bias.zero_()
            bias[3] = float("nan")
            monkeypatch.setattr(dcnv3, "_kernel", "compiled")
            got = layer(x)
            monkeypatch.setattr(dcnv3, "_kernel", "torch")
            assert torch.equal(got.isnan(), layer(x).isnan()) and got.isnan().all()
            bias.zero_()
