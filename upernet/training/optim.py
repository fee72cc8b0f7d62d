"""Optimisers with mmsegmentation's parameter groups, and the poly schedule with linear warmup.

Parameter groups combine two rules:
- weight decay is switched off for the kinds listed in `no_weight_decay` (norm layers, biases,
  every 1-D parameter, position tables);
- layer-wise lr decay gives each backbone parameter a layer id (0 = stem ... `num_layers + 1` =
  head) and the lr scale `decay_rate ** (num_layers + 1 - layer_id)`, exactly as mmsegmentation's
  `LearningRateDecayOptimizerConstructor` (which adds 2 to the configured `num_layers`).

A backbone family plugs in its own layer ids with `register_layer_id`:

    @register_layer_id("internimage", "layer_wise")
    def internimage_layer_id(name: str, num_layers: int, model: nn.Module) -> int: ...

The function receives the parameter's name in the UPerNet model (`backbone.…`, `decode_head.…`),
the configured `num_layers` and the model; the family is matched against the model's name (its
registered variant name, timm `model_name` and backbone class name, lower-cased).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..config import OptimConfig, ScheduleConfig, note

LayerIdFn = Callable[[str, int, nn.Module], int]
_LAYER_ID_FNS: dict[tuple[str, str], LayerIdFn] = {}

POSITION_TABLES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token", "mask_token")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def register_layer_id(family: str, decay_type: str) -> Callable[[LayerIdFn], LayerIdFn]:
    """Register `fn(param_name, num_layers, model) -> layer id` for models whose name contains `family`."""
    if decay_type not in ("stage_wise", "layer_wise"):
        raise UserError(f"decay_type must be stage_wise or layer_wise, got {decay_type!r}")

    def decorator(fn: LayerIdFn) -> LayerIdFn:
        if (family, decay_type) in _LAYER_ID_FNS:
            raise ValueError(f"a {decay_type} layer-id function for {family!r} is already registered")
        _LAYER_ID_FNS[(family, decay_type)] = fn
        return fn

    return decorator


def _block_index(name: str, pattern: str) -> tuple[int, ...] | None:
    match = re.match(pattern, name)
    return tuple(int(g) for g in match.groups()) if match else None


# ---- ConvNeXt (timm names: stem_*, stages_<s>.downsample, stages_<s>.blocks.<b>) ----------------
@register_layer_id("convnext", "stage_wise")
def convnext_stage_id(name: str, num_layers: int, model: nn.Module) -> int:
    """Stem and downsampling layers 0, stage s -> s + 1, everything else (head, output norms) the top."""
    if re.match(r"backbone\.body\.(stem|stages_\d+\.downsample)", name):
        return 0
    stage = _block_index(name, r"backbone\.body\.stages_(\d+)\.")
    return stage[0] + 1 if stage else num_layers + 1


@register_layer_id("convnext", "layer_wise")
def convnext_layer_id(name: str, num_layers: int, model: nn.Module) -> int:
    """mmsegmentation's ConvNeXt layer ids: stage 2 (the deep one) counts a layer per 3 blocks."""
    if re.match(r"backbone\.body\.stem", name):
        return 0
    down = _block_index(name, r"backbone\.body\.stages_(\d+)\.downsample")
    if down:
        return {0: 0, 1: 2, 2: 3}.get(down[0], num_layers)
    block = _block_index(name, r"backbone\.body\.stages_(\d+)\.blocks\.(\d+)\.")
    if block:
        stage, index = block
        return {0: 1, 1: 2, 2: 3 + index // 3}.get(stage, num_layers)
    return num_layers + 1


# ---- Swin (ours: stages.<s>.blocks.<b>, merging at the end of a stage; timm: layers_<s>.*, at the start) --
_SWIN_STAGE = r"backbone\.(?:body\.layers_|stages\.)(\d+)\."


def _swin_depths(model: nn.Module) -> list[int]:
    backbone = model.backbone
    stages = backbone.stages if hasattr(backbone, "stages") else [
        getattr(backbone.body, f"layers_{i}") for i in range(4)]
    return [len(stage.blocks) for stage in stages]


@register_layer_id("swin", "layer_wise")
def swin_layer_id(name: str, num_layers: int, model: nn.Module) -> int:
    """Patch embedding 0, then one id per transformer block counted through the stages (set
    `num_layers` to the total number of blocks: 12 for Swin-T, 24 for S/B/L). A patch merging
    shares the id of the block just before it."""
    if re.match(r"backbone\.(body\.)?(patch_embed|absolute_pos_embed)", name):
        return 0
    stage = _block_index(name, _SWIN_STAGE)
    if stage is None:
        return num_layers + 1
    depths = _swin_depths(model)
    block = _block_index(name, _SWIN_STAGE + r"blocks\.(\d+)\.")
    if block:
        return sum(depths[: block[0]]) + block[1] + 1
    merged_after = stage[0] if ".stages." in name else stage[0] - 1
    return sum(depths[: merged_after + 1])


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", {}) or {}
    return " ".join([str(config.get("name", "")), str(config.get("args", {}).get("model_name", "")),
                     type(getattr(model, "backbone", model)).__name__]).lower()


def find_layer_id_function(model: nn.Module, decay_type: str) -> LayerIdFn | None:
    """The registered layer-id function whose family appears in the model's name, if any."""
    family = _family(model)
    for (name, kind), fn in _LAYER_ID_FNS.items():
        if kind == decay_type and name in family:
            return fn
    return None


def layer_id_function(model: nn.Module, decay_type: str) -> LayerIdFn:
    """The registered layer-id function whose family appears in the model's name."""
    fn = find_layer_id_function(model, decay_type)
    if fn is not None:
        return fn
    family = _family(model)
    known = sorted(f"{name} ({kind})" for name, kind in _LAYER_ID_FNS)
    raise UserError(f"no {decay_type} layer decay is registered for model {family.split()[0]!r}; known families: "
                     f"{', '.join(known)} (set optim.layer_decay_type=none, or register one with "
                     f"upernet.training.optim.register_layer_id)")


def _no_decay(name: str, param: nn.Parameter, in_norm: bool, kinds: list[str]) -> bool:
    return (("norm" in kinds and in_norm) or ("bias" in kinds and name.endswith(".bias"))
            or ("1d" in kinds and param.ndim <= 1)
            or ("pos" in kinds and name.rsplit(".", 1)[-1] in POSITION_TABLES)
            or ("offset" in kinds and ".offset." in name))  # DCNv3's sampling-offset projection


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups keyed by (layer id, decay or not), each with `lr_scale` and `weight_decay`."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    num_layers = cfg.layer_decay_num_layers
    if cfg.layer_decay_type == "auto":  # layer-wise where the backbone has a rule (fine-tuning recipes)
        layer_id = find_layer_id_function(model, "layer_wise")
        if layer_id is None:
            note(f"optim.layer_decay_type=auto: no layer-wise rule for {_family(model).split()[0]!r}; "
                 f"every layer trains at optim.lr")
    else:
        layer_id = layer_id_function(model, cfg.layer_decay_type) if cfg.layer_decay_type != "none" else None
    groups: dict[str, dict] = {}
    for name, param in named:
        no_decay = _no_decay(name, param, id(param) in norm_params, cfg.no_weight_decay)
        lid = layer_id(name, num_layers, model) if layer_id else num_layers + 1
        scale = cfg.layer_decay_rate ** (num_layers + 1 - lid) if layer_id else 1.0
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(key, {"params": [], "param_names": [], "lr_scale": scale, "group_name": key,
                                        "weight_decay": 0.0 if no_decay else cfg.weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups`; each group's `initial_lr` is `lr x lr_scale`."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = g["initial_lr"] = cfg.lr * g["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name must be sgd or adamw, got {cfg.name!r}")


def poly_lr(iteration: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """mmsegmentation's poly lr with linear warmup at a 0-based iteration.

    poly: `(base_lr - min_lr) * (1 - it / iters) ** power + min_lr`; during warmup that value is
    multiplied by `1 - (1 - it / warmup_iters) * (1 - warmup_ratio)`, which starts at `warmup_ratio`.
    """
    progress = min(iteration, cfg.iters) / cfg.iters
    lr = (base_lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    if iteration < cfg.warmup_iters:
        lr *= 1 - (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


class PolySchedule:
    """Sets every group's lr to `poly_lr(iteration, group["initial_lr"])`; `step()` moves to the next."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig):
        self.optimizer = optimizer
        self.cfg = cfg
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = poly_lr(self.iteration, group["initial_lr"], self.cfg)

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()


# ---- InternImage (backbone.levels.<l>.blocks.<b>, the reference's names) -------------------------
@register_layer_id("internimage", "layer_wise")
def internimage_layer_id(name: str, num_layers: int, model: nn.Module) -> int:
    """Layer id for layer-wise lr decay, numbered as InternImage's recipe numbers parameters.

    0 for the stem, 1 + (index of the layer over all levels) for a layer's parameters, the id of a
    level's last layer for its final norm and downsampling (level 3's norm shares level 2's), and
    `num_layers + 1` (full lr) for the heads. The recipes set `num_layers` to sum(depths): 30 (T),
    33 (S, B), 37 (L), 39 (XL).
    """
    depths = model.backbone.depths
    if name.startswith("backbone.patch_embed"):
        return 0
    if not name.startswith("backbone.levels."):
        return num_layers + 1
    parts = name.split(".")
    level = int(parts[2])
    if parts[3] in ("downsample", "norm"):
        return 1 + sum(depths[:min(level, 2) + 1])
    return 1 + sum(depths[:level]) + int(parts[4])
