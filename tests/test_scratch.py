"""Reused scratch buffers work across inference mode, no_grad and sizes, and keep results exact;
keep_freed_memory keeps freed activations for reuse."""
import os
import subprocess
import sys

import pytest
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


_FREED_MEMORY_KEPT = """
import ctypes, sys
from upernet.ops.scratch import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
import torch
activation = torch.ones(2**24)  # 64 MB
del activation
print(applied, libc.mallinfo2().fordblks >> 20)  # MB free in malloc's heap, kept for reuse
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_keeps_a_freed_activation_for_reuse():
    """By default glibc maps a 64 MB tensor separately and unmaps it when freed (the next call page-
    faults it in again); after keep_freed_memory it comes from the heap and stays there, free."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    kept = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_KEPT, mode], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        kept[mode] = (out[0] == "True", int(out[1]))
    assert kept["keep"][0] and kept["keep"][1] >= 64
    assert not kept["default"][0] and kept["default"][1] < 64
    # The user's own malloc settings win.
    out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_KEPT, "keep"], env={**env, "MALLOC_TRIM_THRESHOLD_": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_cli_keeps_freed_memory(monkeypatch):
    from upernet import cli
    from upernet.ops import scratch

    calls = []
    monkeypatch.setattr(scratch, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["info", "--list"]) == 0
    assert calls == [True]
