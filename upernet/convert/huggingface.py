"""Hugging Face `UperNetForSemanticSegmentation` folders (ConvNeXt or Swin backbone) -> our UPerNet.

A folder holds `config.json` (model_type "upernet", with a `backbone_config`) and the weights
(`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`). The
architecture is read from the config and built by name through `build_model` (so the result saves
and reloads like any of our models); every tensor is then renamed through the key tables below and
loaded strictly. Both key layouts are accepted: the one `save_pretrained` writes and the Hub holds
(`attention.self.query`, `intermediate.dense`, ...), and the module names of transformers >= 5
(`attention.q_proj`, `mlp.fc1`, `backbone.swin.encoder`, ...).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import MissingFile, UserError
from ..models.registry import build_model
from ..models.upernet import UPerNet
from ..io import load_torch_file, read_json
from .common import Rule, load_converted
from .mmseg import WB, conv_bn


def _conv_module(source: str, target: str) -> list[Rule]:
    """HF's `UperNetConvModule` (`conv` + `batch_norm`) -> our `ConvBNReLU` named `target`."""
    return conv_bn(rf"{source}\.conv", rf"{source}\.batch_norm", target)


HEAD_RULES: list[Rule] = [
    *_conv_module(r"decode_head\.psp_modules\.(\d+)\.1", r"decode_head.ppm.\1"),  # PPM branch: [pool, conv module]
    *_conv_module(r"decode_head\.bottleneck", "decode_head.ppm_bottleneck"),
    *_conv_module(r"decode_head\.lateral_convs\.(\d+)", r"decode_head.lateral_convs.\1"),
    *_conv_module(r"decode_head\.fpn_convs\.(\d+)", r"decode_head.fpn_convs.\1"),
    *_conv_module(r"decode_head\.fpn_bottleneck", "decode_head.fusion"),
    (rf"decode_head\.classifier\.{WB}", r"decode_head.classifier.\g<p>"),
    *_conv_module(r"auxiliary_head\.convs\.(\d+)", r"aux_head.convs.\1"),
    (rf"auxiliary_head\.classifier\.{WB}", r"aux_head.classifier.\g<p>"),
]

# HF ConvNextBackbone -> timm's ConvNeXt (features_only, under `backbone.body`) + our output norms.
CONVNEXT_RULES: list[Rule] = [
    (rf"backbone\.embeddings\.patch_embeddings\.{WB}", r"backbone.body.stem_0.\g<p>"),
    (rf"backbone\.embeddings\.layernorm\.{WB}", r"backbone.body.stem_1.\g<p>"),
    (rf"backbone\.encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.{WB}", r"backbone.body.stages_\1.downsample.\2.\g<p>"),
    (rf"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.{WB}", r"backbone.body.stages_\1.blocks.\2.conv_dw.\g<p>"),
    (rf"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.{WB}", r"backbone.body.stages_\1.blocks.\2.norm.\g<p>"),
    (rf"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.{WB}", r"backbone.body.stages_\1.blocks.\2.mlp.fc1.\g<p>"),
    (rf"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.{WB}", r"backbone.body.stages_\1.blocks.\2.mlp.fc2.\g<p>"),
    (r"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"backbone.body.stages_\1.blocks.\2.gamma"),
    *[(rf"backbone\.hidden_states_norms\.stage{i + 1}\.{WB}", rf"backbone.output_norms.{i}.\g<p>") for i in range(4)],
]

# HF SwinBackbone -> our SwinTransformer. Query, key and value land on temporary `.q/.k/.v` names
# and are then stacked into our fused `qkv` projection by `fuse_qkv`.
_SWIN = r"backbone\.(?:swin\.)?"  # transformers >= 5 nests the modules under `swin.`; the files do not
_BLOCK = _SWIN + r"encoder\.layers\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\."
_OUR_BLOCK = r"backbone.stages.\g<s>.blocks.\g<b>."
SWIN_RULES: list[Rule] = [
    (rf"{_SWIN}embeddings\.patch_embeddings\.projection\.{WB}", r"backbone.patch_embed.proj.\g<p>"),
    (rf"{_SWIN}embeddings\.norm\.{WB}", r"backbone.patch_embed.norm.\g<p>"),
    (rf"{_BLOCK}layernorm_before\.{WB}", _OUR_BLOCK + r"norm1.\g<p>"),
    (rf"{_BLOCK}layernorm_after\.{WB}", _OUR_BLOCK + r"norm2.\g<p>"),
    (rf"{_BLOCK}attention\.(?:self\.query|q_proj)\.{WB}", _OUR_BLOCK + r"attn.q.\g<p>"),
    (rf"{_BLOCK}attention\.(?:self\.key|k_proj)\.{WB}", _OUR_BLOCK + r"attn.k.\g<p>"),
    (rf"{_BLOCK}attention\.(?:self\.value|v_proj)\.{WB}", _OUR_BLOCK + r"attn.v.\g<p>"),
    (rf"{_BLOCK}attention\.(?:output\.dense|o_proj)\.{WB}", _OUR_BLOCK + r"attn.proj.\g<p>"),
    (rf"{_BLOCK}attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
     _OUR_BLOCK + "attn.relative_position_bias_table"),
    (rf"{_BLOCK}attention\.(?:self|relative_position_bias)\.relative_position_index", None),  # recomputed
    (rf"{_BLOCK}(?:intermediate\.dense|mlp\.fc1)\.{WB}", _OUR_BLOCK + r"mlp.fc1.\g<p>"),
    (rf"{_BLOCK}(?:output\.dense|mlp\.fc2)\.{WB}", _OUR_BLOCK + r"mlp.fc2.\g<p>"),
    (rf"{_SWIN}encoder\.layers\.(\d+)\.downsample\.norm\.{WB}", r"backbone.stages.\1.downsample.norm.\g<p>"),
    (rf"{_SWIN}encoder\.layers\.(\d+)\.downsample\.reduction\.weight", r"backbone.stages.\1.downsample.reduction.weight"),
    (rf"{_SWIN}layernorm\.{WB}", None),  # the classifier's final norm; SwinBackbone never uses it
    *[(rf"backbone\.hidden_states_norms\.stage{i + 1}\.{WB}", rf"backbone.output_norms.{i}.\g<p>") for i in range(4)],
]

BACKBONES = {"convnext": CONVNEXT_RULES, "swin": SWIN_RULES}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def detect(path: Path) -> bool:
    """A folder whose config.json says model_type "upernet"."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "upernet"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _require(condition: bool, config_file: Path, message: str) -> None:
    if not condition:
        raise UserError(f"{config_file}: {message}")


def _convnext_args(bb: dict, config_file: Path) -> tuple[str, dict]:
    """HF ConvNextConfig -> (variant name, backbone_args of timm's ConvNeXt)."""
    _require(bb.get("hidden_act", "gelu") == "gelu", config_file, f"ConvNeXt hidden_act {bb.get('hidden_act')!r} is not supported (only 'gelu')")
    dims, depths = list(bb.get("hidden_sizes", [96, 192, 384, 768])), list(bb.get("depths", [3, 3, 9, 3]))
    layer_scale = bb.get("layer_scale_init_value", 1e-6)
    args = {"dims": dims, "depths": depths, "patch_size": bb.get("patch_size", 4), "in_chans": bb.get("num_channels", 3),
            "ls_init_value": layer_scale if layer_scale > 0 else None, "drop_path_rate": bb.get("drop_path_rate", 0.0)}
    sizes = {"tiny": ([96, 192, 384, 768], [3, 3, 9, 3]), "small": ([96, 192, 384, 768], [3, 3, 27, 3]),
             "base": ([128, 256, 512, 1024], [3, 3, 27, 3]), "large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
             "xlarge": ([256, 512, 1024, 2048], [3, 3, 27, 3])}
    size = next((s for s, arch in sizes.items() if arch == (dims, depths)), "tiny")
    return f"upernet_convnext_{size}", args


def _swin_args(bb: dict, config_file: Path) -> tuple[str, dict]:
    """HF SwinConfig -> (variant name, backbone_args of our SwinTransformer)."""
    _require(not bb.get("use_absolute_embeddings", False), config_file, "Swin with use_absolute_embeddings is not supported")
    _require(bb.get("hidden_act", "gelu") == "gelu", config_file, f"Swin hidden_act {bb.get('hidden_act')!r} is not supported (only 'gelu')")
    _require(bb.get("layer_norm_eps", 1e-5) == 1e-5, config_file, f"Swin layer_norm_eps {bb.get('layer_norm_eps')} is not supported (only 1e-5)")
    args = {"embed_dim": bb.get("embed_dim", 96), "depths": list(bb.get("depths", [2, 2, 6, 2])),
            "num_heads": list(bb.get("num_heads", [3, 6, 12, 24])), "window_size": bb.get("window_size", 7),
            "mlp_ratio": bb.get("mlp_ratio", 4.0), "patch_size": bb.get("patch_size", 4),
            "in_chans": bb.get("num_channels", 3), "qkv_bias": bb.get("qkv_bias", True),
            "drop_path_rate": bb.get("drop_path_rate", 0.1)}
    sizes = {"tiny": (96, [2, 2, 6, 2]), "small": (96, [2, 2, 18, 2]), "base": (128, [2, 2, 18, 2]), "large": (192, [2, 2, 18, 2])}
    size = next((s for s, arch in sizes.items() if arch == (args["embed_dim"], args["depths"])), "tiny")
    return f"upernet_swin_{size}", args


def _head_args(config: dict, aux_in_channels: int, config_file: Path) -> dict:
    """UperNetConfig head fields -> our UPerNet arguments."""
    _require(not config.get("auxiliary_concat_input", False), config_file,
             "auxiliary_concat_input=True (FCN head concatenating its input) is not supported")
    aux = config.get("use_auxiliary_head", True)
    if aux and config.get("auxiliary_in_channels") not in (None, aux_in_channels):
        raise UserError(f"{config_file}: auxiliary_in_channels {config['auxiliary_in_channels']} differs from the "
                         f"{aux_in_channels} channels of the backbone level the auxiliary head reads (stage3)")
    return {"channels": config.get("hidden_size", 512), "pool_scales": list(config.get("pool_scales", [1, 2, 3, 6])),
            "aux_head": aux, "aux_level": 2, "aux_channels": config.get("auxiliary_channels", 256),
            "aux_num_convs": config.get("auxiliary_num_convs", 1), "aux_loss_weight": config.get("auxiliary_loss_weight", 0.4)}


def _class_names(config: dict, num_classes: int) -> list[str] | None:
    """id2label as a list, unless it is transformers' placeholder LABEL_0, LABEL_1, ..."""
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    names = [id2label.get(i) for i in range(num_classes)]
    if None in names or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return names


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
                return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}, file
            if name.endswith(".safetensors"):
                return load_file(str(file)), file
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise UserError(f"{file}: cannot read the weights ({e})") from None
        return load_torch_file(str(file)), file
    raise MissingFile(f"{folder}: Hugging Face checkpoint folder without weights (expected one of {', '.join(WEIGHT_FILES)})")


def fuse_qkv(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Stack the renamed `attn.q/.k/.v` tensors (HF's separate projections) into our fused `attn.qkv`."""
    fused, groups = {}, {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(.*\.attn)\.([qkv])\.(weight|bias)", key)
        if match:
            groups.setdefault((match[1], match[3]), {})[match[2]] = tensor
        else:
            fused[key] = tensor
    for (prefix, param), parts in groups.items():
        missing = [f"{prefix}.{p}.{param}" for p in "qkv" if p not in parts]
        if missing:
            raise UserError(f"{source}: incomplete query/key/value projections; missing {', '.join(missing)}")
        fused[f"{prefix}.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return fused


def convert_huggingface(path: Path, strict: bool = True) -> UPerNet:
    """Build the UPerNet a Hugging Face UperNet folder describes and load all of its weights (eval mode).

    Args:
        path: the folder with config.json and the weights.
        strict: False loads what fits and logs every skipped or missing key (see `load_converted`).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{folder}: not a Hugging Face checkpoint folder (no config.json in it)")
    config = read_json(config_file)
    _require(config.get("model_type") == "upernet", config_file, f"model_type is {config.get('model_type')!r}, expected 'upernet'")
    bb = config.get("backbone_config") or {}
    family = bb.get("model_type")
    _require(family in BACKBONES, config_file, f"backbone model_type {family!r} is not supported (supported: {', '.join(BACKBONES)})")
    out_features = bb.get("out_features") or STAGES
    _require(list(out_features) == STAGES, config_file, f"backbone out_features {out_features} must be {STAGES}")

    name, backbone_args = (_convnext_args if family == "convnext" else _swin_args)(bb, config_file)
    stage3_channels = (backbone_args["dims"][2] if family == "convnext" else backbone_args["embed_dim"] * 4)
    num_classes = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    model = build_model(name, num_classes=num_classes, backbone_args=backbone_args,
                        **_head_args(config, stage3_channels, config_file))

    state_dict, weights = _read_weights(folder)
    transform = (lambda renamed: fuse_qkv(renamed, str(weights))) if family == "swin" else None
    load_converted(model, state_dict, BACKBONES[family] + HEAD_RULES, str(weights), strict, transform)
    names = _class_names(config, num_classes)
    if names:
        model.meta["class_names"] = names
    return model.eval()
