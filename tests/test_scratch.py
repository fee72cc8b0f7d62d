"""Reused scratch buffers work across inference mode, no_grad and sizes, and keep results exact;
the command line asks for freed memory to be kept."""
import torch

import upernet
from upernet.inference.prepare import prepare_for_inference
from upernet.models.backbones.dcnv3 import DCNv3
from upernet.ops.scratch import padded_scratch, scratch


def test_scratch_reuses_and_grows():
    like = torch.zeros(1)
    a = scratch("test slot", (4, 5), like)
    b = scratch("test slot", (2, 3), like)
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 3)
    c = scratch("test slot", (100, 100), like)
    assert c.shape == (100, 100) and c.numel() == 10_000


def test_fast_model_and_dcnv3_alternate_inference_mode_and_no_grad():
    """Buffers made under torch.inference_mode() must still be writable under no_grad, and back."""
    torch.manual_seed(0)
    model = upernet.build_model("upernet_timm", model_name="resnet18", num_classes=3, channels=16)
    fast = prepare_for_inference(model, "fp32")
    layer = DCNv3(channels=16, group=2).eval()
    x, y = torch.randn(1, 3, 64, 96), torch.randn(1, 9, 11, 16)
    with torch.inference_mode():
        first, first_dcn = fast(x)["out"].clone(), layer(y).clone()
    with torch.no_grad():
        second, second_dcn = fast(x)["out"], layer(y)
    with torch.inference_mode():
        third = fast(torch.randn(1, 3, 128, 160))["out"]  # a larger size grows the buffers
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first_dcn, second_dcn, rtol=0, atol=0)
    assert third.shape == (1, 3, 128, 160)


def test_padded_scratch_equals_zero_padding_after_a_larger_call():
    """The buffer holds the previous call's values: the new border must still read zero."""
    padded_scratch("test pad", torch.full((1, 9, 9, 3), 7.0), (2, 2), (2, 2))
    x = torch.randn(1, 4, 5, 3, dtype=torch.bfloat16)
    got = padded_scratch("test pad", x, (1, 2), (3, 1), torch.float32)
    expected = torch.nn.functional.pad(x.float(), (0, 0, 3, 1, 1, 2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cli_keeps_freed_memory(monkeypatch):
    from upernet import cli
    from upernet.ops import scratch

    calls = []
    monkeypatch.setattr(scratch, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["info", "--list"]) == 0
    assert calls == [True]
