"""The conversion mechanism: a declarative table of key renames, then a strict load.

A table is a list of `(pattern, replacement)` pairs. Each source key is matched (`re.fullmatch`)
against the patterns in order; the first match renames it with `re.sub` syntax (`\\1`, ...). A
replacement of `None` drops the key on purpose (buffers our model recomputes, e.g. Swin's
`relative_position_index`); dropped keys are reported. A key no rule matches is an error.
"""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import UserError

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
                        raise UserError(f"{source}: two source keys map to {new_key!r} (one is {key!r})")
                    renamed[new_key] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
        raise UserError(f"{source}: {len(unmatched)} keys of an unknown layout (unexpected keys): {shown}")
    return renamed, dropped


def load_converted(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    rules: Sequence[Rule],
    source: str,
    strict: bool = True,
    transform: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
) -> list[str]:
    """Rename `state_dict` with `rules`, apply `transform` to the result, load it into `model`.

    Returns what was skipped.

    Strict (the default): a key no rule knows, a missing or unexpected key or a shape mismatch is an
    error listing them all. Not strict: every tensor whose name and shape fit is loaded, and the
    returned list (also logged as a warning) names each source key that was skipped and each model
    key left at its initial value, so nothing is dropped silently. Keys dropped on purpose by a
    `None` rule are neither.
    """
    from ..models.weights import load_state_dict_strict

    if strict:
        renamed, _ = rename_keys(state_dict, rules, source)
        load_state_dict_strict(model, transform(renamed) if transform else renamed, source)
        return []
    renamed, dropped = rename_keys(state_dict, [*rules, (r".*", None)], source)
    renamed = transform(renamed) if transform else renamed
    known = [re.compile(pattern) for pattern, _ in rules]
    skipped = [f"unknown source key {k}" for k in dropped if not any(p.fullmatch(k) for p in known)]
    expected = model.state_dict()
    fits = {k: v for k, v in renamed.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    for key, tensor in renamed.items():
        if key not in expected:
            skipped.append(f"unexpected key {key}")
        elif key not in fits:
            skipped.append(f"shape mismatch {key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}")
    skipped += [f"missing key {k} (left at its initial value)" for k in expected if k not in fits]
    model.load_state_dict(fits, strict=False)
    if skipped:
        logging.getLogger("upernet.convert").warning(
            "%s: loaded %d tensors; skipped %d:\n  %s", source, len(fits), len(skipped), "\n  ".join(skipped))
    return skipped


@functools.lru_cache(maxsize=2)
def _peek(path: str, mtime: float) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files in the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None


def peek_checkpoint(path: Path) -> object:
    """A single-file checkpoint memory-mapped for format detection, or None if it is not one."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        return None
    return _peek(str(path), path.stat().st_mtime)
