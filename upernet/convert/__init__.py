"""Import checkpoints of other toolkits into our model: one key table per source layout.

`FORMATS` maps a format name to (detect, convert): `detect(path) -> bool` looks at a file or folder
without building anything; `convert(path) -> UPerNet` returns a loaded model in eval mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import huggingface

FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], object]]] = {
    "huggingface": (huggingface.detect, huggingface.convert_huggingface),
}


def detect_format(path: str | Path) -> str:
    path = Path(path)
    for name, (detect, _) in FORMATS.items():
        if detect(path):
            return name
    raise ValueError(f"{path}: unknown checkpoint layout; known formats: {', '.join(FORMATS)} (or pass --from)")


def convert_checkpoint(path: str | Path, fmt: str | None = None):
    """Load a foreign checkpoint as our UPerNet; `fmt` is detected when not given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt][1](path)
