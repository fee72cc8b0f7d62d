"""prepare_for_inference on every registered variant: the same outputs as the model it copies, the same
methods, and each concat strategy of the head computing the literal concat -> conv."""
import pytest
import torch
import torch.nn.functional as F

import upernet
from conftest import tiny_model
from upernet.inference.prepare import prepare_for_inference
from upernet.ops.concat_conv import STRATEGIES, concat_conv


def randomise_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding them changes the convs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                     (m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5)):
                    t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)
    return model.eval()


@pytest.mark.parametrize("name", upernet.list_models())
def test_prepared_equals_unprepared_for_every_variant(name):
    model = randomise_batchnorms(tiny_model(name))
    prepared = prepare_for_inference(model, "fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.decode_head.modules())  # folded
    assert prepared.decode_head.concat_strategy == "winograd" and model.decode_head.concat_strategy == "split"
    images = torch.randn(2, 3, 45, 71)  # odd sizes: Winograd tiles overhang, resizes are not exact halvings
    with torch.no_grad():
        expected, got = model(images), prepared(images)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and got[key].shape == value.shape, key
        assert (got[key] - value).abs().max().item() <= 1e-4, key


def test_prepared_model_keeps_the_heads_methods():
    model = randomise_batchnorms(tiny_model("upernet_r50"))
    prepared = prepare_for_inference(model, "fp32")
    assert prepared.aux_head is None and model.aux_head is not None
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 67, 93))
        expected, got = model.decode_head.pyramid(features), prepared.decode_head.pyramid(features)
        assert len(got) == len(expected) == 4
        for a, b in zip(got, expected):
            assert (a - b).abs().max().item() <= 1e-4
        fused = prepared.decode_head.fuse_levels(got)
        assert (fused - model.decode_head.fuse_levels(expected)).abs().max().item() <= 1e-4


def test_prepared_multitask_model_per_task_and_in_bf16():
    model = randomise_batchnorms(tiny_model("upernet_multitask_r50"))
    prepared = prepare_for_inference(model, "fp32")
    images = torch.randn(1, 3, 61, 77)
    with torch.no_grad():
        for task in model.tasks:
            expected, got = model(images, tasks=[task])[task], prepared(images, tasks=[task])[task]
            assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-4, task
        outputs = prepare_for_inference(model, "bf16")(images)
    assert set(outputs) == set(model.tasks) and all(v.dtype == torch.float32 for v in outputs.values())


def test_prepare_leaves_the_model_alone_and_passes_non_modules_through():
    model = randomise_batchnorms(tiny_model("upernet_convnext_tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model, "fp32")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.decode_head.fusion.bn, torch.nn.BatchNorm2d) and model.decode_head.fusion.winograd_weight is None
    assert prepared.decode_head.fusion.winograd_weight is not None
    assert "decode_head.fusion.winograd_weight" not in prepared.state_dict()  # not part of checkpoints
    onnx_like = object()
    assert prepare_for_inference(onnx_like) is onnx_like


def _inputs(dtype=torch.float64, requires_grad=False):
    """A full-size input, one at 1/2 (convolved before its resize), one at 3/4 (resized first), one at 1/8."""
    torch.manual_seed(0)
    shapes = [(2, 4, 23, 31), (2, 3, 12, 16), (2, 2, 17, 23), (2, 5, 3, 4)]
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_every_concat_strategy_equals_the_literal_one(strategy, align_corners):
    inputs = _inputs()
    weight, bias = torch.randn(6, 14, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    size = inputs[0].shape[-2:]
    expected = F.conv2d(torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
                                   for x in inputs], dim=1), weight, bias, padding=1)
    with torch.no_grad():
        got = concat_conv(inputs, weight, bias, size, align_corners, strategy)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_split_strategy_gradients_equal_the_literal_ones():
    weight = torch.randn(6, 14, 3, 3, dtype=torch.float64, requires_grad=True)
    grads = {}
    for strategy in ("literal", "split", "winograd"):  # "winograd" runs as "split" under autograd
        inputs = _inputs(requires_grad=True)
        concat_conv(inputs, weight, None, inputs[0].shape[-2:], strategy=strategy).square().sum().backward()
        grads[strategy] = [x.grad for x in inputs] + [weight.grad.clone()]
        weight.grad = None
    for strategy in ("split", "winograd"):
        for got, expected in zip(grads[strategy], grads["literal"]):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_unknown_concat_strategy_is_refused():
    inputs = _inputs()
    with pytest.raises(ValueError, match="concat strategy"):
        concat_conv(inputs, torch.zeros(1, 14, 3, 3, dtype=torch.float64), None, (23, 31), strategy="fft")
