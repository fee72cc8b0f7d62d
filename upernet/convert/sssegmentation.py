"""sssegmentation UPerNet checkpoints (`{"model": state_dict, ...}`) -> our UPerNet.

Their UPerNet R-50/101 runs the ResNet V1c at output stride 8 or 16; its auxiliary decoder is a
3x3 conv 1024 -> 512 + BN + ReLU, dropout and a classifier on the stride-16 level, which is our
`FCNHead` with `aux_channels=512`. The weights cannot tell the output stride: it comes from
`output_stride`, else from the file name as sssegmentation publishes it
(`upernet_resnet50os8_ade20k_train.pth`), else it is an error. The dataset named in the file name
(ade20k, cityscapes, voc) gives the class names and palette when the class count agrees.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..data.classes import DATASET_META, IMAGENET_MEAN, IMAGENET_STD, set_meta
from ..models.registry import build_model
from ..models.upernet import UPerNet
from ..io import load_torch_file
from .common import Rule, load_converted, peek_checkpoint
from .mmseg import WB, conv_bn, resnet_depth, resnet_v1c_rules, resnet_variant

# Their ConvModules are plain Sequentials: (conv, bn, relu); the PPM branches start with the pooling.
HEAD_RULES: list[Rule] = [
    *conv_bn(r"ppm_net\.branches\.(\d+)\.1", r"ppm_net\.branches\.(\d+)\.2", r"decode_head.ppm.\1"),
    *conv_bn(r"ppm_net\.bottleneck\.0", r"ppm_net\.bottleneck\.1", "decode_head.ppm_bottleneck"),
    *conv_bn(r"lateral_convs\.(\d+)\.0", r"lateral_convs\.(\d+)\.1", r"decode_head.lateral_convs.\1"),
    *conv_bn(r"fpn_convs\.(\d+)\.0", r"fpn_convs\.(\d+)\.1", r"decode_head.fpn_convs.\1"),
    *conv_bn(r"decoder\.0", r"decoder\.1", "decode_head.fusion"),  # decoder: conv, bn, relu, dropout, classifier
    (rf"decoder\.4\.{WB}", r"decode_head.classifier.\g<p>"),
    *conv_bn(r"auxiliary_decoder\.0", r"auxiliary_decoder\.1", "aux_head.convs.0"),  # conv, bn, relu, dropout, classifier
    (rf"auxiliary_decoder\.4\.{WB}", r"aux_head.classifier.\g<p>"),
]
RULES: list[Rule] = resnet_v1c_rules(r"backbone_net\.") + HEAD_RULES


def _state_dict(checkpoint: object) -> dict | None:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict) and "ppm_net.bottleneck.0.weight" in checkpoint["model"]:
        return checkpoint["model"]
    return None


def detect(path: Path) -> bool:
    """A file holding `model` with sssegmentation's UPerNet keys (`ppm_net.`, `backbone_net.`)."""
    return _state_dict(peek_checkpoint(path)) is not None


# sssegmentation publishes `upernet_resnet50os8_voc_train.pth`; renamed copies keep the tokens:
# `upernet_resnet101os16_cityscapes.pth`, `UPerNet-ResNet50-OS8-ADE20K-epoch130.pth`.
STRIDE_IN_NAME = re.compile(r"os[_-]?(8|16|32)(?!\d)", re.IGNORECASE)
DATASET_IN_NAME = re.compile(r"(?:^|[_\-.])(ade20k|cityscapes|voc)(?=[_\-.]|$)", re.IGNORECASE)


def read_file_name(path: str | Path) -> tuple[int | None, str | None]:
    """(output stride, dataset) as a published sssegmentation file name tells them, None where it does not.

    `upernet_resnet50os8_voc_train.pth` -> (8, "voc"); `checkpoints-epoch-130.pth` -> (None, None).
    """
    name = Path(path).name
    stride, dataset = STRIDE_IN_NAME.search(name), DATASET_IN_NAME.search(name)
    return (int(stride[1]) if stride else None), (dataset[1].lower() if dataset else None)


def convert_sssegmentation(path: Path, strict: bool = True, output_stride: int | None = None) -> UPerNet:
    """Build the UPerNet of an sssegmentation checkpoint file and load its weights (eval mode).

    Args:
        path: the `.pth` file.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
        output_stride: 8 or 16; default: read from the file name (`...os8...`, `...os16...`).
    """
    source = str(path)
    state_dict = _state_dict(load_torch_file(source))
    if state_dict is None:
        raise UserError(f"{source}: not an sssegmentation UPerNet checkpoint (no 'model' with ppm_net keys)")
    if "backbone_net.stem.0.weight" not in state_dict:
        raise UserError(f"{source}: only sssegmentation's ResNet (conv3x3 stem) backbones are supported")
    named_stride, dataset = read_file_name(path)
    if output_stride is None:
        if named_stride is None:
            raise UserError(f"{source}: cannot tell the ResNet's output stride from the weights or the file name; "
                             f"pass it (`--output-stride 8` or 16)")
        output_stride = named_stride
    depth = resnet_depth(list(state_dict), "backbone_net.", source)
    has_aux = "auxiliary_decoder.4.weight" in state_dict
    if has_aux and state_dict["auxiliary_decoder.0.weight"].shape[1] != 1024:
        raise UserError(f"{source}: the auxiliary decoder reads {state_dict['auxiliary_decoder.0.weight'].shape[1]} "
                         f"channels; only the stride-16 level (1024) is supported")
    model = build_model(
        resnet_variant(depth, output_stride),
        num_classes=state_dict["decoder.4.weight"].shape[0],
        channels=state_dict["decoder.0.weight"].shape[0],
        aux_head=has_aux,
        **({"aux_channels": state_dict["auxiliary_decoder.0.weight"].shape[0]} if has_aux else {}),
    )
    load_converted(model, state_dict, RULES, source, strict)
    if dataset and len(DATASET_META[dataset]["class_names"]) == model.num_classes:
        set_meta(model, dataset=dataset)  # their normalisation is ours: ImageNet mean/std on 0-255
    else:
        model.meta.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return model.eval()
