"""Import checkpoints of other toolkits into our model: one key table per source layout.

`FORMATS` maps a format name to a `Format`: `detect(path) -> bool` looks at a file or folder
without building anything; `convert(path, **options) -> UPerNet` returns a loaded model in eval
mode; `options` names the keyword options that `convert` accepts (`strict`, `output_stride`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import MissingFile, UserError
from . import csail, huggingface, mmseg, mmseg_internimage, smp, sssegmentation
from ..io import load_torch_file


class Format(NamedTuple):
    detect: Callable[[Path], bool]
    convert: Callable[..., Any]
    description: str
    options: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {
    "huggingface": Format(huggingface.detect, huggingface.convert_huggingface,
                          "Hugging Face UperNetForSemanticSegmentation folder (ConvNeXt, Swin)", ("strict",)),
    # Before "mmseg": an InternImage checkpoint is an mmsegmentation checkpoint with DCNv3 layers.
    "internimage": Format(mmseg_internimage.detect, mmseg_internimage.convert_internimage,
                          "official InternImage UPerNet .pth (mmsegmentation 0.x layout; T/S/B/L/XL)", ("strict",)),
    "mmseg": Format(mmseg.detect, mmseg.convert_mmseg,
                    "mmsegmentation 0.x/1.x .pth (ResNetV1c OS32/16/8, Swin, ConvNeXt; auxiliary head)",
                    ("strict", "output_stride")),
    "sssegmentation": Format(sssegmentation.detect, sssegmentation.convert_sssegmentation,
                             "sssegmentation .pth (ResNet-50/101 OS8/16; auxiliary decoder)", ("strict", "output_stride")),
    "csail_upp": Format(csail.detect_upp, csail.convert_csail_upp,
                        "CSAIL unifiedparsing encoder_*.pth + decoder_*.pth (Broden+ multi-task UPerNet, ResNet-50/101)",
                        ("strict",)),
    "csail": Format(csail.detect, csail.convert_csail,
                    "CSAIL semantic-segmentation-pytorch encoder_*.pth + decoder_*.pth (ResNet-50/101 UPerNet)",
                    ("strict",)),
    "smp": Format(smp.detect, smp.convert_smp,
                  "segmentation-models-pytorch UPerNet save_pretrained folder (resnet*, tu-* timm encoders)",
                  ("strict",)),
}


def detect_format(path: str | Path) -> str:
    """The name of the first format whose `detect` recognises `path`."""
    path = Path(path)
    for name, entry in FORMATS.items():
        if entry.detect(path):
            return name
    if path.is_file():
        load_torch_file(str(path))  # a file torch.load refuses: its error says why (e.g. pickled Python objects)
    raise UserError(f"{path}: unknown checkpoint layout; known formats: {', '.join(FORMATS)} (or pass --from)")


def convert_checkpoint(path: str | Path, fmt: str | None = None, **options: Any):
    """Load a foreign checkpoint as our UPerNet; `fmt` is detected when not given.

    Args:
        path: the checkpoint file or folder.
        fmt: a name of `FORMATS`; None detects it.
        **options: `strict` (default True) and `output_stride`, for the formats that take them;
            options left at None are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"{path}: no such file or folder")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    entry = FORMATS[fmt]
    given = {k: v for k, v in options.items() if v is not None and not (k == "strict" and v is True)}
    unsupported = sorted(set(given) - set(entry.options))
    if unsupported:
        raise UserError(f"{path}: the {fmt} converter does not take {', '.join(unsupported)} "
                         f"(it takes: {', '.join(entry.options) or 'no options'})")
    return entry.convert(path, **given)
