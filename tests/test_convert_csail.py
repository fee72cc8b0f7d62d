"""CSAIL semantic-segmentation-pytorch (mit-semseg): their real encoder + UPerNet decoder vs ours after conversion."""
from __future__ import annotations

import pytest
import torch
from test_convert_common import randomise

from upernet.convert import convert_checkpoint, detect_format

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("one_thread")]  # one thread: small inputs


@pytest.fixture(autouse=True, scope="module")
def mit_semseg():
    """Every test here builds their model."""
    return pytest.importorskip("mit_semseg.models")


def save_csail_pair(folder, num_classes: int = 150, legacy: bool = False):
    """Their resnet50 encoder and `upernet` decoder, random, saved as their train.py does (two state dicts)."""
    from mit_semseg.models import models as csail_models
    from mit_semseg.models import resnet as csail_resnet

    encoder = randomise(csail_models.Resnet(csail_resnet.resnet50(pretrained=False)), seed=1)
    decoder = randomise(csail_models.UPerNet(num_class=num_classes, fc_dim=2048, use_softmax=True, fpn_dim=512), seed=2)
    folder.mkdir(exist_ok=True)
    states = [encoder.state_dict(), decoder.state_dict()]
    if legacy:  # checkpoints saved before PyTorch 0.4.1 have no BatchNorm batch counters
        states = [{k: v for k, v in s.items() if not k.endswith("num_batches_tracked")} for s in states]
    torch.save(states[0], folder / "encoder_epoch_30.pth")
    torch.save(states[1], folder / "decoder_epoch_30.pth")
    return encoder, decoder


def test_csail_matches_their_model(tmp_path):
    encoder, decoder = save_csail_pair(tmp_path / "ade20k-resnet50-upernet")
    assert detect_format(tmp_path / "ade20k-resnet50-upernet") == "csail"
    assert detect_format(tmp_path / "ade20k-resnet50-upernet" / "decoder_epoch_30.pth") == "csail"
    ours = convert_checkpoint(tmp_path / "ade20k-resnet50-upernet")
    assert ours.config["args"]["backbone_args"] == {"stem_width": 64} and ours.config["args"]["ppm_upsample_first"]
    assert ours.meta["mean"] == [123.675, 116.28, 103.53]  # their [0, 1] ImageNet normalisation on our 0-255 scale
    assert ours.meta["class_names"][:3] == ["wall", "building", "sky"]  # ADE20K's 150 classes

    images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Their inference: decoder(encoder features, segSize) = softmax of the logits resized to the input.
        expected = decoder(encoder(images, return_feature_maps=True), segSize=images.shape[-2:])
        got = torch.softmax(ours(images)["out"], dim=1)
    assert expected.std() > 0.01  # probabilities that vary, not a flat output
    assert (got - expected).abs().max().item() <= 1e-4


def test_csail_legacy_checkpoint_and_strict_errors(tmp_path):
    save_csail_pair(tmp_path, legacy=True)
    decoder = torch.load(tmp_path / "decoder_epoch_30.pth")
    del decoder["fpn_out.1.0.1.weight"]
    decoder["extra.weight"] = torch.zeros(1)
    torch.save(decoder, tmp_path / "decoder_epoch_30.pth")
    with pytest.raises(ValueError, match="decoder_epoch_30.pth: 1 keys of an unknown layout.*extra.weight"):
        convert_checkpoint(tmp_path / "encoder_epoch_30.pth")
    model = convert_checkpoint(tmp_path, strict=False)  # loads the rest; the skipped keys are listed
    assert torch.equal(model.decode_head.ppm_bottleneck.conv.weight, decoder["ppm_last_conv.0.weight"])
    # The batch counters missing from checkpoints older than PyTorch 0.4.1 are filled in, not reported.
    assert model.decode_head.fusion.bn.num_batches_tracked.item() == 0
