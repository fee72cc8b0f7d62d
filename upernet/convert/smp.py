"""segmentation-models-pytorch (0.5+) UPerNet folders (`save_pretrained`: config.json + model.safetensors) -> ours.

smp's UPerNet is the same head with three differences our model expresses as options:
- a LayerNorm (eps 1e-6) on every encoder level before the head: the backbone's `output_norms`;
- no dropout and no auxiliary segmentation head (smp's `aux_params` is an image classifier; it is
  not converted): `dropout=0`, `aux_head=False`;
- the stride-4 logits are upsampled 4x with align_corners=True: `output_align_corners=True` (smp
  only takes inputs divisible by 32, where that is the same as resizing to the input size).
Encoders: smp's own ResNet/ResNeXt (torchvision layout, which timm's models of the same names
share) and any timm encoder (`tu-<name>`), both as our `upernet_timm`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MissingFile, UserError
from ..models.registry import build_model
from ..models.upernet import UPerNet
from .common import Rule, load_converted
from .mmseg import WB, conv_bn

# smp's encoders with the torchvision ResNet layout, and timm's name for the same network.
TORCHVISION_ENCODERS = {name: name for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                                "resnext50_32x4d", "resnext101_32x8d")}

# smp's FPN lists its lateral blocks coarse to fine (1/16, 1/8, 1/4); ours are fine to coarse.
HEAD_RULES: list[Rule] = [
    (rf"decoder\.feature_norms\.([0-3])\.{WB}", r"backbone.output_norms.\1.\g<p>"),
    *conv_bn(r"decoder\.psp\.blocks\.(\d)\.1\.0", r"decoder\.psp\.blocks\.(\d)\.1\.1", r"decode_head.ppm.\1"),
    *conv_bn(r"decoder\.psp\.out_conv\.0", r"decoder\.psp\.out_conv\.1", "decode_head.ppm_bottleneck"),
    *[rule for i in range(3) for rule in conv_bn(rf"decoder\.fpn_lateral_blocks\.{i}\.conv_norm_relu\.0",
                                                 rf"decoder\.fpn_lateral_blocks\.{i}\.conv_norm_relu\.1",
                                                 f"decode_head.lateral_convs.{2 - i}")],
    *[rule for i in range(3) for rule in conv_bn(rf"decoder\.fpn_conv_blocks\.{i}\.0", rf"decoder\.fpn_conv_blocks\.{i}\.1",
                                                 f"decode_head.fpn_convs.{2 - i}")],
    *conv_bn(r"decoder\.fusion_block\.0", r"decoder\.fusion_block\.1", "decode_head.fusion"),
    (rf"segmentation_head\.0\.{WB}", r"decode_head.classifier.\g<p>"),
    (r"classification_head\..+", None),  # smp's `aux_params` image classifier: not part of UPerNet
]
ENCODER_RULES: list[Rule] = [
    (r"encoder\.model\.(.+)", r"backbone.body.\1"),  # tu-* encoders: timm's features_only model as it is
    (rf"encoder\.((?:conv1|bn1|layer[1-4])\..+)", r"backbone.body.\1"),  # torchvision-layout ResNets
]


def _read_config(folder: Path) -> dict | None:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and config.get("_model_class") == "UPerNet" else None


def detect(path: Path) -> bool:
    """A folder whose config.json names smp's `_model_class` "UPerNet"."""
    return _read_config(path) is not None


def _timm_name(config: dict, config_file: Path) -> str:
    name = config.get("encoder_name", "resnet34")
    if name.startswith("tu-"):
        return name[3:]
    if name in TORCHVISION_ENCODERS:
        return TORCHVISION_ENCODERS[name]
    raise UserError(f"{config_file}: encoder {name!r} is not supported; supported: tu-<any timm model>, "
                     f"{', '.join(TORCHVISION_ENCODERS)}")


def convert_smp(path: Path, strict: bool = True) -> UPerNet:
    """Build the UPerNet of an smp `save_pretrained` folder and load its weights (eval mode).

    Args:
        path: the folder with config.json and model.safetensors.
        strict: fail on any key that does not fit; False loads what fits and logs the skipped keys.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_file = folder / "config.json"
    config = _read_config(folder)
    if config is None:
        raise UserError(f"{config_file}: not an smp UPerNet config (no \"_model_class\": \"UPerNet\")")
    if "decoder_pyramid_channels" in config:
        raise UserError(f"{config_file}: an smp < 0.5 UPerNet (decoder_pyramid_channels); only the 0.5+ layout converts")
    supported = {"encoder_depth": (5,), "in_channels": (3,), "upsampling": (4,), "decoder_use_norm": ("batchnorm", True)}
    for key, values in supported.items():
        if config.get(key, values[0]) not in values:
            raise UserError(f"{config_file}: {key}={config[key]!r} is not supported (only {values[0]!r})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise MissingFile(f"{folder}: smp folder without weights (expected {weights.name})")
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise UserError(f"{weights}: cannot read the weights ({e})") from None
    model = build_model(
        "upernet_timm",
        model_name=_timm_name(config, config_file),
        num_classes=config.get("classes", 1),
        output_norms=True,
        channels=config.get("decoder_channels", 256),
        dropout=0.0,
        aux_head=False,
        output_align_corners=True,
    )
    load_converted(model, state_dict, ENCODER_RULES + HEAD_RULES, str(weights), strict)
    return model.eval()
