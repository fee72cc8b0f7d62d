"""sssegmentation checkpoints: their real UPerNet with random weights vs ours after conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_convert_common import one_thread, randomise  # noqa: F401 (one_thread: autouse fixture)

from upernet import load_model
from upernet.convert import convert_checkpoint, detect_format

pytestmark = pytest.mark.peers


@pytest.fixture(autouse=True, scope="module")
def ssseg():
    """Every test here builds their model."""
    return pytest.importorskip("ssseg.modules.models.segmentors.upernet.upernet")


def build_ssseg(output_stride: int, channels: int, aux_channels: int, num_classes: int = 150) -> torch.nn.Module:
    """sssegmentation's UPerNet R-50 as its configs build it (BatchNorm2d instead of SyncBatchNorm on CPU)."""
    from ssseg.modules.models.segmentors.upernet.upernet import UPerNet as SSSegUPerNet

    cfg = {
        "type": "UPerNet", "num_classes": num_classes, "align_corners": False,
        "norm_cfg": {"type": "BatchNorm2d"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "backbone": {"type": "ResNet", "depth": 50, "structure_type": "resnet50conv3x3stem", "pretrained": False,
                     "outstride": output_stride, "use_conv3x3_stem": True, "selected_indices": (0, 1, 2, 3)},
        "head": {"in_channels_list": [256, 512, 1024, 2048], "feats_channels": channels, "pool_scales": [1, 2, 3, 6],
                 "dropout": 0.1},
        "auxiliary": {"in_channels": 1024, "out_channels": aux_channels, "dropout": 0.1},
        "losses": {},
    }
    return randomise(SSSegUPerNet(cfg, mode="TEST"), seed=output_stride)


@pytest.mark.parametrize("output_stride, channels, aux_channels",
                         [pytest.param(8, 512, 512, marks=pytest.mark.slow), (16, 64, 32)])
def test_sssegmentation_matches_their_model(tmp_path, output_stride, channels, aux_channels):
    from ssseg.modules.utils import SSSegInputStructure

    theirs = build_ssseg(output_stride, channels, aux_channels)
    path = tmp_path / f"upernet_resnet50os{output_stride}_ade20k.pth"
    torch.save({"model": theirs.state_dict(), "cur_epoch": 130, "cur_iter": 0}, path)

    assert detect_format(path) == "sssegmentation"
    ours = convert_checkpoint(path)
    assert ours.config["name"] == f"upernet_r50_d{output_stride}"
    assert ours.meta["dataset"] == "ade20k" and ours.meta["class_names"][:2] == ["wall", "building"]
    assert ours.aux_head.convs[0].conv.weight.shape[:2] == (aux_channels, 1024)

    images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = theirs(SSSegInputStructure(images=images, mode="TEST")).seg_logits
        expected = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        got = ours(images)["out"]
    assert expected.abs().max() > 0.1  # a real signal, not a vanishing one
    assert (got - expected).abs().max().item() <= 1e-4

    # The auxiliary decoder maps too: compare it on a stride-16 level.
    level = torch.randn(1, 1024, 4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.aux_head(level) - theirs.auxiliary_decoder(level)).abs().max().item() <= 1e-4

    ours.save(tmp_path / "ours")  # converted models save and reload like any of ours
    reloaded = load_model(tmp_path / "ours").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in ours.state_dict().items())


def test_sssegmentation_output_stride_must_be_known(tmp_path):
    theirs = build_ssseg(16, 32, 32)
    path = tmp_path / "checkpoints-epoch-130.pth"
    torch.save({"model": theirs.state_dict()}, path)
    with pytest.raises(ValueError, match="cannot tell the ResNet's output stride.*--output-stride"):
        convert_checkpoint(path)
    assert convert_checkpoint(path, output_stride=16).config["name"] == "upernet_r50_d16"
