"""Our checkpoint format: a folder with `config.json` (what rebuilds the model) + `model.safetensors`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import atomic_write, read_json
from .registry import build_model

FORMAT = "upernet"
FORMAT_VERSION = 1


def model_config(model: nn.Module) -> dict:
    """The JSON-able description that `build_model` turns back into this architecture."""
    if not model.config:
        raise ValueError("this model was not built by `build_model`, so it cannot describe itself for saving")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config["name"],
            "model_args": model.config["args"], "meta": model.meta}


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save `model` into the folder `path` (created if needed); returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(model_config(model), indent=2)
    atomic_write(folder / "config.json", lambda p: p.write_text(text))
    return folder


def build_from_config(config: dict) -> nn.Module:
    model = build_model(config["model"], **config.get("model_args", {}))
    model.meta = dict(config.get("meta", {}))
    return model


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load every tensor or fail with the lists of missing and unexpected keys, naming `source`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        def listing(title, keys):
            return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "") if keys else ""
        raise UserError(
            f"{source}: the weights do not fit the model's layout."
            + listing("missing keys", missing) + listing("unexpected keys", unexpected)
            + listing("shape mismatches", mismatched)
        )
    model.load_state_dict(state_dict, strict=True)


def load_folder(folder: str | os.PathLike) -> nn.Module:
    """Rebuild and load a model from our folder format (`config.json` + `model.safetensors`)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = read_json(config_file)
    if config.get("format") != FORMAT:
        raise UserError(f"{config_file}: not an upernet model folder (no \"format\": \"upernet\")")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: model folder without weights (expected {weights.name})")
    model = build_from_config(config)
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise UserError(f"{weights}: cannot read the weights ({e})") from None
    load_state_dict_strict(model, state_dict, str(weights))
    return model.eval()
