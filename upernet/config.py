"""The training configuration: typed dataclasses, read from one flat YAML file plus dotted overrides.

A recipe file holds the sections below (`model`, `data`, `optim`, `schedule`, `val`, `train`) and
nothing else: no inheritance, no registry of string types. Every key is checked against the
dataclass fields and their types, so a typo fails with the key and the valid names:

    config = load_config("upernet_r50_ade20k_512x512_160k", ["optim.lr=0.02", "data.batch_size=4"])
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import UserError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class ModelConfig:
    """Which registered variant to build and with what arguments.

    Attributes:
        name: a registered model name (`upernet info --list`).
        args: keyword arguments of the variant, e.g. `{"backbone_args": {"drop_path_rate": 0.3}}`;
            `num_classes` is filled in from the dataset.
        sync_bn: convert BatchNorm to SyncBatchNorm when training on several CUDA processes.
        norm_eval: keep BatchNorm layers in eval mode while training (running statistics are used and
            not updated; mmsegmentation's `norm_eval`).
        backbone_checkpoint: weights the backbone starts from (null: its own initialisation), loaded
            before training (not when resuming): an official InternImage ImageNet checkpoint for the
            InternImage variants (e.g. `internimage_t_1k_224.pth`), otherwise a state dict of the
            backbone alone (keys as in `model.backbone.state_dict()`, optionally under "backbone.").
        in_channels: channels of the input images (3: RGB; 1: grey; N: multi-band TIFFs); the backbone's
            first conv takes that many, adapted from RGB weights (`models.weights.adapt_input_channels`).
    """

    name: str = "upernet_r50"
    args: dict = field(default_factory=dict)
    sync_bn: bool = True
    norm_eval: bool = False
    backbone_checkpoint: Optional[str] = None
    init_from: Optional[str] = None  # a model to start from (folder, HF folder, checkpoint, Hub id); see docs/finetune.md
    in_channels: int = 3  # channels of the input images; data.mean/std need as many entries


@dataclass
class DataConfig:
    """The dataset and its mmsegmentation-style augmentation.

    Attributes:
        kind: ade20k, cityscapes, voc, folder, synthetic or hf (see `upernet.data.build_dataset`); for
            `train.task=multitask`: multitask_synthetic (built-in, old name upp_builtin) or broden.
        root: dataset folder (unused by `synthetic` and `multitask_synthetic`).
        train_split: split name used for training.
        val_split: split name used for validation.
        options: extra arguments of the dataset (class names, palette, reduce_zero_label, sizes, ...).
        crop_size: (H, W) of the training crops (null: whole images).
        scale: (long, short) bound of RandomResize before the ratio is applied, and of the eval resize
            (null: no resizing).
        ratio_range: range of the RandomResize ratio.
        cat_max_ratio: largest share one class may take in a crop (RandomCrop retries up to 10 times).
        flip_prob: probability of a horizontal flip.
        photometric: apply PhotoMetricDistortion.
        mean: per-channel mean of the normalisation, 0-255 scale (`model.in_channels` entries).
        std: per-channel std of the normalisation, 0-255 scale (`model.in_channels` entries).
        batch_size: images per process per step (the total batch is this x processes x accumulate).
        workers: DataLoader worker processes per training process.
    """

    kind: str = "synthetic"
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    options: dict = field(default_factory=dict)
    crop_size: Optional[tuple[int, int]] = (512, 512)
    scale: Optional[tuple[int, int]] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    batch_size: int = 2
    workers: int = 2


@dataclass
class OptimConfig:
    """Optimiser, parameter groups and gradient handling.

    Attributes:
        name: sgd or adamw.
        lr: base learning rate (of the head; layer-wise decay scales the backbone's down).
        momentum: SGD momentum.
        betas: AdamW betas.
        weight_decay: weight decay of the parameters not listed by `no_weight_decay`.
        no_weight_decay: parameter kinds without weight decay: "norm" (normalisation layers),
            "bias", "1d" (every 1-D parameter, mmsegmentation's rule for ConvNeXt), "pos" (position
            tables: relative_position_bias_table, absolute_pos_embed, pos_embed, cls_token), "offset"
            (DCNv3's sampling-offset projection).
        layer_decay_type: none, stage_wise or layer_wise (mmsegmentation's
            LearningRateDecayOptimizerConstructor); auto: layer_wise where the backbone has a rule, else none.
        layer_decay_rate: lr multiplier per layer away from the head.
        layer_decay_num_layers: `num_layers` of the layer-wise decay.
        grad_clip: max global gradient norm (0 disables clipping).
        accumulate: batches whose gradients are summed before each optimiser step.
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    no_weight_decay: list[str] = field(default_factory=list)
    layer_decay_type: str = "none"
    layer_decay_rate: float = 1.0
    layer_decay_num_layers: int = 12
    grad_clip: float = 0.0
    accumulate: int = 1


@dataclass
class ScheduleConfig:
    """Poly learning-rate schedule with linear warmup, per iteration (mmsegmentation's rules).

    Attributes:
        iters: total optimiser steps.
        warmup_iters: length of the linear warmup (0 disables it).
        warmup_ratio: lr factor at the first warmup step.
        power: exponent of the poly decay.
        min_lr: lr reached at the last iteration.
    """

    iters: int = 160000
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    power: float = 0.9
    min_lr: float = 1e-4


@dataclass
class ValConfig:
    """Periodic validation.

    Attributes:
        interval: validate every this many iterations and at the end (0: only at the end).
        mode: whole or slide inference.
        crop_size: window (H, W) of slide inference.
        stride: stride (H, W) of slide inference.
        max_images: validate on the first N images only (0: all).
    """

    interval: int = 16000
    mode: str = "whole"
    crop_size: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    max_images: int = 0


@dataclass
class MultitaskConfig:
    """Settings of multi-task parsing (`train.task=multitask`; ignored by segmentation).

    Attributes:
        loss_weights: weight per task (object, part, material, scene, texture); tasks not named keep
            the model's defaults (the paper's).
        texture_iters: texture-head iterations after `schedule.iters` (backbone and other heads fixed).
        sources: the sources to train and validate on (empty: every source of the data).
    """

    loss_weights: dict[str, float] = field(default_factory=dict)
    texture_iters: int = 0
    sources: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Everything else about the run.

    Attributes:
        task: segmentation (one label map per image) or multitask (Unified Perceptual Parsing: several
            sources, each annotating some of object, part, material, scene, texture; see `multitask`).
        seed: seeds the model initialisation, the data order and every augmentation.
        device: auto, cpu or cuda.
        precision: fp32, bf16 (autocast; CPU or CUDA) or fp16 (autocast + GradScaler, CUDA only).
        loss_average: "valid" (mean over labelled pixels) or "all" (mmsegmentation's default).
        log_interval: write train loss and lr to metrics.jsonl every this many iterations.
        checkpoint_interval: save a checkpoint every this many iterations (and at the end).
        keep_last: periodic checkpoints kept on disk (the best one is kept apart).
        losses: the loss terms, each {name, weight, ...options}, summed (segmentation task; see
            upernet/training/losses.py and docs/training.md); default plain cross-entropy.
    """

    task: str = "segmentation"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    loss_average: str = "valid"
    log_interval: int = 50
    checkpoint_interval: int = 16000
    keep_last: int = 2
    # the training loss: a list of {name, weight, ...options} (cross_entropy, focal, dice, lovasz, binary_cross_entropy)
    losses: list[dict] = field(default_factory=lambda: [{"name": "cross_entropy", "weight": 1.0}])


@dataclass
class Config:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    val: ValConfig = field(default_factory=ValConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


SEGMENTATION_KINDS = ("ade20k", "cityscapes", "voc", "folder", "synthetic", "hf")
MULTITASK_DATA_KINDS = ("multitask_synthetic", "broden")
ROOTLESS_KINDS = ("synthetic", "multitask_synthetic")
CHOICES = {
    "data.kind": SEGMENTATION_KINDS + MULTITASK_DATA_KINDS,
    "train.task": ("segmentation", "multitask"),
    "optim.name": ("sgd", "adamw"),
    "optim.layer_decay_type": ("none", "stage_wise", "layer_wise", "auto"),
    "val.mode": ("whole", "slide"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.loss_average": ("valid", "all"),
}
NO_WEIGHT_DECAY_KINDS = ("norm", "bias", "1d", "pos", "offset")


# Keys and values of older recipes and checkpoints, read as their current spelling (with a note).
RENAMED_KEYS = {"data.options.loss_weights": "multitask.loss_weights",
                "data.options.texture_iters": "multitask.texture_iters",
                "data.options.sources": "multitask.sources"}
RENAMED_VALUES = {"data.kind": {"upp_builtin": "multitask_synthetic"}}

# Every float a person writes: 6e-5, 1E+6, .5, 1_000.5 (YAML 1.1 reads the exponent forms as strings).
FLOAT_TEXT = re.compile(r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?")
SCIENTIFIC_TEXT = re.compile(r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][+-]?\d+")


class ConfigNote(UserWarning):
    """A config value was read differently from how it was written (an old key's new name, an option
    of another dataset kind dropped). One line for the user; the run goes on."""


def note(message: str) -> None:
    """Tell the user about `message` as a `ConfigNote` warning (the CLI prints it as one line)."""
    warnings.warn(message, ConfigNote, stacklevel=2)


def read_float(value: Any) -> float | None:
    """`value` as a float when it is a number or a float's text ("6e-5", "1E+6", ".5"); else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        try:
            return float(value.strip())
        except ValueError:  # misplaced underscores ("1__0")
            return None
    return None


def numbers_in(value: Any) -> Any:
    """Free-form values (model.args, data.options) with scientific-notation strings read as floats."""
    if isinstance(value, dict):
        return {k: numbers_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_in(v) for v in value]
    if isinstance(value, str) and SCIENTIFIC_TEXT.fullmatch(value.strip()):
        return read_float(value)
    return value


# ---- reading -----------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (YAML lists become tuples where a tuple is typed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as e:
                errors.append(str(e))
        raise UserError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = read_float(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            if origin is dict:
                _, value_type = typing.get_args(tp)
                return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
            return numbers_in(dict(value))
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # any length
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - every field type is handled above
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _fields(obj: Any) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass instance."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _unknown(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r}.{hint} Valid keys here: {', '.join(valid)}")


def _apply(config: Config, path: str, value: Any) -> None:
    """Set the dotted `path` (e.g. `optim.lr` or `model.args.backbone_args.depths`) to `value`."""
    if path in RENAMED_KEYS:
        note(f"{path} is now {RENAMED_KEYS[path]}; read as such")
        path = RENAMED_KEYS[path]
    if isinstance(value, str) and value in RENAMED_VALUES.get(path, {}):
        note(f"{path}={value} is now {path}={RENAMED_VALUES[path][value]}; read as such")
        value = RENAMED_VALUES[path][value]
    if path == "data.options" and isinstance(value, dict):
        value = dict(value)
        for old in [k for k in value if f"data.options.{k}" in RENAMED_KEYS]:
            _apply(config, f"data.options.{old}", value.pop(old))
    parts = path.split(".")
    section_names = [f.name for f in dataclasses.fields(config)]
    if parts[0] not in section_names:
        raise _unknown(path, section_names)
    section = getattr(config, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping of {', '.join(_fields(section))}, got {value!r}")
        for k, v in value.items():
            _apply(config, f"{path}.{k}", v)
        return
    hints = _fields(section)
    name = parts[1]
    if name not in hints:
        raise _unknown(path, list(hints))
    if len(parts) == 2:
        value = _coerce(value, hints[name], path)
        choices = CHOICES.get(path)
        if choices and value not in choices:
            raise UserError(f"{path}: {value!r} is not one of {', '.join(choices)}")
        if path == "optim.no_weight_decay":
            bad = [v for v in value if v not in NO_WEIGHT_DECAY_KINDS]
            if bad:
                raise UserError(f"{path}: unknown kinds {bad}; valid: {', '.join(NO_WEIGHT_DECAY_KINDS)}")
        setattr(section, name, value)
        return
    # Deeper paths only go into free-form dicts (model.args, data.options).
    target = getattr(section, name)
    if not isinstance(target, dict):
        raise UserError(f"{path}: {parts[0]}.{name} is a {_type_name(hints[name])}, it has no sub-keys")
    for part in parts[2:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise UserError(f"{path}: {part!r} is not a mapping")
    target[parts[-1]] = numbers_in(value)


def parse_override(text: str) -> tuple[str, Any]:
    """`"optim.lr=0.02"` -> ("optim.lr", 0.02); the value is read as YAML (`[512,512]`, `true`, ...)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value (e.g. optim.lr=0.02)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.strip(), value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> Config:
    """A checked `Config` from a nested dict (as read from YAML) and `key=value` overrides."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(f.name for f in dataclasses.fields(Config))})")
    config = Config()
    try:
        for key, value in data.items():
            _apply(config, str(key), value)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    task_given = isinstance(data.get("train"), dict) and "task" in data["train"]
    for text in overrides:
        key, value = parse_override(text)
        _apply(config, key, value)
        task_given = task_given or key == "train.task" or (key == "train" and isinstance(value, dict) and "task" in value)
    if not task_given and config.data.kind in MULTITASK_DATA_KINDS:  # recipes from before train.task
        config.train.task = "multitask"
    validate(config)
    return config


def list_recipes() -> list[str]:
    """The names of the recipes that ship with the package (`upernet train NAME`)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(path: str | Path | None) -> Path:
    """A recipe file: an existing path, else a built-in recipe by name (`builtin`, `multitask_builtin`,
    `upernet_r50_ade20k_512x512_160k`, with or without `.yaml` or a `configs/` folder in front)."""
    if path is None:
        return BUILTIN_CONFIG
    given = Path(path)
    if given.is_file():
        return given
    name = given.name.removesuffix(".yaml").removesuffix(".yml")
    name = RECIPE_ALIASES.get(name, name)
    if (RECIPES / f"{name}.yaml").is_file():
        return RECIPES / f"{name}.yaml"
    close = difflib.get_close_matches(name, list_recipes(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; built-in recipes: {', '.join(list_recipes())}"
    raise UserError(f"{path}: no such recipe file or built-in recipe name{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe YAML (a file, or a built-in recipe's name; default the built-in synthetic one)
    and apply dotted overrides."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(data, overrides, source=str(path))


def validate(config: Config) -> None:
    """Cross-field checks that the types alone do not catch."""
    positive = {"schedule.iters": config.schedule.iters, "data.batch_size": config.data.batch_size,
                "optim.accumulate": config.optim.accumulate, "train.log_interval": config.train.log_interval,
                "train.checkpoint_interval": config.train.checkpoint_interval, "train.keep_last": config.train.keep_last}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    if config.schedule.warmup_iters < 0:
        raise UserError(f"schedule.warmup_iters must be at least 0, got {config.schedule.warmup_iters}")
    if config.val.mode == "slide" and (config.val.crop_size is None or config.val.stride is None):
        raise UserError("val.mode=slide needs val.crop_size and val.stride")
    if config.optim.lr <= 0:
        raise UserError(f"optim.lr must be positive, got {config.optim.lr}")
    if config.multitask.texture_iters < 0:
        raise UserError(f"multitask.texture_iters must be at least 0, got {config.multitask.texture_iters}")
    if config.model.in_channels < 1:
        raise UserError(f"model.in_channels must be at least 1, got {config.model.in_channels}")
    for key in ("mean", "std"):
        values = getattr(config.data, key)
        if len(values) != config.model.in_channels:
            raise UserError(f"data.{key} has {len(values)} entries but model.in_channels={config.model.in_channels}: "
                            f"give one per input channel, e.g. data.{key}=[{', '.join(['...'] * config.model.in_channels)}]")
    kinds = MULTITASK_DATA_KINDS if config.train.task == "multitask" else SEGMENTATION_KINDS
    if config.data.kind not in kinds:
        raise UserError(f"data.kind={config.data.kind} is not a dataset of train.task={config.train.task}; "
                        f"use one of {', '.join(kinds)}")
    if config.model.init_from and config.train.task != "segmentation":
        raise UserError(f"model.init_from={config.model.init_from} is for train.task=segmentation; use "
                        f"model.backbone_checkpoint for train.task={config.train.task}")
    if config.model.init_from and config.model.backbone_checkpoint:
        raise UserError("model.init_from and model.backbone_checkpoint both set: the whole model of init_from already "
                        "holds a backbone; keep one of them")



def to_dict(config: Config) -> dict:
    """Plain dicts/lists/numbers (tuples become lists): what YAML, JSON and `weights_only` loading take."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `crop_size: [512, 512]`."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (it loads back with `load_config`)."""
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with `load_config`)."""
    Path(path).write_text(dump_config(config))


RECIPES = Path(__file__).resolve().parent / "configs"
BUILTIN_CONFIG = RECIPES / "builtin.yaml"
RECIPE_ALIASES = {"upp_builtin": "multitask_builtin"}  # old recipe names
