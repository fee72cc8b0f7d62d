"""Memory reused between calls instead of allocated afresh: scratch tensors for intermediate values
at inference, and `keep_freed_memory` for the whole process."""
from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from typing import Sequence

import torch

_BUFFERS = threading.local()


def scratch(slot: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for intermediate values, from a buffer kept per thread between calls.

    On CPU a fresh multi-MB tensor costs page faults: the OS maps and zero-fills it again on every
    call (measured: a 512x512 Winograd conv's element-wise transforms ran 2-3x slower in fresh
    memory). Each slot grows to the largest size asked for and is reused; elsewhere (CUDA has a
    caching allocator) a new tensor is returned.
    """
    if like.device.type != "cpu":
        return like.new_empty(shape)
    numel = math.prod(shape)
    buffers = _BUFFERS.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, like.dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buffers[(slot, like.dtype)] = buffer = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel].view(shape)


def padded_scratch(slot: str, x: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` (N, H, W, C) copied, as `dtype`, into a `scratch` buffer with zero borders: `rows` =
    (above, below) and `cols` = (left, right). Only the border is zeroed, not the whole buffer."""
    n, h, w, c = x.shape
    (top, bottom), (left, right) = rows, cols
    like = x if dtype in (None, x.dtype) else x.new_empty(0, dtype=dtype)
    padded = scratch(slot, (n, top + h + bottom, left + w + right, c), like)
    padded[:, :top].zero_()
    padded[:, top + h:].zero_()
    padded[:, top:top + h, :left].zero_()
    padded[:, top:top + h, left + w:].zero_()
    padded[:, top:top + h, left:left + w].copy_(x)
    return padded


_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory(limit: int = 2**30) -> bool:
    """Make glibc's malloc serve allocations below `limit` bytes from its heap and keep up to `limit`
    bytes of freed memory for reuse, instead of returning multi-MB activations to the OS after every
    call and page-faulting them in again on the next (measured on a 2-core VM: UPerNet ConvNeXt-T and
    InternImage-T float32 inference 25-35% faster, bfloat16 about 10%; peak memory about 20% higher).

    Process-wide, so `upernet`'s command line calls it and the library does not on import. Returns
    whether it applied: glibc only, and never over the user's own MALLOC_* / GLIBC_TUNABLES settings.
    """
    libc = _glibc()
    if libc is None or any(name in os.environ for name in _MALLOC_SETTINGS):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def release_freed_memory() -> None:
    """Hand the memory malloc keeps for reuse back to the OS now (glibc only; else nothing), e.g.
    before measuring a peak so that reuse of earlier calls' memory is not counted as free."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # not musl, ...
