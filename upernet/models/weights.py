"""Our checkpoint format: a folder with `config.json` (what rebuilds the model) + `model.safetensors`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv

from ..errors import UserError
from ..io import atomic_write, read_json, write_text
from .registry import build_model

FORMAT = "upernet"
FORMAT_VERSION = 1


def model_config(model: nn.Module) -> dict:
    """The JSON-able description that `build_model` turns back into this architecture."""
    if not model.config:
        raise ValueError("this model was not built by `build_model`, so it cannot describe itself for saving")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config["name"],
            "model_args": model.config["args"], "meta": model.meta}


def save_model(model: nn.Module, path: str | os.PathLike, recipe: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Save `model` into the folder `path` (created if needed) with its model card; returns the folder.

    Args:
        model: built by `build_model` (its `config` rebuilds it).
        path: the folder.
        recipe: the training recipe (a run's config.yaml as a dict), quoted in the model card.
        metrics: evaluation results (a run's eval/metrics.json), quoted in the model card.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(model_config(model), indent=2)
    atomic_write(folder / "config.json", lambda p: p.write_text(text))
    write_model_card(model, folder, recipe=recipe, metrics=metrics)
    return folder


# ---- the model card (README.md beside the weights) ------------------------------------------------
CARD_PLACEHOLDER = "path/to/this/folder"  # replaced by the repo id on `push_to_hub`
LABEL_PROTOCOLS = {
    "ade20k": "ADE20K annotation value 0 (\"other\") is ignored (255); value v is class v-1 (150 classes).",
    "cityscapes": "Cityscapes train ids (19 classes); every other label id is ignored (255).",
    "voc": "Pascal VOC class indices with background as class 0; border pixels (255) are ignored.",
}


def model_card(model: nn.Module, layout: str = "upernet", recipe: dict | None = None, metrics: dict | None = None,
               repo_id: str = "", notes: str = "") -> str:
    """A short README.md for a saved model: architecture, classes, label and test-time protocol, the
    training recipe and metrics when known, and how to load it in upernet and in transformers."""
    config, meta = model.config or {}, model.meta or {}
    name = config.get("name", type(model).__name__)
    classes = meta.get("class_names") or [f"class_{i}" for i in range(getattr(model, "num_classes", 0))]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = repo_id or CARD_PLACEHOLDER
    tags = ["image-segmentation", "upernet"] + (["transformers"] if layout == "huggingface" else [])
    lines = ["---", f"library_name: {'transformers' if layout == 'huggingface' else 'upernet'}",
             "pipeline_tag: image-segmentation", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {name}", "",
             f"UPerNet semantic segmentation, variant `{name}` ({params:.1f}M parameters), "
             f"{len(classes)} classes{' (' + layout + ' layout)' if layout != 'upernet' else ''}.", "",
             "## Classes", "", ", ".join(f"{i}: {c}" for i, c in enumerate(classes)), "",
             "## Protocol", ""]
    dataset = meta.get("dataset", "")
    labels = ("mask value 0 is unlabelled (ignored), value v is class v-1 of the list above (reduce_zero_label)."
              if meta.get("reduce_zero_label") else "output channel i is class i of the list above.")
    lines.append(f"- Labels: {LABEL_PROTOCOLS.get(dataset, labels)}")
    lines.append(f"- Test-time resize: {meta.get('test_size', '2048x512 (keep ratio, the default)')}; "
                 f"normalisation mean {meta.get('mean', 'ImageNet')}, std {meta.get('std', 'ImageNet')} (0-255 scale).")
    if meta.get("inference"):
        lines.append(f"- Inference: {json.dumps(meta['inference'])}")
    if recipe:
        lines += ["", "## Training recipe", "", "```json", json.dumps(recipe, indent=1, default=str), "```"]
    scalars = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if scalars:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]]
    if notes:
        lines += ["", "## Differences from upernet's own pipeline", "", notes.rstrip()]
    lines += ["", "## Use", "", "```python"]
    if layout == "huggingface":
        lines += ["from transformers import pipeline", f'segment = pipeline("image-segmentation", model="{where}")',
                  "", "import upernet  # the same weights in upernet", f'model = upernet.load_model("{where}")']
    else:
        lines += ["import upernet", f'model = upernet.load_model("{where}")', "",
                  "# for transformers: upernet convert THIS_FOLDER OUT --to huggingface"]
    lines += ["```", "", f"Command line: `upernet predict --model {where} image.jpg`", ""]
    return "\n".join(lines)


def write_model_card(model: nn.Module, folder: str | os.PathLike, layout: str = "upernet", recipe: dict | None = None,
                     metrics: dict | None = None, notes: str = "") -> Path:
    """Write `model_card(...)` as `folder/README.md`; returns its path."""
    return write_text(Path(folder) / "README.md", model_card(model, layout, recipe, metrics, notes=notes))


def push_to_hub(folder_or_model: str | os.PathLike | nn.Module, repo_id: str, token: str | None = None,
                private: bool = False, revision: str | None = None) -> str:
    """Upload a saved model folder (or a model, saved first) to the Hugging Face Hub; returns the
    commit URL. The token defaults to huggingface_hub's (HF_TOKEN, `hf auth login`).

    Args:
        folder_or_model: one of our model folders, a transformers UperNet folder, or a model.
        repo_id: "org/name"; created (as a model repo) if it does not exist.
        token: a Hub token; None uses the one huggingface_hub finds.
        private: create the repo private.
        revision: the branch to push to (default: main).
    """
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(folder_or_model, nn.Module):
            folder = save_model(folder_or_model, scratch)
        else:
            folder = Path(folder_or_model)
            if not (folder / "config.json").is_file():
                raise UserError(f"{folder}: not a model folder (no config.json); save the model first")
        # One commit of the folder's files, the model card's "how to load" pointing at the repo.
        files = sorted(p for p in folder.iterdir() if p.is_file())
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files if p.name != "README.md"]
        if (folder / "README.md").is_file():
            card = (folder / "README.md").read_text().replace(CARD_PLACEHOLDER, repo_id)
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                                   commit_message="Upload UPerNet model with upernet")
    return str(getattr(commit, "commit_url", commit))


def build_from_config(config: dict) -> nn.Module:
    model = build_model(config["model"], **config.get("model_args", {}))
    model.meta = dict(config.get("meta", {}))
    return model


def input_convs(model: nn.Module) -> dict[str, int]:
    """State-dict names of the conv weights that meet the image, with the channels each takes.

    Every backbone names its input conv (`backbone.input_conv`, a module path inside it), so this
    finds them in a UPerNet, a multi-task model or a bare backbone alike.
    """
    found = {}
    for prefix, module in model.named_modules():
        name = getattr(module, "input_conv", None)
        if isinstance(name, str) and hasattr(module, "in_channels"):
            found[f"{prefix}.{name}.weight" if prefix else f"{name}.weight"] = int(module.in_channels)
    return found


def adapt_input_channels(state_dict: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Fit the input conv weights of `state_dict` (keys as in `model.state_dict()`) to `model`'s
    input channels, in place; returns the names of the adapted tensors.

    A 3-channel (RGB) checkpoint meets a model built with `in_channels` N: timm's `adapt_input_conv`
    rule, as timm does for its own pretrained weights: N = 1 sums the RGB filters; otherwise they are
    repeated to N channels and scaled by 3 / N, so that the response to a grey image is kept.
    """
    adapted = []
    for key, channels in input_convs(model).items():
        weight = state_dict.get(key)
        if weight is None or weight.ndim != 4 or weight.shape[1] == channels:
            continue
        if weight.shape[1] != 3:
            raise UserError(f"{key}: the checkpoint's input conv takes {weight.shape[1]} channels and the model "
                            f"{channels}; only 3-channel (RGB) weights are adapted: build the model with "
                            f"in_channels={weight.shape[1]}")
        state_dict[key] = adapt_input_conv(channels, weight)
        adapted.append(key)
    return adapted


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
