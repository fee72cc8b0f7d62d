"""A tiny registry: variant functions by name, `build_model` and `list_models`.

Renamed variants keep their old names as aliases, so that models saved under the old name still load;
aliases are not listed.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

from torch import nn

from ..errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}  # old name -> registered name


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function name; a name can be registered once."""
    if fn.__name__ in _MODELS or fn.__name__ in _ALIASES:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def register_alias(old: str, new: str) -> None:
    """Let `build_model(old)` build the registered variant `new` (for names saved before a rename)."""
    if old in _MODELS or old in _ALIASES:
        raise ValueError(f"model {old!r} is already registered")
    if new not in _MODELS:
        raise ValueError(f"alias {old!r} points to unregistered model {new!r}")
    _ALIASES[old] = new


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered variant; `kwargs` override its defaults (e.g. `num_classes=19`).

    The name and arguments are kept in `model.config`, so that a saved model rebuilds itself; an old
    (aliased) name builds, and is recorded as, the current one.
    """
    name = _ALIASES.get(name, name)
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `upernet.list_models()`."
        raise UserError(f"Unknown model name {name!r}.{hint}")
    model = _MODELS[name](**kwargs)
    model.config = {"name": name, "args": kwargs}
    if hasattr(model, "num_classes") and not (getattr(model, "meta", None) or {}).get("class_names"):
        # names for id2label-style lookups until a dataset or `set_meta` gives real ones; the palette is left
        # to `resolve_meta`, which picks a dataset's colours when a converter sets that dataset's names
        model.meta = {**(getattr(model, "meta", None) or {}), "class_names": [f"class_{i}" for i in range(model.num_classes)]}
    return model
