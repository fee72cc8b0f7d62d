"""segmentation-models-pytorch UPerNet: their real model with random weights vs ours after conversion."""
from __future__ import annotations

import json

import pytest
import torch
from test_convert_common import randomise

from upernet.convert import convert_checkpoint, detect_format

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("one_thread")]  # one thread: small inputs


@pytest.fixture(scope="module")
def smp():
    return pytest.importorskip("segmentation_models_pytorch")


@pytest.mark.parametrize("encoder", ["resnet18", "tu-convnext_atto"])
def test_smp_matches_their_model(smp, tmp_path, encoder):
    theirs = randomise(smp.UPerNet(encoder, encoder_weights=None, classes=4, decoder_channels=32), seed=3)
    theirs.save_pretrained(tmp_path / "smp")
    assert detect_format(tmp_path / "smp") == "smp"
    ours = convert_checkpoint(tmp_path / "smp")
    assert ours.config["args"]["model_name"] == encoder.removeprefix("tu-")

    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(images), ours(images)["out"]
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4


def test_smp_rejects_settings_our_model_cannot_express(smp, tmp_path):
    smp.UPerNet("resnet18", encoder_weights=None, classes=2, decoder_channels=16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_use_norm": "instancenorm"}))
    with pytest.raises(ValueError, match="config.json: decoder_use_norm='instancenorm' is not supported"):
        convert_checkpoint(tmp_path)
