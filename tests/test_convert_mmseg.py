"""mmsegmentation 1.x: their real EncoderDecoder (ResNetV1c, mmpretrain ConvNeXt, Swin) vs ours after conversion.

mmsegmentation imports `mmcv.ops` (compiled C++/CUDA operators) when its package loads; the
pure-Python `mmcv-lite` that installs here has none. No module of a UPerNet calls them, so a
placeholder module that fails on use stands in for `mmcv.ops`; every module that runs is theirs, unpatched.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from test_convert_common import randomise

from upernet.convert import convert_checkpoint, detect_format


def _mmcv_ops_placeholder() -> None:
    try:
        import mmcv.ops  # noqa: F401  (the full mmcv, when installed)
    except ImportError:
        ops = types.ModuleType("mmcv.ops")

        def missing(name: str):
            if name.startswith("__"):
                raise AttributeError(name)

            def fail(*args, **kwargs):
                raise RuntimeError(f"mmcv.ops.{name} needs the compiled mmcv, not mmcv-lite")
            return fail

        ops.__getattr__ = missing
        sys.modules["mmcv.ops"] = ops


@pytest.fixture(scope="module")
def mmseg_models():
    """mmsegmentation's model registry, every module registered."""
    pytest.importorskip("mmcv")
    _mmcv_ops_placeholder()
    registry = pytest.importorskip("mmseg.registry")
    pytest.importorskip("mmseg.utils").register_all_modules()
    return registry.MODELS


pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]  # mmseg deprecation notices
NUM_CLASSES = 5
BN = dict(type="BN", requires_grad=True)
LOSS = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)


def heads(in_channels: list[int], channels: int = 32, align_corners: bool = False) -> dict:
    """UPerHead + FCN auxiliary head as in mmsegmentation's _base_/models/upernet_*.py (narrower)."""
    return dict(
        decode_head=dict(type="UPerHead", in_channels=in_channels, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=channels, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=BN,
                         align_corners=align_corners, loss_decode=LOSS),
        auxiliary_head=dict(type="FCNHead", in_channels=in_channels[2], in_index=2, channels=channels // 2, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=BN,
                            align_corners=align_corners, loss_decode=LOSS),
    )


def resnet(output_stride: int) -> dict:
    strides, dilations = {32: ((1, 2, 2, 2), (1, 1, 1, 1)), 8: ((1, 2, 1, 1), (1, 1, 2, 4))}[output_stride]
    return dict(type="ResNetV1c", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=dilations, strides=strides,
                norm_cfg=BN, norm_eval=False, style="pytorch", contract_dilation=True)


CONVNEXT = dict(type="mmpretrain.ConvNeXt", arch=dict(depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]),
                out_indices=[0, 1, 2, 3], drop_path_rate=0.0, layer_scale_init_value=1.0, gap_before_final_norm=False)
SWIN = dict(type="SwinTransformer", pretrain_img_size=224, embed_dims=32, patch_size=4, window_size=7, mlp_ratio=4,
            depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3), qkv_bias=True,
            qk_scale=None, patch_norm=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, use_abs_pos_embed=False,
            act_cfg=dict(type="GELU"), norm_cfg=dict(type="LN", requires_grad=True))


def build_mmseg(models, backbone: dict, in_channels: list[int], align_corners: bool = False) -> torch.nn.Module:
    cfg = dict(type="EncoderDecoder", backbone=backbone, **heads(in_channels, align_corners=align_corners),
               train_cfg=dict(), test_cfg=dict(mode="whole"))
    return randomise(models.build(cfg), seed=7)


def mmseg_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Their whole-image inference: logits resized to the image by the decode head's predict."""
    with torch.no_grad():
        return model.encode_decode(images, [dict(img_shape=tuple(images.shape[-2:]))])


CASES = {
    # name: (backbone config, level channels, checkpoint meta, our variant)
    "r50": (resnet(32), [256, 512, 1024, 2048], {"CLASSES": ["a", "b", "c", "d", "e"],
                                                  "PALETTE": [[i, i, i] for i in range(NUM_CLASSES)]}, "upernet_r50"),
    "r50-d8": (resnet(8), [256, 512, 1024, 2048], {"config": "model = dict(backbone=dict(type='ResNetV1c', "
                                                             "strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)))"},
               "upernet_r50_d8"),
    "convnext": (CONVNEXT, [16, 32, 64, 128], {}, "upernet_convnext_tiny"),
    "swin": (SWIN, [32, 64, 128, 256], {}, "upernet_swin_tiny"),
}


@pytest.mark.peers
@pytest.mark.parametrize("case", list(CASES))
def test_mmseg_matches_their_model(mmseg_models, tmp_path, case):
    backbone, in_channels, meta, variant = CASES[case]
    theirs = build_mmseg(mmseg_models, backbone, in_channels)
    path = tmp_path / f"upernet_{case}.pth"
    torch.save({"meta": meta, "state_dict": theirs.state_dict()}, path)

    assert detect_format(path) == "mmseg"
    ours = convert_checkpoint(path)
    assert ours.config["name"] == variant
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    expected = mmseg_logits(theirs, images)
    with torch.no_grad():
        got = ours(images)["out"]
        level = torch.randn(1, in_channels[2], 4, 6, generator=torch.Generator().manual_seed(1))
        aux_diff = (ours.aux_head(level) - theirs.auxiliary_head.cls_seg(theirs.auxiliary_head._forward_feature(
            [None, None, level, None]))).abs().max().item()
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4
    assert aux_diff <= 1e-4
    if "CLASSES" in meta:
        assert ours.meta["class_names"] == meta["CLASSES"] and ours.meta["palette"] == meta["PALETTE"]


def config_text(align_corners: bool) -> str:
    """The config text an mmsegmentation checkpoint's meta carries, as in its *_769x769_* Cityscapes configs
    (align_corners=True in both heads) or the others (False); the auxiliary head's setting comes after."""
    return ("norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(\n    type='EncoderDecoder',\n"
            "    backbone=dict(type='mmpretrain.ConvNeXt', out_indices=[0, 1, 2, 3]),\n"
            "    decode_head=dict(\n        type='UPerHead', in_channels=[16, 32, 64, 128], pool_scales=(1, 2, 3, 6),\n"
            "        norm_cfg=dict(type='SyncBN', requires_grad=True),\n"
            f"        align_corners={align_corners},\n"
            "        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),\n"
            "    auxiliary_head=dict(type='FCNHead', in_channels=64, align_corners=True),\n"
            "    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))\n")


@pytest.mark.peers
@pytest.mark.parametrize("align_corners", [True, False])
def test_mmseg_align_corners_is_read_from_the_config_text(mmseg_models, tmp_path, align_corners):
    """mmsegmentation's 769x769 Cityscapes checkpoints resize with align_corners=True in the decode head and on
    the logits: the config text in their meta says so, the converted model (and its saved folder) does the
    same and matches their logits; without that text the model resizes as the others (False)."""
    from upernet import load_model, save_model

    theirs = build_mmseg(mmseg_models, CONVNEXT, [16, 32, 64, 128], align_corners=align_corners)
    path = tmp_path / "upernet_convnext_769x769.pth"
    torch.save({"meta": {"config": config_text(align_corners)}, "state_dict": theirs.state_dict()}, path)
    ours = convert_checkpoint(path)
    assert ours.decode_head.align_corners is align_corners and ours.output_align_corners is align_corners
    save_model(ours, tmp_path / "ours")
    reloaded = load_model(tmp_path / "ours")
    assert reloaded.decode_head.align_corners is align_corners and reloaded.output_align_corners is align_corners

    images = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    expected = mmseg_logits(theirs, images)
    with torch.no_grad():
        assert (reloaded(images)["out"] - expected).abs().max().item() <= 1e-4
    torch.save({"meta": {}, "state_dict": theirs.state_dict()}, path)  # no config text: the default
    unaligned = convert_checkpoint(path)
    assert unaligned.decode_head.align_corners is False and unaligned.output_align_corners is False
    if align_corners:
        with torch.no_grad():
            assert (unaligned(images)["out"] - expected).abs().max().item() > 1e-3


@pytest.mark.peers
def test_mmseg_swin_patch_merging_needs_the_unfold_reordering(mmseg_models, tmp_path, monkeypatch):
    """Without reordering the merged channels the outputs differ: the transform is doing real work."""
    from upernet.convert import mmseg as mmseg_format

    theirs = build_mmseg(mmseg_models, SWIN, [32, 64, 128, 256])
    path = tmp_path / "swin.pth"
    torch.save({"meta": {}, "state_dict": theirs.state_dict()}, path)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    expected = mmseg_logits(theirs, images)
    monkeypatch.setattr(mmseg_format, "_from_unfold_order", lambda state_dict: state_dict)
    unordered = mmseg_format.convert_mmseg(path)
    with torch.no_grad():
        assert (unordered(images)["out"] - expected).abs().max().item() > 1e-2


def test_resnet_depth_and_variant_names():
    from upernet.convert.mmseg import resnet_depth, resnet_variant

    keys = [f"backbone.layer3.{i}.conv3.weight" for i in range(23)]
    assert resnet_depth(keys, "backbone.", "ckpt") == 101
    assert resnet_depth(keys[:6], "backbone.", "ckpt") == 50
    with pytest.raises(ValueError, match="ckpt: a ResNet with 2 bottleneck blocks in stage 3"):
        resnet_depth(keys[:2], "backbone.", "ckpt")
    assert [resnet_variant(101, s) for s in (32, 16, 8)] == ["upernet_r101", "upernet_r101_d16", "upernet_r101_d8"]


# ---- the published checkpoints: every file name converts with no option -------------------------------
# mmsegmentation's UPerNet R-50/101 rows (configs/upernet/README.md), as downloaded; their meta holds the
# training config text, the class names and the palette.
PUBLISHED_RESNET = {
    "upernet_r50_512x512_160k_ade20k_20200615_184328-8534de8d.pth": (50, "ade20k"),
    "upernet_r101_512x512_160k_ade20k_20200615_161951-91b32684.pth": (101, "ade20k"),
    "upernet_r50_512x1024_80k_cityscapes_20200607_052207-848beca8.pth": (50, "cityscapes"),
    "upernet_r101_512x1024_80k_cityscapes_20200607_002403-f05f2345.pth": (101, "cityscapes"),
    "upernet_r50_512x512_40k_voc12aug_20200613_162257-ca9bcc6b.pth": (50, "voc"),
    "upernet_r101_512x512_40k_voc12aug_20200613_163549-e26476ac.pth": (101, "voc"),
}
CONFIG_TEXT = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(type='EncoderDecoder', "
               "pretrained='open-mmlab://resnet50_v1c', backbone=dict(type='ResNetV1c', depth=50, num_stages=4, "
               "out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1), strides=(1, 2, 2, 2)))\n")


@pytest.fixture(scope="module")
def mmseg_resnet_weights(mmseg_models):
    """Their EncoderDecoder with a full-width ResNetV1c-50/101 (narrow heads), one state dict per depth."""
    weights = {}
    for depth in (50, 101):
        backbone = dict(resnet(32), depth=depth)
        weights[depth] = build_mmseg(mmseg_models, backbone, [256, 512, 1024, 2048]).state_dict()
    return weights


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED_RESNET))
def test_every_published_resnet_checkpoint_converts_without_an_option(mmseg_resnet_weights, tmp_path, name):
    from upernet import cli, load_model
    from upernet.data.classes import DATASET_META

    depth, dataset = PUBLISHED_RESNET[name]
    classes, palette = DATASET_META[dataset]["class_names"], DATASET_META[dataset]["palette"]
    generator = torch.Generator().manual_seed(depth)
    state_dict = dict(mmseg_resnet_weights[depth])
    for head in ("decode_head.conv_seg", "auxiliary_head.conv_seg"):  # the classifiers of the dataset's classes
        width = state_dict[f"{head}.weight"].shape[1]
        state_dict[f"{head}.weight"] = torch.randn(len(classes), width, 1, 1, generator=generator)
        state_dict[f"{head}.bias"] = torch.randn(len(classes), generator=generator)
    path = tmp_path / name
    torch.save({"meta": {"config": CONFIG_TEXT, "CLASSES": tuple(classes), "PALETTE": palette},
                "state_dict": state_dict}, path)

    assert cli.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours")
    assert ours.config["name"] == f"upernet_r{depth}"
    assert ours.num_classes == len(classes) and ours.meta["class_names"] == list(classes)
    assert torch.equal(ours.decode_head.classifier.weight, state_dict["decode_head.conv_seg.weight"])


@pytest.mark.peers
@pytest.mark.parametrize("name, case", [
    ("upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth", "convnext"),
    ("upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth", "swin"),
])
def test_published_convnext_and_swin_names_convert_without_an_option(mmseg_models, tmp_path, name, case):
    """The published names carry no option the converter needs: the layout is read from the weights."""
    from upernet import cli, load_model

    backbone, in_channels, _, variant = CASES[case]
    path = tmp_path / name
    torch.save({"meta": {}, "state_dict": build_mmseg(mmseg_models, backbone, in_channels).state_dict()}, path)
    assert cli.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert load_model(tmp_path / "ours").config["name"] == variant


@pytest.mark.slow
def test_published_internimage_checkpoint_converts_without_an_option(tmp_path):
    """InternImage's UPerNet-T as published (upernet_internimage_t_512_160k_ade20k.pth, mmsegmentation
    layout): the variant and its offset scale come from the tensor shapes, the classes from the meta."""
    from test_internimage import to_mmseg

    import upernet
    from upernet import cli
    from upernet.data.classes import DATASET_META

    torch.manual_seed(0)
    model = upernet.build_model("upernet_internimage_t", num_classes=150)
    classes = DATASET_META["ade20k"]["class_names"]
    path = tmp_path / "upernet_internimage_t_512_160k_ade20k.pth"
    torch.save({"state_dict": to_mmseg(model.state_dict()), "meta": {"CLASSES": tuple(classes)}}, path)

    assert cli.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    ours = upernet.load_model(tmp_path / "ours")
    assert ours.config["name"] == "upernet_internimage_t" and ours.meta["class_names"] == classes
    assert ours.backbone.levels[0].blocks[0].dcn.offset_scale == 1.0
    theirs = model.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in ours.state_dict().items())
