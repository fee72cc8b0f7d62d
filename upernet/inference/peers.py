"""The peers `upernet bench` compares against, built on the same weights as ours.

A pair is (our model, the peer's model) holding identical weights: the peer is either loaded from its
own saved folder and converted with our importer, or initialised randomly for one of our ConvNeXt
variants, saved in the peer's format and converted. `peer_logits` and `peer_loss` run either peer.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..convert import convert_checkpoint
from ..errors import UserError
from ..loading import load_model
from ..models.upernet import UPerNet

# Our ConvNeXt variants -> the Hugging Face ConvNextConfig of the same architecture.
HF_CONVNEXT = {
    "upernet_convnext_tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "upernet_convnext_small": ([96, 192, 384, 768], [3, 3, 27, 3]),
    "upernet_convnext_base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
    "upernet_convnext_large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
}


def transformers_pair(model: str, seed: int = 0) -> tuple[UPerNet, nn.Module]:
    """(ours, transformers' UperNetForSemanticSegmentation) holding the same weights.

    `model` is a Hugging Face UperNet folder, or one of our ConvNeXt variant names, for which a
    randomly initialised transformers model is saved and converted with our importer.
    """
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    if Path(model).is_dir():
        return load_model(model), UperNetForSemanticSegmentation.from_pretrained(model).eval()
    if model not in HF_CONVNEXT:
        raise UserError(f"--against transformers needs a Hugging Face UperNet folder or one of "
                         f"{', '.join(HF_CONVNEXT)}; got {model!r}")
    dims, depths = HF_CONVNEXT[model]
    backbone = ConvNextConfig(hidden_sizes=dims, depths=depths, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, num_labels=150, auxiliary_in_channels=dims[2])
    torch.manual_seed(seed)
    peer = UperNetForSemanticSegmentation(config).eval()
    randomise_batchnorm(peer)
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = load_model(folder)
    return ours, peer


# Our variant names -> the segmentation-models-pytorch encoder of the same backbone (timm's ConvNeXt).
SMP_ENCODERS = {"upernet_convnext_tiny": "tu-convnext_tiny", "upernet_convnext_small": "tu-convnext_small",
                 "upernet_convnext_base": "tu-convnext_base", "upernet_convnext_large": "tu-convnext_large"}


def smp_pair(model: str, seed: int = 0) -> tuple[UPerNet, nn.Module]:
    """(ours, segmentation-models-pytorch's UPerNet) holding the same weights.

    `model` is a folder saved by smp's `save_pretrained`, or one of our ConvNeXt variant names, for
    which a randomly initialised smp UPerNet (150 classes, 512 decoder channels as mmsegmentation's
    head) is saved and converted with our importer. smp's UPerNet has no auxiliary head, so neither
    has ours here.
    """
    import segmentation_models_pytorch as smp

    if Path(model).is_dir():
        with contextlib.redirect_stdout(sys.stderr):  # smp prints a progress line; stdout may carry --json
            peer = smp.from_pretrained(model).eval()
        return convert_checkpoint(model, "smp"), peer
    if model not in SMP_ENCODERS:
        raise UserError(f"--against smp needs a segmentation-models-pytorch UPerNet folder or one of "
                         f"{', '.join(SMP_ENCODERS)}; got {model!r}")
    torch.manual_seed(seed)
    peer = smp.UPerNet(SMP_ENCODERS[model], encoder_weights=None, classes=150, decoder_channels=512).eval()
    randomise_batchnorm(peer)
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = convert_checkpoint(folder, "smp")
    return ours, peer


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that folding them is measured (and tested) too."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def is_transformers(peer: nn.Module) -> bool:
    return type(peer).__module__.startswith("transformers")


def peer_logits(peer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits at input size from either peer (transformers takes `pixel_values`, smp the images)."""
    return peer(pixel_values=images).logits if is_transformers(peer) else peer(images)


def peer_loss(peer: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The peer's training loss: transformers' own (with its auxiliary head), else cross-entropy."""
    if is_transformers(peer):
        return peer(pixel_values=images, labels=labels).loss
    return torch.nn.functional.cross_entropy(peer(images).float(), labels, ignore_index=255)
