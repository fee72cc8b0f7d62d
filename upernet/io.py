"""Low-level file I/O every layer uses: atomic writes, JSON, and loads that never run pickled code."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError


def temp_path(path: str | os.PathLike) -> Path:
    """The temp name `atomic_write` writes through: `.<name>.tmp` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process's umask."""
    try:  # Linux reports the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)`, fsync, rename to `path`: a crash never leaves half a file, a failure no temp file.
    The file gets the mode of a newly opened file (some writers, like safetensors', create 0o600)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; invalid JSON is an error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write `data` as indented JSON."""
    return write_text(path, json.dumps(data, indent=2))


def load_torch_file(path: str | os.PathLike) -> Any:
    """A `.pt`/`.pth`/`.bin` file read with `weights_only=True`: tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in str(e).lower():
            raise UserError(f"{path}: not a weights-only checkpoint (it holds pickled Python objects, which "
                            f"are never loaded); re-save its state_dict with torch.save") from None
        raise UserError(f"{path}: cannot read it as a PyTorch checkpoint ({first})") from None
