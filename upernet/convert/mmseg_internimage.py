"""Official InternImage UPerNet checkpoints (OpenGVLab/InternImage, mmsegmentation 0.x) -> our UPerNet.

The backbone keys need no renaming: our InternImage keeps the reference's module names. The heads
are mmsegmentation's UPerHead and FCNHead, renamed by the shared mmsegmentation head table. The
architecture is read from the tensor shapes, except what weights cannot tell: `offset_scale` and
the level-2 post-norm positions come from the config text stored in the checkpoint's meta, else
from the published settings of the matching variant (offset scale 2.0 for L and XL, 1.0 below).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError
from ..models.registry import build_model
from ..models.upernet import UPerNet
from ..io import load_torch_file
from .common import Rule, load_converted, peek_checkpoint
from .mmseg import HEAD_RULES, mmseg_class_meta, mmseg_config_text, mmseg_head_args, unwrap_mmseg

BACKBONE_RULES: list[Rule] = [(r"(backbone\.(?:patch_embed|levels)\..+)", r"\1")]
_PROBE = "backbone.levels.0.blocks.0.dcn.offset.weight"

# (channels, depths) -> (variant, offset_scale) of the published UPerNet models.
PUBLISHED = {
    (64, (4, 4, 18, 4)): ("upernet_internimage_t", 1.0),
    (80, (4, 4, 21, 4)): ("upernet_internimage_s", 1.0),
    (112, (4, 4, 21, 4)): ("upernet_internimage_b", 1.0),
    (160, (5, 5, 22, 5)): ("upernet_internimage_l", 2.0),
    (192, (5, 5, 24, 5)): ("upernet_internimage_xl", 2.0),
}


def detect(path: Path) -> bool:
    """An mmsegmentation UPerNet checkpoint whose backbone has DCNv3 layers (`dcn.offset`)."""
    unwrapped = unwrap_mmseg(peek_checkpoint(path))
    return unwrapped is not None and _PROBE in unwrapped[0]


def _config_value(config_text: str, key: str) -> str | None:
    """The value of `key=value` (a word, a number or a [list]) in an mmsegmentation config text."""
    match = re.search(rf"(?<![\w.]){key}\s*=\s*(\[[^\]]*\]|[\w.]+)", config_text)
    return match[1] if match else None


def internimage_args(state_dict: dict[str, torch.Tensor], config_text: str, source: str) -> tuple[str, dict]:
    """(variant name, InternImage arguments) of the backbone in `state_dict`."""
    def has(suffix: str) -> bool:
        return f"backbone.levels.0.blocks.0.{suffix}" in state_dict

    channels = state_dict["backbone.patch_embed.conv2.weight"].shape[0]
    depths = tuple(len({k.split(".")[4] for k in state_dict if k.startswith(f"backbone.levels.{i}.blocks.")})
                   for i in range(4))
    groups = [state_dict[f"backbone.levels.{i}.blocks.0.dcn.mask.weight"].shape[0] // 9 for i in range(4)]
    name, offset_scale = PUBLISHED.get((channels, depths), ("upernet_internimage_t", None))
    center_feature_scale = has("dcn.center_feature_scale_proj_weight")
    if center_feature_scale:  # then every level has its final norm whatever post_norm is
        post_norm = _config_value(config_text, "post_norm") == "True"
    else:
        post_norm = "backbone.levels.0.norm.0.weight" not in state_dict
    text_scale = _config_value(config_text, "offset_scale")
    if text_scale is not None:
        offset_scale = float(text_scale)
    if offset_scale is None:
        raise UserError(f"{source}: cannot tell the offset_scale of this InternImage (channels {channels}, depths "
                         f"{list(depths)}): it is not a published variant and the meta has no config text")
    args = {
        "channels": channels, "depths": list(depths), "groups": groups, "offset_scale": offset_scale,
        "post_norm": post_norm, "layer_scale": 1.0 if has("gamma1") else None,
        "mlp_ratio": state_dict["backbone.levels.0.blocks.0.mlp.fc1.weight"].shape[0] / channels,
        "res_post_norm": has("res_post_norm1.0.weight"), "center_feature_scale": center_feature_scale,
    }
    dw_kernel = state_dict["backbone.levels.0.blocks.0.dcn.dw_conv.0.weight"].shape[-1]
    if dw_kernel != 3:
        args["dw_kernel_size"] = dw_kernel
    post_norms = {int(k.split(".")[4]) for k in state_dict if k.startswith("backbone.levels.2.post_norms.")}
    if post_norms:
        ids = _config_value(config_text, "level2_post_norm_block_ids")
        if ids is None:
            raise UserError(f"{source}: level 2 has {len(post_norms)} extra post-norms but the meta has no config "
                             f"text saying after which layers (level2_post_norm_block_ids)")
        args.update(level2_post_norm=True, level2_post_norm_block_ids=[int(v) for v in re.findall(r"\d+", ids)])
    return name, args


def convert_internimage(path: Path, strict: bool = True) -> UPerNet:
    """Build the UPerNet of an official InternImage checkpoint file and load its weights (eval mode).

    Args:
        path: the `.pth` file.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
    """
    source = str(path)
    unwrapped = unwrap_mmseg(load_torch_file(source))
    if unwrapped is None or _PROBE not in unwrapped[0]:
        raise UserError(f"{source}: not an InternImage UPerNet checkpoint (no state_dict with {_PROBE})")
    state_dict, meta = unwrapped
    name, backbone_args = internimage_args(state_dict, mmseg_config_text(meta), source)
    channels = [backbone_args["channels"] * 2**i for i in range(4)]
    num_classes = state_dict["decode_head.conv_seg.weight"].shape[0]
    model = build_model(name, num_classes=num_classes, backbone_args=backbone_args,
                        **mmseg_head_args(state_dict, channels, source))
    load_converted(model, state_dict, BACKBONE_RULES + HEAD_RULES, source, strict)
    model.meta.update(mmseg_class_meta(meta, num_classes))
    return model.eval()
