"""The conversion mechanism shared by the toolkit converters, and `randomise` for their tests."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from upernet.convert import FORMATS, convert_checkpoint
from upernet.convert.common import load_converted


pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: one thread (conftest.py)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including BatchNorm affine parameters and running statistics.

    Freshly initialised BatchNorms are the identity (mean 0, var 1, weight 1, bias 0), which would
    hide a BatchNorm mapped onto the wrong one, and some toolkits initialise their classifiers near
    zero; random ones hide nothing. Scales stay near 1 so that deep networks neither explode nor vanish.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()  # std 1/sqrt(fan_in): each layer keeps the scale of its input
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "relative_position_bias_table")):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)


RULES = [(r"features\.0\.(weight|bias)", r"conv.\1"), (r"features\.1\.(\w+)", r"bn.\1"), (r"buffer", None)]


def source_state_dict() -> dict[str, torch.Tensor]:
    tiny = Tiny()
    renamed = {"features.0." + k[5:] if k.startswith("conv.") else "features.1." + k[3:]: v for k, v in tiny.state_dict().items()}
    return {**renamed, "buffer": torch.zeros(1)}


def test_load_converted_strict_loads_every_tensor():
    state_dict = source_state_dict()
    model = Tiny()
    assert load_converted(model, state_dict, RULES, "src") == []
    assert torch.equal(model.conv.weight, state_dict["features.0.weight"])


def test_load_converted_strict_names_missing_and_unknown_keys():
    state_dict = source_state_dict()
    del state_dict["features.1.running_var"]
    with pytest.raises(ValueError, match=r"(?s)src.*missing keys \(1\): bn.running_var"):
        load_converted(Tiny(), state_dict, RULES, "src")
    with pytest.raises(ValueError, match=r"src: 1 keys of an unknown layout.*stray"):
        load_converted(Tiny(), {**source_state_dict(), "stray": torch.zeros(1)}, RULES, "src")


def test_load_converted_not_strict_lists_everything_skipped(caplog):
    state_dict = source_state_dict()
    del state_dict["features.1.running_var"]
    state_dict["stray"] = torch.zeros(1)
    state_dict["features.0.bias"] = torch.zeros(7)
    model = Tiny()
    with caplog.at_level(logging.WARNING, logger="upernet.convert"):
        skipped = load_converted(model, state_dict, RULES, "src", strict=False)
    assert sorted(skipped) == sorted([
        "unknown source key stray",
        "shape mismatch conv.bias: checkpoint (7,) vs model (4,)",
        "missing key conv.bias (left at its initial value)",
        "missing key bn.running_var (left at its initial value)",
    ])
    assert "skipped 4" in caplog.text and "unknown source key stray" in caplog.text
    assert torch.equal(model.conv.weight, state_dict["features.0.weight"])  # what fits is loaded


def test_convert_checkpoint_rejects_options_a_format_does_not_take(tmp_path):
    assert {"mmseg", "sssegmentation", "csail", "smp", "huggingface"} <= set(FORMATS)
    with pytest.raises(ValueError, match="the csail converter does not take output_stride"):
        convert_checkpoint(tmp_path, "csail", output_stride=8)
    with pytest.raises(ValueError, match=f"{tmp_path}: unknown checkpoint layout"):
        convert_checkpoint(tmp_path)


class NotATensor:
    pass


def test_detection_says_why_torch_load_refuses_a_file(tmp_path):
    torch.save({"state_dict": {}, "message_hub": NotATensor()}, tmp_path / "train_state.pth")
    with pytest.raises(ValueError, match="train_state.pth: not a weights-only checkpoint"):
        convert_checkpoint(tmp_path / "train_state.pth")
