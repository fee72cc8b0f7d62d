"""The fusion conv computed before resizing (`resized_conv3x3`) equals resize -> conv."""
import pytest
import torch
import torch.nn.functional as F

from upernet.models.registry import build_model
from upernet.models.stats import count_macs
from upernet.ops.resize import resized_conv3x3


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("small, size", [((16, 16), (32, 32)), ((5, 7), (37, 29)), ((40, 33), (150, 131)), ((1, 1), (8, 8))])
def test_resized_conv3x3_equals_resize_then_conv(small, size, align_corners):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *small, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners), weight, padding=1)
    got = resized_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, size, align_corners)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_resized_conv3x3_gradients():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: resized_conv3x3(a, b, (7, 9)), (x, weight))


def test_head_fuses_before_resize_with_the_same_outputs_and_fewer_macs():
    torch.manual_seed(0)
    model = build_model("upernet_timm", model_name="resnet18", num_classes=5, channels=32).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        fast = model(x)["out"]
        model.decode_head.fuse_before_resize = False
        literal = model(x)["out"]
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-4)
    model.decode_head.fuse_before_resize = True
    published, computed = count_macs(model, (96, 160)), count_macs(model, (96, 160), published=False)
    coarse_levels_macs = 3 * 32 * 32 * 9 * (96 // 4) * (160 // 4)  # their share of the conv over the concat
    assert published - computed > 0.6 * coarse_levels_macs
    assert model.decode_head.fuse_before_resize  # count_macs restores the flag


@pytest.mark.parametrize("shape, average, align", [((64, 96), "valid", False), ((20, 45), "all", True), ((150, 70), "valid", False)])
def test_loss_from_labels_equals_loss_of_full_size_logits(shape, average, align):
    """forward(images, labels) (banded, checkpointed upsampling + CE) == loss(forward(images)), values and grads."""
    torch.manual_seed(0)
    model = build_model("upernet_timm", model_name="resnet18", num_classes=7, channels=16, output_align_corners=align)
    model.train()
    images = torch.randn(2, 3, *shape)
    labels = torch.randint(0, 7, (2, *shape))
    labels[0, :5] = 255
    torch.manual_seed(1)  # same dropout masks in both passes
    reference = model.loss(model(images), labels, average=average)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(1)
    loss = model(images, labels=labels, average=average)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
