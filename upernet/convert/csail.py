"""CSAIL semantic-segmentation-pytorch (`mit-semseg`) UPerNet: `encoder_*.pth` + `decoder_*.pth` -> our UPerNet.

What differs from the mmsegmentation UPerNet, and how our model expresses it:
- the ResNet stem is 3x3 convs 64-64-128 (mmsegmentation's V1c: 32-32-64): timm's deep stem with
  `stem_width=64` (`backbone_args`);
- the PPM resizes each pooled map before its 1x1 conv: `ppm_upsample_first=True`;
- no dropout and no auxiliary head: `dropout=0`, `aux_head=False`;
- inputs are RGB scaled to [0, 1] then normalised with ImageNet mean/std, which is the same as our
  0-255 `IMAGENET_MEAN`/`IMAGENET_STD` (0.485 x 255 = 123.675, ...), stored in `model.meta`.
Their `upernet_lite` (FPN width 256 beside 512-wide PPM convs) has two widths where ours has one,
so only `upernet` (512) converts.

`convert_csail_upp` reads the pair of the authors' Unified Perceptual Parsing network
(CSAILVision/unifiedparsing, Broden+): the same encoder, a decoder with `object_head`, `part_head`,
`scene_head` and `material_head`, as our `MultiTaskUPerNet(layout="csail")`; both `upernet` and
`upernet_lite` convert. Its input is BGR, so the first conv's input channels are reversed and the
model takes RGB like every other one.
"""
from __future__ import annotations

from pathlib import Path

import re

import torch

from ..errors import UserError
from ..data.classes import ADE20K_CLASSES, ADE20K_PALETTE, IMAGENET_MEAN, IMAGENET_STD
from ..labelsets import broden_plus_meta, broden_plus_tasks
from ..models.multitask import CSAIL_MEAN, CSAIL_STD, MultiTaskUPerNet
from ..models.registry import build_model
from ..models.upernet import UPerNet
from ..io import load_torch_file
from .common import Rule, load_converted, peek_checkpoint
from .mmseg import BN, WB, conv_bn, resnet_depth

ENCODER_RULES: list[Rule] = [
    (r"conv1\.weight", "backbone.body.conv1.0.weight"),
    (rf"bn1\.{BN}", r"backbone.body.conv1.1.\g<p>"),
    (r"conv2\.weight", "backbone.body.conv1.3.weight"),
    (rf"bn2\.{BN}", r"backbone.body.conv1.4.\g<p>"),
    (r"conv3\.weight", "backbone.body.conv1.6.weight"),
    (rf"bn3\.{BN}", r"backbone.body.bn1.\g<p>"),
    (r"(layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01])\.\w+)", r"backbone.body.\1"),
]
DECODER_RULES: list[Rule] = [
    *conv_bn(r"ppm_conv\.(\d+)\.0", r"ppm_conv\.(\d+)\.1", r"decode_head.ppm.\1"),
    *conv_bn(r"ppm_last_conv\.0", r"ppm_last_conv\.1", "decode_head.ppm_bottleneck"),
    *conv_bn(r"fpn_in\.(\d+)\.0", r"fpn_in\.(\d+)\.1", r"decode_head.lateral_convs.\1"),
    *conv_bn(r"fpn_out\.(\d+)\.0\.0", r"fpn_out\.(\d+)\.0\.1", r"decode_head.fpn_convs.\1"),
    *conv_bn(r"conv_last\.0\.0", r"conv_last\.0\.1", "decode_head.fusion"),
    (rf"conv_last\.1\.{WB}", r"decode_head.classifier.\g<p>"),
]
# Their SynchronizedBatchNorm2d keeps extra buffers that accumulate statistics across iterations in
# training; inference reads only running_mean/var.
SYNC_BN_RULES: list[Rule] = [(r".+\.(?:_tmp_running_mean|_tmp_running_var|_running_iter)", None)]


# The decoder of their multi-task UPerNet (models/models.py `UPerNet`, nr_classes a dict).
UPP_DECODER_RULES: list[Rule] = [
    *conv_bn(r"ppm_conv\.(\d+)\.0", r"ppm_conv\.(\d+)\.1", r"decode_head.ppm.\1"),
    *conv_bn(r"ppm_last_conv\.0", r"ppm_last_conv\.1", "decode_head.ppm_bottleneck"),
    *conv_bn(r"fpn_in\.(\d+)\.0", r"fpn_in\.(\d+)\.1", r"decode_head.lateral_convs.\1"),
    *conv_bn(r"fpn_out\.(\d+)\.0\.0", r"fpn_out\.(\d+)\.0\.1", r"decode_head.fpn_convs.\1"),
    *conv_bn(r"conv_fusion\.0", r"conv_fusion\.1", "decode_head.fusion"),
    *conv_bn(r"object_head\.0\.0", r"object_head\.0\.1", "decode_head.classifier.0"),
    (rf"object_head\.1\.{WB}", r"decode_head.classifier.1.\g<p>"),
    *conv_bn(r"scene_head\.0\.0", r"scene_head\.0\.1", "heads.scene.convs.0"),
    (rf"scene_head\.2\.{WB}", r"heads.scene.classifier.\g<p>"),  # a 1x1 conv after global pooling: a linear layer
    *conv_bn(r"(part|material)_head\.0\.0", r"(part|material)_head\.0\.1", r"heads.\1.0"),
    (rf"(part|material)_head\.1\.{WB}", r"heads.\1.1.\g<p>"),
]
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}


def _pair(path: Path) -> tuple[Path, Path] | None:
    """(encoder, decoder) files of a checkpoint folder or of either file of the pair, else None."""
    path = Path(path)
    if path.is_dir():
        encoders = sorted(path.glob("encoder_*.pth"))
        if len(encoders) != 1:
            return None
        encoder = encoders[0]
    elif path.name.startswith(("encoder_", "decoder_")):
        encoder = path.with_name("encoder_" + path.name.split("_", 1)[1])
    else:
        return None
    decoder = encoder.with_name("decoder_" + encoder.name.split("_", 1)[1])
    return (encoder, decoder) if encoder.is_file() and decoder.is_file() else None


def detect(path: Path) -> bool:
    """encoder_*.pth + decoder_*.pth side by side, the decoder with CSAIL's UPerNet keys (`fpn_in`, `ppm_last_conv`)."""
    pair = _pair(path)
    decoder = peek_checkpoint(pair[1]) if pair else None
    return (isinstance(decoder, dict) and "ppm_last_conv.0.weight" in decoder and "fpn_in.0.0.weight" in decoder
            and "conv_last.1.weight" in decoder)


def detect_upp(path: Path) -> bool:
    """encoder_*.pth + decoder_*.pth side by side, the decoder with the unifiedparsing heads (`scene_head`, `part_head`)."""
    pair = _pair(path)
    decoder = peek_checkpoint(pair[1]) if pair else None
    return isinstance(decoder, dict) and "scene_head.2.weight" in decoder and "part_head.1.weight" in decoder


def _with_batch_counters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the BatchNorm `num_batches_tracked` counters that checkpoints saved before PyTorch 0.4.1 lack.

    The counter only matters for BatchNorm with momentum=None in training; 0 is its initial value.
    """
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".running_var"):
            out.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def read_pair(path: Path) -> tuple[tuple[Path, Path], dict, dict, str]:
    """(the encoder and decoder files, their state dicts, a name for messages) of a CSAIL pair."""
    pair = _pair(path)
    if pair is None:
        raise UserError(f"{path}: expected a folder with one encoder_*.pth + decoder_*.pth pair, or one file of such a pair")
    encoder, decoder = (load_torch_file(str(p)) for p in pair)
    return pair, encoder, decoder, f"{pair[0]} + {pair[1].name}"


def convert_csail(path: Path, strict: bool = True) -> UPerNet:
    """Build the UPerNet of a CSAIL encoder/decoder pair and load its weights (eval mode).

    Args:
        path: the folder holding one encoder_*.pth and decoder_*.pth pair, or either file of it.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
    """
    pair, encoder, decoder, source = read_pair(path)
    if "conv3.weight" not in encoder or encoder["conv3.weight"].shape[0] != 128:
        raise UserError(f"{pair[0]}: not a CSAIL ResNet encoder with the 64-64-128 stem (conv3.weight 128 channels)")
    if decoder["ppm_last_conv.0.weight"].shape[0] != decoder["ppm_conv.0.0.weight"].shape[0]:
        raise UserError(f"{pair[1]}: FPN width {decoder['ppm_last_conv.0.weight'].shape[0]} differs from the PPM width "
                         f"{decoder['ppm_conv.0.0.weight'].shape[0]} (upernet_lite); only 'upernet' converts")
    depth = resnet_depth(list(encoder), "", str(pair[0]))
    model = build_model(
        f"upernet_r{depth}",
        num_classes=decoder["conv_last.1.weight"].shape[0],
        backbone_args={"stem_width": 64},
        channels=decoder["ppm_last_conv.0.weight"].shape[0],
        dropout=0.0,
        aux_head=False,
        ppm_upsample_first=True,
    )
    # The two files have no prefix; the rules tell their keys apart (encoder: conv1.., layerN; decoder: the rest).
    merged = _with_batch_counters({**encoder, **decoder})
    load_converted(model, merged, SYNC_BN_RULES + ENCODER_RULES + DECODER_RULES, source, strict)
    model.meta.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    if model.num_classes == len(ADE20K_CLASSES):  # their models are ADE20K's 150 classes, in the same order
        model.meta.update(class_names=list(ADE20K_CLASSES), palette=[list(c) for c in ADE20K_PALETTE])
    return model.eval()


def _resnet_args(encoder: dict[str, torch.Tensor], source: str) -> tuple[str, dict]:
    """(our base variant, its backbone_args) of their deep-stem ResNet: depth from the block counts,
    widths from the weights (their released encoders are ResNet-50 and ResNet-101)."""
    blocks = [len({m[1] for k in encoder if (m := re.match(rf"layer{n}\.(\d+)\.conv1\.weight$", k))}) for n in range(1, 5)]
    if "conv3.weight" not in encoder or not all(blocks):
        raise UserError(f"{source}: not a CSAIL deep-stem ResNet encoder (conv1..conv3, layer1..layer4)")
    args = {"stem_width": encoder["conv1.weight"].shape[0]}
    widths = tuple(encoder[f"layer{n}.0.conv1.weight"].shape[0] for n in range(1, 5))
    if widths != (64, 128, 256, 512) or tuple(blocks) not in RESNET_DEPTHS:
        args.update(layers=tuple(blocks), channels=widths)
    return f"upernet_multitask_r{RESNET_DEPTHS.get(tuple(blocks), 50)}", args


def convert_csail_upp(path: Path, strict: bool = True) -> MultiTaskUPerNet:
    """Build the authors' Unified Perceptual Parsing network (Broden+) of an encoder/decoder pair, load it (eval mode).

    Args:
        path: the folder holding one encoder_*.pth and decoder_*.pth pair, or either file of it.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
    """
    pair, encoder, decoder, source = read_pair(path)
    tasks = broden_plus_tasks(texture=False)
    found = {"object": decoder["object_head.1.weight"].shape[0], "scene": decoder["scene_head.2.weight"].shape[0],
             "material": decoder["material_head.1.weight"].shape[0], "part": decoder["part_head.1.weight"].shape[0]}
    expected = {**tasks, "part": sum(tasks["part"]["num_parts"])}
    if found != expected:
        raise UserError(f"{pair[1]}: class counts {found} are not Broden+'s {expected}; only Broden+ models convert")
    name, backbone_args = _resnet_args(encoder, str(pair[0]))
    scales = len({k.split(".")[1] for k in decoder if k.startswith("ppm_conv.")})
    if scales != 4:
        raise UserError(f"{pair[1]}: {scales} PPM branches; their UPerNet has 4 (pool scales 1, 2, 3, 6)")
    model = build_model(name, tasks=tasks, layout="csail", base_args={"backbone_args": backbone_args},
                        channels=decoder["ppm_last_conv.0.weight"].shape[0],
                        ppm_channels=decoder["ppm_conv.0.0.weight"].shape[0])

    def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        state["backbone.body.conv1.0.weight"] = state["backbone.body.conv1.0.weight"].flip(1)  # BGR -> RGB input
        weight = state["heads.scene.classifier.weight"]
        state["heads.scene.classifier.weight"] = weight.reshape(weight.shape[0], -1)
        return state

    merged = _with_batch_counters({**encoder, **decoder})
    load_converted(model, merged, SYNC_BN_RULES + ENCODER_RULES + UPP_DECODER_RULES, source, strict, transform=to_ours)
    model.meta.update(tasks_meta=broden_plus_meta(), mean=list(CSAIL_MEAN), std=list(CSAIL_STD))
    return model.eval()
