"""One way to name a model everywhere: `load_model(source)` takes whatever a user has at hand.

- a registered name (`upernet_convnext_tiny`): the architecture with fresh weights;
- our model folder (`config.json` + `model.safetensors`, written by `save_model` or `upernet convert`);
- a Hugging Face `UperNetForSemanticSegmentation` folder;
- a training checkpoint of `upernet train` (`runs/x/checkpoints/best.pt`, `iter_*.pt`);
- a run folder of `upernet train` (its final `model/`, else `checkpoints/best.pt`, else the newest
  `iter_*.pt`);
- any checkpoint `upernet convert` reads (mmsegmentation, InternImage, sssegmentation, CSAIL, smp).

This module sits on top of the model layer: it knows our format, training checkpoints and the
converters, and nothing above them.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import MissingFile, UserError
from .io import load_torch_file, read_json
from .models.registry import build_model, list_models
from .models.weights import build_from_config, load_folder, load_state_dict_strict, save_model

MODEL_SOURCES = ("a registered name (upernet list), a model folder, a Hugging Face UperNet folder, a training "
                 "checkpoint (.pt of upernet train), a run folder, or a checkpoint `upernet convert` reads")


def is_training_checkpoint(content: object) -> bool:
    """True for the dict `upernet train` writes (model state, optimiser state, iteration, config)."""
    return isinstance(content, dict) and {"model", "iteration", "config"} <= set(content)


def run_checkpoint(folder: Path) -> Path | None:
    """What a run folder stands for: its final `model/`, else `best.pt`, else the newest `iter_*.pt`."""
    if (folder / "model" / "config.json").is_file():
        return folder / "model"
    checkpoints = folder / "checkpoints"
    if (checkpoints / "best.pt").is_file():
        return checkpoints / "best.pt"
    periodic = sorted(checkpoints.glob("iter_*.pt"), key=lambda p: p.stem) if checkpoints.is_dir() else []
    return periodic[-1] if periodic else None


def model_from_training_checkpoint(content: dict, source: str) -> nn.Module:
    """The model of a training checkpoint, rebuilt from the constructor config stored beside its
    weights (older checkpoints: from the recipe, with the class count read off the classifier)."""
    state = content["model"]
    if content.get("model_config"):
        model = build_model(content["model_config"]["name"], **content["model_config"]["args"])
    else:
        recipe = content["config"].get("model", {})
        args = dict(recipe.get("args", {}))
        classifier = state.get("decode_head.classifier.weight")
        if classifier is None:
            raise UserError(f"{source}: this training checkpoint does not say how to rebuild its model; load it "
                            f"with `upernet train --resume` instead")
        args.setdefault("num_classes", int(classifier.shape[0]))
        model = build_model(recipe.get("name", "upernet_r50"), **args)
    model.meta = dict(content.get("meta") or {})
    load_state_dict_strict(model, state, source)
    return model.eval()


def is_our_model(path: str | os.PathLike) -> bool:
    """True for what `upernet train` or `save_model` wrote: our model folder, a training checkpoint,
    a run folder (what `convert` need not convert)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            content = read_json(config)
            return isinstance(content, dict) and content.get("format") == "upernet"
        return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()
    if path.suffix in (".pt", ".pth", ".ckpt") and path.is_file():
        try:
            return is_training_checkpoint(load_torch_file(path))
        except UserError:
            return False
    return False


def load_model(source: str | os.PathLike) -> nn.Module:
    """The model `source` names, in eval mode; see the module docstring for what `source` may be."""
    text = str(source)
    path = Path(source)
    if not path.exists():
        if text in list_models():
            return build_model(text).eval()
        raise MissingFile(f"{text}: no such file or folder, nor a registered model name; give {MODEL_SOURCES}")
    if path.is_dir():
        if (path / "config.json").is_file():
            config = read_json(path / "config.json")
            if isinstance(config, dict) and config.get("model_type") == "upernet":
                from .convert.huggingface import convert_huggingface

                return convert_huggingface(path)
            if isinstance(config, dict) and config.get("format") == "upernet":
                return load_folder(path)
        if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
            inner = run_checkpoint(path)
            if inner is None:
                raise UserError(f"{path}: a run folder without a model or checkpoint yet (train it first, or "
                                f"give a checkpoint file)")
            return load_model(inner)
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        content = load_torch_file(path)
        if is_training_checkpoint(content):
            return model_from_training_checkpoint(content, text)
    from .convert import convert_checkpoint

    return convert_checkpoint(path)


def stored_recipe(source: str | os.PathLike) -> dict | None:
    """The training recipe (as a plain dict) stored with a model, if there is one: the `config` of a
    training checkpoint, the `config.yaml` of a run folder or of the run a `model/` folder belongs to."""
    import yaml

    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        content = load_torch_file(path)
        return content["config"] if is_training_checkpoint(content) else None
    for folder in (path, path.parent):
        recipe = folder / "config.yaml"
        if path.is_dir() and recipe.is_file() and ((folder / "model").is_dir() or (folder / "checkpoints").is_dir()):
            return yaml.safe_load(recipe.read_text())
    return None


__all__ = ["stored_recipe", "load_model", "save_model", "build_from_config", "is_training_checkpoint", "run_checkpoint"]
