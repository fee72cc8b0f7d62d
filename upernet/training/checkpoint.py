"""Training checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: the model, optimiser,
schedule and grad-scaler states, the iteration, every process's RNG states, the data position and
the resolved config. Periodic checkpoints are `iter_<N>.pt` (the last `keep_last` are kept), the
best validation mIoU is `best.pt`.
"""
from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MissingFile, UserError
from ..io import atomic_write, temp_path


def is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space: ENOSPC, or torch's zip writer's RuntimeError
    ("No space left on device", "enforce fail at inline_container.cc": a short write)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("No space left on device" in text or "enforce fail" in text)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through a temp file in the same folder, fsync, rename: never half a file. A full
    disk is a `UserError` naming the file; the previous file of that name stays, no temp file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"{path}: cannot write the checkpoint, the disk is full (no space left on the device); "
                        f"free some space, then continue with --resume") from None


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files (`.<name>.pt.tmp`) a process killed while writing a checkpoint left in
    `folder`; returns them. They are never read as checkpoints (`periodic_checkpoints`)."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.pt.tmp") if temp_path(p.parent / p.name[1:-4]) == p] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by `atomic_save`, loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, foreign pickles
        raise UserError(f"{path}: cannot read the checkpoint ({e})") from None


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as tensors and lists (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf (empty when all are finite)."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(state: dict, run_dir: str | os.PathLike, iteration: int, keep_last: int) -> Path:
    """Write `checkpoints/iter_<N>.pt` and delete the periodic ones older than the last `keep_last`.

    Refuses (ValueError) to write a model with NaN/Inf weights, so the last good file stays the last.
    """
    bad = non_finite(state["model"])
    if bad:
        raise UserError(f"not saving the checkpoint of iteration {iteration}: non-finite weights in "
                         f"{', '.join(bad[:5])}")
    folder = Path(run_dir) / "checkpoints"
    path = atomic_save(state, folder / f"iter_{iteration:07d}.pt")
    for old in periodic_checkpoints(folder)[:-keep_last]:
        old.unlink()
    return path


def periodic_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """`iter_<N>.pt` files of a checkpoint folder, oldest first."""
    files = [p for p in Path(folder).glob("iter_*.pt") if re.fullmatch(r"iter_\d+\.pt", p.name)]
    return sorted(files, key=lambda p: int(p.stem.split("_")[1]))


def find_resume(path: str | os.PathLike) -> Path:
    """The checkpoint file to resume from: `path` itself, or the newest one of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = periodic_checkpoints(folder) if folder.is_dir() else []
        if found:
            return found[-1]
    raise MissingFile(f"{path}: no checkpoint to resume from (expected a .pt file or a run folder with "
                            f"checkpoints/iter_*.pt)")
