"""mmsegmentation 0.x / 1.x UPerNet checkpoints (`{"meta", "state_dict"}`) -> our UPerNet.

Backbones: ResNetV1c (output stride 32, 16 or 8), Swin (mmsegmentation's layout: `stages`,
`attn.w_msa`, `ffn.layers`, patch merging in nn.Unfold channel order) and ConvNeXt (mmpretrain's
layout with the output norms `norm0..3`); the auxiliary FCN head when present. The architecture
is read from the tensor shapes; the output stride of a ResNet (which the weights cannot tell) from
the config text stored in the checkpoint's meta, else `output_stride` (default 32, the published
mmsegmentation UPerNet ResNets). Class names and palette come from the meta when it has them.
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

BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
WB = r"(?P<p>weight|bias)"


def conv_bn(conv: str, bn: str, target: str) -> list[Rule]:
    """Rules for one conv (no bias) + BatchNorm pair -> our `ConvBNReLU` named `target`."""
    return [(rf"{conv}\.weight", rf"{target}.conv.weight"), (rf"{bn}\.{BN}", rf"{target}.bn.\g<p>")]


def resnet_v1c_rules(prefix: str) -> list[Rule]:
    """mmsegmentation's ResNetV1c under `prefix` (also sssegmentation's ResNet) -> timm's resnet*c.

    Both have the same deep stem Sequential (conv, bn, relu) x 3; timm keeps the last BatchNorm
    outside it as `bn1`. The residual stages have identical names.
    """
    return [
        (rf"{prefix}stem\.([0-6])\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"backbone.body.conv1.\1.\2"),
        (rf"{prefix}stem\.7\.{BN}", r"backbone.body.bn1.\g<p>"),
        (rf"{prefix}(layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01])\.\w+)", r"backbone.body.\1"),
    ]


def resnet_depth(keys: list[str], prefix: str, source: str) -> int:
    """50 or 101, from the number of bottleneck blocks of the third stage."""
    blocks = {int(m[1]) for k in keys if (m := re.match(rf"{re.escape(prefix)}layer3\.(\d+)\.conv3\.weight$", k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise UserError(f"{source}: a ResNet with {len(blocks)} bottleneck blocks in stage 3; supported: ResNet-50 (6) "
                         f"and ResNet-101 (23)")
    return depth


def resnet_variant(depth: int, output_stride: int) -> str:
    """Our registered name of a ResNet V1c UPerNet: upernet_r50, upernet_r101_d8, ..."""
    if output_stride not in (8, 16, 32):
        raise UserError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return f"upernet_r{depth}" + ("" if output_stride == 32 else f"_d{output_stride}")


HEAD_RULES: list[Rule] = [
    *conv_bn(r"decode_head\.psp_modules\.(\d+)\.1\.conv", r"decode_head\.psp_modules\.(\d+)\.1\.bn", r"decode_head.ppm.\1"),
    *conv_bn(r"decode_head\.bottleneck\.conv", r"decode_head\.bottleneck\.bn", "decode_head.ppm_bottleneck"),
    *conv_bn(r"decode_head\.lateral_convs\.(\d+)\.conv", r"decode_head\.lateral_convs\.(\d+)\.bn", r"decode_head.lateral_convs.\1"),
    *conv_bn(r"decode_head\.fpn_convs\.(\d+)\.conv", r"decode_head\.fpn_convs\.(\d+)\.bn", r"decode_head.fpn_convs.\1"),
    *conv_bn(r"decode_head\.fpn_bottleneck\.conv", r"decode_head\.fpn_bottleneck\.bn", "decode_head.fusion"),
    (rf"decode_head\.conv_seg\.{WB}", r"decode_head.classifier.\g<p>"),
    *conv_bn(r"auxiliary_head\.convs\.(\d+)\.conv", r"auxiliary_head\.convs\.(\d+)\.bn", r"aux_head.convs.\1"),
    (rf"auxiliary_head\.conv_seg\.{WB}", r"aux_head.classifier.\g<p>"),
]

# mmpretrain's ConvNeXt (downsample_layers + stages, Linear pointwise convs) -> timm's convnext.
CONVNEXT_RULES: list[Rule] = [
    (rf"backbone\.downsample_layers\.0\.0\.{WB}", r"backbone.body.stem_0.\g<p>"),
    (rf"backbone\.downsample_layers\.0\.1\.{WB}", r"backbone.body.stem_1.\g<p>"),
    (rf"backbone\.downsample_layers\.([1-3])\.([01])\.{WB}", r"backbone.body.stages_\1.downsample.\2.\g<p>"),
    (rf"backbone\.stages\.(\d)\.(\d+)\.depthwise_conv\.{WB}", r"backbone.body.stages_\1.blocks.\2.conv_dw.\g<p>"),
    (rf"backbone\.stages\.(\d)\.(\d+)\.norm\.{WB}", r"backbone.body.stages_\1.blocks.\2.norm.\g<p>"),
    (rf"backbone\.stages\.(\d)\.(\d+)\.pointwise_conv1\.{WB}", r"backbone.body.stages_\1.blocks.\2.mlp.fc1.\g<p>"),
    (rf"backbone\.stages\.(\d)\.(\d+)\.pointwise_conv2\.{WB}", r"backbone.body.stages_\1.blocks.\2.mlp.fc2.\g<p>"),
    (r"backbone\.stages\.(\d)\.(\d+)\.gamma", r"backbone.body.stages_\1.blocks.\2.gamma"),
    (rf"backbone\.norm([0-3])\.{WB}", r"backbone.output_norms.\1.\g<p>"),
]

# mmsegmentation's Swin -> ours. Their patch-merging weights are in nn.Unfold order: see `_from_unfold_order`.
_BLOCK, _OUR_BLOCK = r"backbone\.stages\.(?P<s>\d)\.blocks\.(?P<b>\d+)\.", r"backbone.stages.\g<s>.blocks.\g<b>."
SWIN_RULES: list[Rule] = [
    (rf"backbone\.patch_embed\.projection\.{WB}", r"backbone.patch_embed.proj.\g<p>"),
    (rf"backbone\.patch_embed\.norm\.{WB}", r"backbone.patch_embed.norm.\g<p>"),
    (rf"{_BLOCK}norm([12])\.{WB}", _OUR_BLOCK + r"norm\3.\g<p>"),
    (rf"{_BLOCK}attn\.w_msa\.qkv\.{WB}", _OUR_BLOCK + r"attn.qkv.\g<p>"),
    (rf"{_BLOCK}attn\.w_msa\.proj\.{WB}", _OUR_BLOCK + r"attn.proj.\g<p>"),
    (rf"{_BLOCK}attn\.w_msa\.relative_position_bias_table", _OUR_BLOCK + r"attn.relative_position_bias_table"),
    (rf"{_BLOCK}attn\.w_msa\.relative_position_index", None),  # recomputed from the window size
    (rf"{_BLOCK}attn_mask", None),  # recomputed for every input size
    (rf"{_BLOCK}ffn\.layers\.0\.0\.{WB}", _OUR_BLOCK + r"mlp.fc1.\g<p>"),
    (rf"{_BLOCK}ffn\.layers\.1\.{WB}", _OUR_BLOCK + r"mlp.fc2.\g<p>"),
    (rf"backbone\.stages\.(\d)\.downsample\.norm\.{WB}", r"backbone.stages.\1.downsample.norm.\g<p>"),
    (r"backbone\.stages\.(\d)\.downsample\.reduction\.weight", r"backbone.stages.\1.downsample.reduction.weight"),
    (rf"backbone\.norm([0-3])\.{WB}", r"backbone.output_norms.\1.\g<p>"),
]


def _from_unfold_order(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder the 4C patch-merging channels from nn.Unfold's (c, dy, dx) to ours ((dy, dx) blocks of C).

    nn.Unfold puts channel c of neighbour (dy, dx) at c * 4 + 2 * dy + dx; our merging concatenates the
    neighbours (0,0), (1,0), (0,1), (1,1), so position k * C + c reads c * 4 + [0, 2, 1, 3][k].
    """
    out = dict(state_dict)
    for key, tensor in state_dict.items():
        if re.fullmatch(r"backbone\.stages\.\d\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", key):
            c = tensor.shape[-1] // 4
            order = torch.tensor([0, 2, 1, 3]).repeat_interleave(c) + 4 * torch.arange(c).repeat(4)
            out[key] = tensor[..., order]
    return out


def unwrap_mmseg(checkpoint: object) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state_dict, meta) of an mmsegmentation UPerNet checkpoint, else None."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return None
    state_dict = checkpoint["state_dict"]
    if "decode_head.fpn_bottleneck.conv.weight" not in state_dict:
        return None
    return state_dict, checkpoint.get("meta") or {}


def mmseg_config_text(meta: dict) -> str:
    """The training config text an mmsegmentation checkpoint's meta carries ("" when it has none)."""
    return str(meta.get("config") or meta.get("cfg") or "")


def mmseg_class_meta(meta: dict, num_classes: int) -> dict:
    """Class names and palette from an mmsegmentation checkpoint's meta (0.x: CLASSES/PALETTE, 1.x:
    dataset_meta), each only when it has one entry per class."""
    dataset_meta = meta.get("dataset_meta") or {}
    names, palette = meta.get("CLASSES") or dataset_meta.get("classes"), meta.get("PALETTE") or dataset_meta.get("palette")
    found: dict = {}
    if names and len(names) == num_classes:
        found["class_names"] = [str(n) for n in names]
    if palette and len(palette) == num_classes:
        found["palette"] = [[int(v) for v in c] for c in palette]
    return found


def detect(path: Path) -> bool:
    """A file holding `state_dict` with mmsegmentation's UPerHead keys (`decode_head.fpn_bottleneck`)."""
    return unwrap_mmseg(peek_checkpoint(path)) is not None


def _config_output_stride(config_text: str) -> int | None:
    """The output stride of the ResNet in an mmsegmentation config text, from its `strides=`."""
    match = re.search(r"strides\s*=\s*\(\s*1\s*,\s*2\s*,\s*([12])\s*,\s*([12])\s*\)", config_text)
    if not match:
        return None
    return {("2", "2"): 32, ("2", "1"): 16, ("1", "1"): 8}.get((match[1], match[2]))


def _decode_head_text(config_text: str) -> str:
    """The `decode_head=dict(...)` part of an mmsegmentation config text (also `"decode_head": {...}`), or ""."""
    match = re.search(r"""\bdecode_head['"]?\s*[=:]\s*(?:dict\(|\{)""", config_text)
    if not match:
        return ""
    depth = 0
    for end in range(match.end() - 1, len(config_text)):
        if config_text[end] in "([{":
            depth += 1
        elif config_text[end] in ")]}":
            depth -= 1
            if depth == 0:
                return config_text[match.start():end + 1]
    return config_text[match.start():]


def _config_align_corners(config_text: str) -> bool:
    """Whether the decode head of an mmsegmentation config resizes with align_corners=True (its 769x769
    Cityscapes configs do, in the head and on the logits); False when the config does not say."""
    setting = re.search(r"""\balign_corners['"]?\s*[=:]\s*true\b""", _decode_head_text(config_text), re.IGNORECASE)
    return setting is not None


def mmseg_head_args(state_dict: dict[str, torch.Tensor], level_channels: list[int], source: str) -> dict:
    """channels, aux head width/depth/level and dropout, read from the tensor shapes."""
    num_scales = len({k.split(".")[2] for k in state_dict if k.startswith("decode_head.psp_modules.")})
    if num_scales != 4:
        raise UserError(f"{source}: {num_scales} PPM branches; only the standard pool scales (1, 2, 3, 6) are supported")
    args = {"channels": state_dict["decode_head.fpn_bottleneck.conv.weight"].shape[0], "dropout": 0.1,
            "aux_head": "auxiliary_head.conv_seg.weight" in state_dict}
    if args["aux_head"]:
        convs = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("auxiliary_head.convs.")})
        reads = (state_dict["auxiliary_head.convs.0.conv.weight"] if convs else state_dict["auxiliary_head.conv_seg.weight"]).shape[1]
        if reads not in level_channels:
            raise UserError(f"{source}: the auxiliary head reads {reads} channels, no backbone level has that many "
                             f"({level_channels})")
        args.update(aux_level=level_channels.index(reads), aux_num_convs=len(convs),
                    aux_channels=state_dict["auxiliary_head.conv_seg.weight"].shape[1] if convs else 256)
    return args


def _convnext_args(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict, list[int]]:
    dims = [state_dict[f"backbone.norm{i}.weight"].shape[0] for i in range(4)]
    depths = [len({k.split(".")[3] for k in state_dict if k.startswith(f"backbone.stages.{i}.")}) for i in range(4)]
    sizes = {"tiny": ([96, 192, 384, 768], [3, 3, 9, 3]), "small": ([96, 192, 384, 768], [3, 3, 27, 3]),
             "base": ([128, 256, 512, 1024], [3, 3, 27, 3]), "large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
             "xlarge": ([256, 512, 1024, 2048], [3, 3, 27, 3])}
    size = next((s for s, arch in sizes.items() if arch == (dims, depths)), "tiny")
    return f"upernet_convnext_{size}", {"dims": dims, "depths": depths}, dims


def _swin_args(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict, list[int]]:
    embed_dim = state_dict["backbone.patch_embed.projection.weight"].shape[0]
    depths = [len({k.split(".")[4] for k in state_dict if k.startswith(f"backbone.stages.{i}.blocks.")}) for i in range(4)]
    tables = [state_dict[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"] for i in range(4)]
    window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
    args = {"embed_dim": embed_dim, "depths": depths, "num_heads": [t.shape[1] for t in tables], "window_size": window,
            "patch_size": state_dict["backbone.patch_embed.projection.weight"].shape[-1],
            "qkv_bias": "backbone.stages.0.blocks.0.attn.w_msa.qkv.bias" in state_dict}
    sizes = {"tiny": (96, [2, 2, 6, 2]), "small": (96, [2, 2, 18, 2]), "base": (128, [2, 2, 18, 2]), "large": (192, [2, 2, 18, 2])}
    size = next((s for s, arch in sizes.items() if arch == (embed_dim, depths)), "tiny")
    return f"upernet_swin_{size}", args, [embed_dim * 2**i for i in range(4)]


def convert_mmseg(path: Path, strict: bool = True, output_stride: int | None = None) -> UPerNet:
    """Build the UPerNet of an mmsegmentation checkpoint file and load its weights (eval mode).

    Args:
        path: the `.pth` file.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
        output_stride: of a ResNet backbone, when the checkpoint's meta has no config text (default 32).

    The config text in the checkpoint's meta also gives `align_corners` (True in the decode head: the model
    resizes with it in the head and on the logits).
    """
    source = str(path)
    unwrapped = unwrap_mmseg(load_torch_file(source))
    if unwrapped is None:
        raise UserError(f"{source}: not an mmsegmentation UPerNet checkpoint (no state_dict with decode_head.fpn_bottleneck)")
    state_dict, meta = unwrapped
    keys = list(state_dict)
    transform = None
    if "backbone.stem.0.weight" in state_dict:
        stride = output_stride or _config_output_stride(mmseg_config_text(meta)) or 32
        depth = resnet_depth(keys, "backbone.", source)
        name, backbone_args, rules = resnet_variant(depth, stride), {}, resnet_v1c_rules(r"backbone\.")
        channels = [256, 512, 1024, 2048]
    elif "backbone.downsample_layers.0.0.weight" in state_dict:
        name, backbone_args, channels = _convnext_args(state_dict)
        rules = CONVNEXT_RULES
    elif "backbone.patch_embed.projection.weight" in state_dict:
        name, backbone_args, channels = _swin_args(state_dict)
        rules, transform = SWIN_RULES, _from_unfold_order
    else:
        raise UserError(f"{source}: unknown backbone layout (supported: ResNetV1c, ConvNeXt, Swin); first keys: "
                         f"{', '.join(keys[:5])}")
    if output_stride and not name.startswith("upernet_r"):
        raise UserError(f"{source}: output_stride applies to ResNet backbones only, this one is {name}")
    num_classes = state_dict["decode_head.conv_seg.weight"].shape[0]
    extra = {"backbone_args": backbone_args} if backbone_args else {}
    if _config_align_corners(mmseg_config_text(meta)):  # mmseg's decode head uses it inside and on the logits
        extra.update(align_corners=True, output_align_corners=True)
    model = build_model(name, num_classes=num_classes, **extra, **mmseg_head_args(state_dict, channels, source))
    load_converted(model, state_dict, rules + HEAD_RULES, source, strict, transform)
    model.meta.update(mmseg_class_meta(meta, num_classes))
    return model.eval()
