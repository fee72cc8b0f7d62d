"""Our UPerNet (ConvNeXt or Swin backbone) -> a transformers `UperNetForSemanticSegmentation` folder.

The way back uses the import table of `upernet.convert.huggingface` read backwards: transformers
builds the model the config describes, each of its weight names is renamed by the import rules to
the name of ours that holds the same tensor, and that tensor is copied in (Swin's fused `qkv` is cut
back into query, key and value). One table serves both directions, so an export can only write
what the import reads back.

The folder holds what `save_pretrained` writes (config.json with id2label/label2id,
model.safetensors), a `preprocessor_config.json` for `SegformerImageProcessor` (the processor
transformers pairs with UperNet) set to our test-time resize and normalisation, and a README.md
model card saying where the two pipelines differ.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..data.classes import IMAGENET_MEAN, IMAGENET_STD
from ..data.transforms import parse_size
from ..errors import UserError
from ..io import write_json
from .huggingface import BACKBONES, HEAD_RULES, STAGES

QKV = re.compile(r"(?P<prefix>.*\.attn)\.(?P<part>[qkv])\.(?P<param>weight|bias)")


def family_of(model: nn.Module) -> str:
    """"convnext" or "swin": the backbones transformers' UperNet has and we can write."""
    name = (getattr(model, "config", None) or {}).get("name", "")
    for family in BACKBONES:
        if name.startswith(f"upernet_{family}_"):
            return family
    raise UserError(f"model {name or type(model).__name__!r}: only UPerNet with a ConvNeXt or Swin backbone "
                    f"(upernet_convnext_*, upernet_swin_*) can be written for transformers")


def convnext_config(backbone: nn.Module) -> dict:
    """transformers ConvNextConfig fields of our (timm) ConvNeXt backbone, read off its modules."""
    if backbone.output_norms is None:
        raise UserError("a ConvNeXt backbone without output norms has no transformers equivalent")
    body = backbone.body
    stages = [getattr(body, f"stages_{i}") for i in range(4)]
    has_scale = getattr(stages[0].blocks[0], "gamma", None) is not None
    return {"model_type": "convnext", "hidden_sizes": list(backbone.channels), "depths": [len(s.blocks) for s in stages],
            "patch_size": body.stem_0.kernel_size[0], "num_channels": body.stem_0.in_channels,
            "layer_scale_init_value": 1e-6 if has_scale else 0.0, "out_features": STAGES}


def swin_config(backbone: nn.Module) -> dict:
    """transformers SwinConfig fields of our SwinTransformer, read off its modules."""
    first = backbone.stages[0].blocks[0]
    return {"model_type": "swin", "embed_dim": backbone.channels[0], "depths": [len(s.blocks) for s in backbone.stages],
            "num_heads": [s.blocks[0].attn.num_heads for s in backbone.stages], "window_size": first.window_size,
            "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features, "patch_size": backbone.patch_size,
            "num_channels": backbone.patch_embed.proj.in_channels, "qkv_bias": first.attn.qkv.bias is not None,
            "out_features": STAGES}


def class_names(model: nn.Module) -> list[str]:
    names = model.meta.get("class_names") or [f"class_{i}" for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise UserError(f"model meta class_names has {len(names)} entries but the model has {model.num_classes} classes")
    return [str(n) for n in names]


def upernet_config(model: nn.Module) -> dict:
    """The transformers UperNetConfig (as keyword arguments) of our model; refuses what it cannot express."""
    family = family_of(model)
    head = model.decode_head
    unsupported = {"align_corners": head.align_corners, "ppm_upsample_first": head.ppm_upsample_first,
                   "output_align_corners": model.output_align_corners}
    for option, value in unsupported.items():
        if value:
            raise UserError(f"model option {option}=True has no transformers UperNet equivalent")
    if model.aux_head is not None and model.aux_level != 2:
        raise UserError(f"aux_level {model.aux_level}: transformers' auxiliary head reads level 2 (stride 16) only")
    backbone = (convnext_config if family == "convnext" else swin_config)(model.backbone)
    names = class_names(model)
    config = {"backbone_config": backbone, "hidden_size": head.classifier.in_channels,
              "pool_scales": list(head.pool_scales), "use_auxiliary_head": model.aux_head is not None,
              "auxiliary_loss_weight": model.aux_loss_weight, "auxiliary_in_channels": model.backbone.channels[2],
              "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if model.aux_head is not None:
        config["auxiliary_channels"] = model.aux_head.classifier.in_channels
        config["auxiliary_num_convs"] = len(model.aux_head.convs)
    return config


def hf_state_dict(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """`theirs` (a transformers UperNet state dict) with every tensor the import rules map to one of
    `ours` replaced by it; keys the import drops on purpose (recomputed buffers) keep their value."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in BACKBONES[family] + HEAD_RULES]
    out, unmatched = {}, []
    for key, tensor in theirs.items():
        rule = next(((p, r) for p, r in rules if p.fullmatch(key)), None)
        if rule is None:
            unmatched.append(key)
            continue
        pattern, replacement = rule
        if replacement is None:
            out[key] = tensor
            continue
        name = pattern.sub(replacement, key)
        split = QKV.fullmatch(name)
        if split:  # our fused [query; key; value] projection, cut into three
            fused = ours[f"{split['prefix']}.qkv.{split['param']}"]
            out[key] = fused.chunk(3)["qkv".index(split["part"])]
        else:
            out[key] = ours[name]
    if unmatched:
        raise ValueError(f"the import table has no rule for these transformers keys: {', '.join(unmatched[:10])}")
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}


def preprocessor_config(meta: dict) -> dict:
    """`SegformerImageProcessor` settings closest to our test-time resize and normalisation."""
    size = parse_size(meta.get("test_size", "2048x512"))
    if size is None:
        resize = {"do_resize": False}
    elif isinstance(size, int):
        resize = {"do_resize": True, "size": {"shortest_edge": size}}
    else:  # keep ratio within (long, short): transformers' shortest/longest edge rule
        resize = {"do_resize": True, "size": {"shortest_edge": min(size), "longest_edge": max(size)}}
    mean, std = meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD)
    return {"image_processor_type": "SegformerImageProcessor", **resize, "resample": 2,  # PIL bilinear
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [m / 255 for m in mean], "image_std": [s / 255 for s in std], "do_reduce_labels": False}


DIFFERENCES = """\
- Resize: ours is mmsegmentation's keep-ratio rule (long side rounded to the nearest pixel, bilinear
  without antialiasing on float values, rounded to uint8); transformers' `shortest_edge`/`longest_edge`
  rule truncates the long side and its torchvision backend antialiases when it shrinks. Masks can differ
  along edges when the image is resized; at the model's own size they are the same.
- Inference mode: transformers runs the whole image; sliding-window, multi-scale and flip inference
  (`upernet predict --mode slide`, `meta["inference"]`) have no transformers equivalent.
"""


def save_huggingface(model: nn.Module, path: str | os.PathLike, recipe: dict | None = None,
                     metrics: dict | None = None) -> Path:
    """Write `model` (our UPerNet with a ConvNeXt or Swin backbone) as a transformers UperNet folder.

    Args:
        model: built by `build_model`/`load_model` (its `config` names the variant).
        path: the folder (created if needed); returns it.
        recipe: the training recipe, quoted in the model card.
        metrics: evaluation results, quoted in the model card.
    """
    try:
        from transformers import UperNetConfig, UperNetForSemanticSegmentation
    except ImportError:
        raise UserError("writing a transformers folder needs transformers: pip install transformers") from None
    from ..models.weights import write_model_card

    family = family_of(model)
    hf_config = UperNetConfig(**upernet_config(model))
    hf = UperNetForSemanticSegmentation(hf_config).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), hf.state_dict(), family), strict=True)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    write_json(folder / "preprocessor_config.json", preprocessor_config(model.meta))
    write_model_card(model, folder, layout="huggingface", recipe=recipe, metrics=metrics, notes=DIFFERENCES)
    return folder
