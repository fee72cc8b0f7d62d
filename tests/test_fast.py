"""The inference fast path: same outputs as the plain model, bf16 agreement, the pieces it is built from."""
import pytest
import torch
import torch.nn.functional as F

import upernet
from upernet.data.synthetic import synthetic_sample
from upernet.inference.prepare import prepare_for_inference, resolve_dtype
from upernet.ops.concat_conv import concat_conv
from upernet.ops.pooling import adaptive_avg_pool2d_exportable
from upernet.ops.winograd import winograd_conv3x3, winograd_weight

TINY_CONVNEXT = dict(backbone_args={"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48]}, channels=32)


def _randomise_batchnorms(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding them changes the convs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name, kwargs", [
    ("upernet_convnext_tiny", TINY_CONVNEXT),
    ("upernet_r50", dict(backbone_args={"layers": [1, 1, 1, 1]}, channels=32)),  # BNs in the backbone too
])
def test_fast_fp32_equals_plain_model(name, kwargs):
    torch.manual_seed(0)
    model = upernet.build_model(name, num_classes=5, **kwargs).eval()
    _randomise_batchnorms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_for_inference(model, "fp32")
    assert fast.decode_head.concat_strategy == "winograd" and fast.aux_head is None
    assert type(fast.decode_head) is type(model.decode_head)  # no class swap
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # all folded
    for shape in [(64, 96), (45, 71)]:  # even and odd sizes (Winograd tiles overhang)
        images = torch.randn(2, 3, *shape)
        with torch.no_grad():
            expected = model(images)["out"]
            got = fast(images)["out"]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4
    # the given model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.decode_head.concat_strategy == "split" and model.aux_head is not None


@pytest.mark.parametrize("shape, band_tiles", [((32, 32), 4096), ((32, 32), 40), ((17, 30), 16), ((1, 5), 4096)])
def test_winograd_equals_direct_conv(shape, band_tiles):
    """Two same-size inputs summed in the Winograd domain, in several bands of tile rows (and a last,
    shorter band): the conv over their concatenation."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 8, 3, padding=1)
    a, b = torch.randn(2, 8, *shape), torch.randn(2, 16, *shape)
    u = winograd_weight(conv.weight)
    with torch.no_grad():
        expected = conv(torch.cat([a, b], dim=1))
        got = winograd_conv3x3([a.contiguous(memory_format=torch.channels_last), b], torch.split(u, [8, 16], dim=1),
                               conv.bias, band_tiles=band_tiles)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape", [(32, 32), (17, 30), (1, 5)])
def test_concat_conv_winograd_equals_direct_conv(shape):
    """A full-size input by Winograd, a coarse one convolved before its resize."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 8, 3, padding=1)
    small = (max(shape[0] // 2, 1), max(shape[1] // 2, 1))
    a, b = torch.randn(2, 8, *shape), torch.randn(2, 16, *small)
    with torch.no_grad():
        expected = F.relu(conv(torch.cat([a, F.interpolate(b, size=shape, mode="bilinear")], dim=1)))
        got = F.relu(concat_conv([a.contiguous(memory_format=torch.channels_last), b], conv.weight, conv.bias, shape,
                                 strategy="winograd", transformed_weight=winograd_weight(conv.weight)))
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size, scale", [((16, 16), 6), ((13, 7), 3), ((5, 9), 6), ((20, 31), 1), ((4, 4), 2)])
def test_exportable_adaptive_pooling_equals_torch(size, scale):
    x = torch.randn(2, 3, *size)
    expected = F.adaptive_avg_pool2d(x, scale)
    assert (adaptive_avg_pool2d_exportable(x, scale) - expected).abs().max().item() <= 1e-6


def _normalise(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255 - 0.5) / 0.25


def test_bf16_agrees_with_fp32_on_synthetic_validation():
    """A tiny model trained briefly on the built-in scenes; bf16 and fp32 argmax agree on >= 99.5% of pixels."""
    torch.manual_seed(0)
    model = upernet.build_model("upernet_convnext_tiny", num_classes=7, **TINY_CONVNEXT)
    train = [synthetic_sample(i, split="train", image_size=48) for i in range(6)]
    images = torch.stack([_normalise(im) for im, _ in train])
    labels = torch.stack([lab.long() for _, lab in train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(8):
        loss = model.loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val = torch.stack([_normalise(synthetic_sample(i, split="val", image_size=96)[0]) for i in range(4)])
    with torch.no_grad():
        fp32 = prepare_for_inference(model, "fp32")(val)["out"].argmax(1)
        bf16 = prepare_for_inference(model, "bf16")(val)["out"].argmax(1)
    assert fp32.unique().numel() >= 2  # the model predicts a real segmentation, not one class
    assert (fp32 == bf16).float().mean().item() >= 0.995


def test_bf16_model_has_bf16_weights_and_float32_output():
    model = upernet.build_model("upernet_convnext_tiny", num_classes=3, **TINY_CONVNEXT).eval()
    fast = prepare_for_inference(model, "bf16")
    assert next(fast.backbone.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = fast(torch.randn(1, 3, 64, 64))["out"]
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)


def test_resolve_dtype_rejects_unknown_names():
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16")


def test_auto_precision_is_bf16_only_on_hardware_with_native_bf16(monkeypatch):
    from upernet.inference import prepare as fast

    monkeypatch.setattr(fast, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert fast.autocast_dtype_for("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(fast, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert fast.autocast_dtype_for("auto", "cpu") is None
    assert fast.autocast_dtype_for("bf16", "cpu") == torch.bfloat16 and fast.autocast_dtype_for("fp32") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        fast.autocast_dtype_for("int8")

