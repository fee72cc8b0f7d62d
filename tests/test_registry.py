import inspect
import re

import pytest
import torch

import upernet
from upernet.models import zoo

from conftest import SMALL_BACKBONE, small_args

# Single-task variants; the multi-task ones (upernet_multitask*) have their own sweep in test_multitask_model.py.
SINGLE_TASK = [n for n in upernet.list_models() if not n.startswith("upernet_multitask")]


@pytest.mark.parametrize("name", SINGLE_TASK)
@pytest.mark.parametrize("aux", [True, False])
def test_variant_forward_backward(name, aux):
    torch.manual_seed(0)
    model = upernet.build_model(name, num_classes=5, aux_head=aux, **small_args(name))
    assert len(model.backbone.channels) == len(model.backbone.strides) == 4
    assert model.backbone.strides[0] == 4
    model.train()
    images = torch.randn(2, 3, 69, 83)  # odd, not a multiple of 32
    labels = torch.randint(0, 5, (2, 69, 83))
    labels[:, :4] = 255
    outputs = model(images)
    assert outputs["out"].shape == (2, 5, 69, 83)
    assert ("aux" in outputs) == aux
    loss = model.loss(outputs, labels)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:10]}"
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"} and torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("name", SINGLE_TASK)
def test_variant_under_bfloat16_autocast(name):
    """predict/eval default to bf16 autocast on CPUs with native bf16, and training offers it: every
    variant must run under it, in inference and with autograd, close to its float32 output."""
    torch.manual_seed(0)
    model = upernet.build_model(name, num_classes=5, **small_args(name)).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(images)["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(images)["out"]
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max().item() <= 0.1 * expected.abs().max().item() + 1e-3
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images, labels=torch.randint(0, 5, (2, 64, 96)))["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="upernet_convnext_tiny"):
        upernet.build_model("upernet_convnext_tiy")


def test_list_models_pattern():
    assert upernet.list_models("upernet_r50*") == ["upernet_r50", "upernet_r50_d16", "upernet_r50_d8"]


def test_dilated_resnet_strides():
    two_blocks = {**small_args("upernet_r50_d8"), "backbone_args": {**SMALL_BACKBONE["upernet_r*"], "layers": (1, 1, 2, 2)}}
    d8 = upernet.build_model("upernet_r50_d8", num_classes=3, **two_blocks)
    d16 = upernet.build_model("upernet_r50_d16", num_classes=3, **small_args("upernet_r50_d16"))
    assert d8.backbone.strides == [4, 8, 8, 8]
    assert d16.backbone.strides == [4, 8, 16, 16]
    # contract_dilation: the first block of a dilated stage uses half the stage's dilation.
    stage4 = d8.backbone.body.layer4
    assert stage4[0].conv2.dilation == (2, 2) and stage4[1].conv2.dilation == (4, 4)
    assert d8.backbone.body.layer3[0].conv2.dilation == (1, 1) and d8.backbone.body.layer3[1].conv2.dilation == (2, 2)
    stem = d8.backbone.body.conv1
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [8, 8, 16]  # deep stem w-w-2w


@pytest.mark.parametrize("name,expected_millions", [("upernet_convnext_tiny", 60.2), ("upernet_r50", 66.5)])
def test_published_parameter_counts(name, expected_millions):
    with torch.device("meta"):
        model = upernet.build_model(name, num_classes=150)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - expected_millions) < 0.5


def test_docstring_args_match_signatures():
    """Every documented `Args:` entry names a real parameter, and every parameter is documented."""
    from upernet.models.upernet import FCNHead, UPerHead, UPerNet

    for obj in [UPerNet, UPerHead, FCNHead]:
        doc = inspect.getdoc(obj)
        documented = re.findall(r"^    (\w+):", doc.split("Args:")[1], flags=re.M)
        params = [p for p in inspect.signature(obj.__init__).parameters if p != "self"]
        assert documented == params, obj.__name__


@pytest.mark.parametrize("name", ["upernet_convnext_tiny", "upernet_r50_d8"])
def test_tiny_inputs_are_padded_not_crashing(name):
    torch.manual_seed(0)
    model = upernet.build_model(name, num_classes=4, **small_args(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 17, 45))["out"]
        padded = model(torch.nn.functional.pad(torch.randn(1, 3, 17, 45), (0, 0, 0, 15)))["out"]
    assert out.shape == (1, 4, 17, 45) and torch.isfinite(out).all()
    assert padded.shape == (1, 4, 32, 45)
