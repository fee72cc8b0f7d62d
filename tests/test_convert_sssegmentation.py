"""sssegmentation checkpoints: their real UPerNet with random weights vs ours after conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_convert_common import randomise

from upernet import load_model
from upernet.convert import convert_checkpoint, detect_format

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("one_thread")]  # one thread: small inputs


@pytest.fixture(autouse=True, scope="module")
def ssseg():
    """Every test here builds their model."""
    return pytest.importorskip("ssseg.modules.models.segmentors.upernet.upernet")


def build_ssseg(output_stride: int, channels: int, aux_channels: int, num_classes: int = 150,
                depth: int = 50) -> torch.nn.Module:
    """sssegmentation's UPerNet R-50/101 as its configs build it (BatchNorm2d instead of SyncBatchNorm on CPU)."""
    from ssseg.modules.models.segmentors.upernet.upernet import UPerNet as SSSegUPerNet

    cfg = {
        "type": "UPerNet", "num_classes": num_classes, "align_corners": False,
        "norm_cfg": {"type": "BatchNorm2d"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "backbone": {"type": "ResNet", "depth": depth, "structure_type": f"resnet{depth}conv3x3stem",
                     "pretrained": False,
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


# ---- the published checkpoints: every file name converts with no option -------------------------------
# sssegmentation's UPerNet table (docs/modelzoo/upernet/README.md): upernet_resnet{50,101}os{8,16}_{dataset}_train.pth
PUBLISHED = [(depth, stride, dataset) for dataset in ("voc", "ade20k", "cityscapes") for depth in (50, 101)
             for stride in (8, 16)]
CLASSES = {"voc": 21, "ade20k": 150, "cityscapes": 19}


def published_name(depth: int, stride: int, dataset: str) -> str:
    return f"upernet_resnet{depth}os{stride}_{dataset}_train.pth"


@pytest.mark.parametrize("name, expected", [
    *[(published_name(*row), (row[1], row[2])) for row in PUBLISHED],
    ("upernet_resnet101os16_cityscapes.pth", (16, "cityscapes")),  # their config's work_dir name
    ("UPerNet-ResNet50-OS8-ADE20K-epoch130.pth", (8, "ade20k")),
    ("checkpoints-epoch-130.pth", (None, None)),
    ("upernet_resnet50os8_voc2012.pth", (8, None)),  # not one of the dataset names: no class names guessed
])
def test_published_file_names_tell_the_output_stride_and_dataset(name, expected):
    from upernet.convert.sssegmentation import read_file_name

    assert read_file_name(name) == expected


@pytest.fixture(scope="module")
def their_weights():
    """One state dict of their layout per depth (the output stride is not in the weights)."""
    return {depth: build_ssseg(8, 512, 512, depth=depth).state_dict() for depth in (50, 101)}


@pytest.mark.slow
@pytest.mark.parametrize("depth, stride, dataset", PUBLISHED)
def test_every_published_checkpoint_converts_without_an_option(their_weights, tmp_path, depth, stride, dataset):
    from upernet import cli

    generator = torch.Generator().manual_seed(depth + stride)
    state_dict = dict(their_weights[depth])
    for head in ("decoder.4", "auxiliary_decoder.4"):  # the classifiers of the dataset's classes
        width = state_dict[f"{head}.weight"].shape[1]
        state_dict[f"{head}.weight"] = torch.randn(CLASSES[dataset], width, 1, 1, generator=generator)
        state_dict[f"{head}.bias"] = torch.randn(CLASSES[dataset], generator=generator)
    path = tmp_path / published_name(depth, stride, dataset)
    torch.save({"model": state_dict, "cur_epoch": 60, "cur_iter": 0}, path)

    assert cli.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours")
    assert ours.config["name"] == f"upernet_r{depth}_d{stride}"
    assert ours.num_classes == CLASSES[dataset] and ours.meta["dataset"] == dataset
    assert ours.aux_head.convs[0].conv.weight.shape[:2] == (512, 1024)
    assert torch.equal(ours.decode_head.classifier.weight, state_dict["decoder.4.weight"])
