"""The conversion mechanism: a declarative table of key renames, then a strict load.

A table is a list of `(pattern, replacement)` pairs. Each source key is matched (`re.fullmatch`)
against the patterns in order; the first match renames it with `re.sub` syntax (`\\1`, ...). A
replacement of `None` drops the key on purpose (buffers our model recomputes, e.g. Swin's
`relative_position_index`); dropped keys are reported. A key no rule matches is an error.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

Rule = tuple[str, Optional[str]]


def rename_keys(
    state_dict: dict[str, torch.Tensor], rules: Sequence[Rule], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply `rules` to every key. Returns (renamed tensors, keys dropped on purpose)."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                if replacement is None:
                    dropped.append(key)
                else:
                    new_key = pattern.sub(replacement, key)
                    if new_key in renamed:
                        raise ValueError(f"{source}: two source keys map to {new_key!r} (one is {key!r})")
                    renamed[new_key] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
        raise ValueError(f"{source}: {len(unmatched)} keys of an unknown layout (unexpected keys): {shown}")
    return renamed, dropped


def load_torch_file(path: str) -> dict:
    """Read a `.pth`/`.bin` checkpoint without unpickling code (`weights_only=True`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a PyTorch checkpoint with weights_only=True ({e})") from None
