"""One way to name a model everywhere: `load_model(source)` takes whatever a user has at hand.

- a registered name (`upernet_convnext_tiny`): the architecture with fresh weights;
- our model folder (`config.json` + `model.safetensors`, written by `save_model` or `upernet convert`);
- a Hugging Face `UperNetForSemanticSegmentation` folder;
- a training checkpoint of `upernet train` (`runs/x/checkpoints/best.pt`, `iter_*.pt`);
- a run folder of `upernet train` (its final `model/`, else `checkpoints/best.pt`, else the newest
  `iter_*.pt`);
- any checkpoint `upernet convert` reads (mmsegmentation, InternImage, sssegmentation, CSAIL, smp);
- a Hugging Face Hub id (`org/name`, `org/name@revision`) of either folder layout above, downloaded
  through `huggingface_hub` (its cache, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`).

This module sits on top of the model layer: it knows our format, training checkpoints and the
converters, and nothing above them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import MissingFile, UserError
from .io import load_torch_file, read_json
from .models.init_from import FittedWeights, copy_fitting_weights
from .models.registry import build_model, list_models
from .models.weights import build_from_config, load_folder, load_state_dict_strict, push_to_hub, save_model

MODEL_SOURCES = ("a registered name (upernet list), a model folder, a Hugging Face UperNet folder, a training "
                 "checkpoint (.pt of upernet train), a run folder, a checkpoint `upernet convert` reads, or a Hub "
                 "id org/name")
# What a Hub repo of either layout needs; pickled `pytorch_model.bin` only when there are no safetensors.
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "preprocessor_config.json", "README.md")
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".onnx", ".safetensors", ".json", ".yaml")


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


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `text` reads as a Hub id `org/name[@revision]` rather than a file path."""
    match = HUB_ID.fullmatch(text)
    if not match or Path(text).exists() or text.lower().endswith(FILE_SUFFIXES) or ".." in text:
        return None
    return match["repo"], match["revision"]


def download_from_hub(repo_id: str, revision: str | None = None, files: Sequence[str] = HUB_FILES) -> Path:
    """The `files` (patterns) of a Hub model repo, in huggingface_hub's cache; returns the snapshot folder.

    Every failure is one `UserError` line: offline and not cached, unreachable, no such repo or
    revision, gated.
    """
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise UserError(f"{repo_id}: loading a model from the Hugging Face Hub needs huggingface_hub: "
                        f"pip install huggingface_hub") from None
    at = f"@{revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{repo_id}{at}: no such local folder, and not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; download it first (`hf download {repo_id}`, online) or unset HF_HUB_OFFLINE") from None
        raise UserError(f"{repo_id}{at}: no such local folder; the Hub ({constants.ENDPOINT}) cannot be reached and "
                        f"the model is not in the cache ({constants.HF_HUB_CACHE}); connect, or download it where you can "
                        f"(`hf download {repo_id}`) and copy HF_HOME") from None
    except GatedRepoError:
        raise UserError(f"{repo_id}: a gated repo; accept its conditions on its Hub page and set HF_TOKEN "
                        f"(or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id}: no revision {revision!r} on the Hub; give a branch, tag or commit "
                        f"that exists") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such file or folder, nor a model repo on the Hub ({constants.ENDPOINT}); "
                        f"check the name, or set HF_TOKEN if it is private") from None
    except HfHubHTTPError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{repo_id}: the Hub refused the download ({first_line})") from None


def load_from_hub(repo_id: str, revision: str | None = None) -> nn.Module:
    """Our model folder or a transformers UperNet repo on the Hub, downloaded (or taken from the cache) and loaded."""
    folder = download_from_hub(repo_id, revision)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    kind = (config.get("format") or config.get("model_type")) if isinstance(config, dict) else None
    if config is not None and config.get("model_type") == "upernet" and not any(folder.glob("*.safetensors")):
        download_from_hub(repo_id, revision, ["pytorch_model.bin"])  # an older transformers repo
    if kind != "upernet":
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        what = f"config.json of model_type {kind!r}" if config is not None else "no config.json"
        raise UserError(f"{repo_id}: neither an upernet model folder nor a transformers UperNet repo (found "
                        f"{what}; files {', '.join(found) or 'none'})")
    return load_model(folder)


def load_model(source: str | os.PathLike, revision: str | None = None) -> nn.Module:
    """The model `source` names, in eval mode; see the module docstring for what `source` may be.

    Args:
        source: a path, a registered name or a Hub id (`org/name`, or `org/name@revision`).
        revision: of a Hub id: a branch, tag or commit (overrides an `@revision` in `source`).
    """
    text = str(source)
    path = Path(source)
    if not path.exists():
        if text in list_models():
            return build_model(text).eval()
        hub = hub_id(text)
        if hub:
            return load_from_hub(hub[0], revision or hub[1])
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


def save_huggingface(model: nn.Module, path: str | os.PathLike, recipe: dict | None = None,
                     metrics: dict | None = None) -> Path:
    """Write `model` (ConvNeXt or Swin UPerNet) as a transformers UperNet folder; see `convert.to_huggingface`."""
    from .convert.to_huggingface import save_huggingface as write

    return write(model, path, recipe=recipe, metrics=metrics)


def run_record(source: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """(training recipe, evaluation metrics) of the run a model comes from, each None when unknown:
    `stored_recipe(source)` and the run's `eval/metrics.json` (of `upernet eval RUN`)."""
    path = Path(source)
    recipe = stored_recipe(path)  # None for anything but a run of ours
    if recipe is None:
        return None, None
    folders = [path, path.parent] if path.is_dir() else [path.parent.parent]  # run/, run/model/, run/checkpoints/x.pt
    found = next((f / "eval" / "metrics.json" for f in folders if (f / "eval" / "metrics.json").is_file()), None)
    metrics = read_json(found) if found else None
    return recipe, metrics if isinstance(metrics, dict) else None


def load_with_recipe(source: str | os.PathLike) -> tuple[nn.Module, dict | None]:
    """`load_model(source)` and `stored_recipe(source)`, reading a training checkpoint once."""
    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        content = load_torch_file(path)
        if is_training_checkpoint(content):
            return model_from_training_checkpoint(content, str(path)), content["config"]
        return load_model(source), None
    return load_model(source), stored_recipe(source)


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


# ---- fine-tuning: start from any model, keep what fits ----------------------------------------------
def merged_args(base: dict, changes: dict) -> dict:
    """`base` constructor arguments with `changes` laid over them, nested dicts merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged_args(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def init_from(source: str | os.PathLike, num_classes: int, args: dict | None = None,
              name: str | None = None, in_channels: int = 3) -> tuple[nn.Module, FittedWeights, dict]:
    """A model of `source`'s architecture with `num_classes` outputs, starting from every tensor of
    `source` that fits (`models.init_from.copy_fitting_weights`): what `model.init_from` trains.

    Args:
        source: anything `load_model` reads (our folder, a Hugging Face UperNet folder, a training
            checkpoint, a run folder, a format `upernet convert` reads, a Hub id).
        num_classes: the class count of the new data.
        args: constructor arguments laid over the source's (e.g. `{"backbone_args": {"drop_path_rate": 0.2}}`),
            when `name` is None or the source's variant (the arguments of another variant do not apply).
        name: the variant `args` belong to.
        in_channels: input channels of the new model; an RGB source's input conv is adapted to them.

    Returns:
        (the model in train mode, what was copied and re-initialised, the source model's meta).
    """
    with torch.random.fork_rng():  # building the source must not shift the seeded initialisation of the new model
        origin = load_model(source)
    if not getattr(origin, "config", None) or hasattr(origin, "tasks"):
        raise UserError(f"{source}: model.init_from takes a single-task UPerNet (this model cannot describe its "
                        f"architecture for a new class count)")
    base = {k: v for k, v in origin.config["args"].items() if k != "num_classes"}
    own_args = name is None or name == origin.config["name"]
    changes = {k: v for k, v in (args or {}).items() if k != "num_classes"} if own_args else {}
    if in_channels != 3:
        changes["in_channels"] = in_channels
    model = build_model(origin.config["name"], **merged_args(base, changes), num_classes=num_classes)
    fitted = copy_fitting_weights(model, origin.state_dict(), str(source))
    return model.train(), fitted, dict(getattr(origin, "meta", None) or {})


__all__ = ["init_from", "load_with_recipe", "push_to_hub", "save_huggingface", "run_record", "stored_recipe", "load_model", "hub_id", "download_from_hub", "load_from_hub", "save_model", "build_from_config", "is_training_checkpoint", "run_checkpoint"]
