"""UPerNet semantic segmentation on any backbone.

    import upernet
    model = upernet.load_model("runs/demo/model")   # or a registered name, a Hugging Face folder, ...

Names are imported on first use, so `import upernet` (and `upernet --help`) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "UPerNet": "upernet.models.upernet",
    "build_model": "upernet.models.registry",
    "list_models": "upernet.models.registry",
    "load_model": "upernet.loading",
    "save_model": "upernet.loading",
    "save_huggingface": "upernet.loading",
    "push_to_hub": "upernet.loading",
    "UserError": "upernet.errors",
    "Segmenter": "upernet.inference.segmenter",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'upernet' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    if module.__name__ == "upernet.models.registry":
        importlib.import_module("upernet.models")  # fills the registry
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(__all__)
