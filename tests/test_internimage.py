"""InternImage: reference key layout, official-checkpoint conversion, ONNX, FLOP convention, lr decay."""
import re

import numpy as np
import pytest
import torch

import upernet
from upernet.cli import main as cli_main
from upernet.models.backbones.dcnv3 import DCNv3

SMALL_HEAD = {"channels": 16, "aux_channels": 8}


def small_model(post_norm: bool, offset_scale: float, seed: int = 0, **head):
    torch.manual_seed(seed)
    args = {"channels": 8, "depths": (1, 1, 2, 1), "groups": (1, 2, 2, 4), "post_norm": post_norm,
            "offset_scale": offset_scale}
    return upernet.build_model("upernet_internimage_t", num_classes=4, backbone_args=args, **SMALL_HEAD, **head)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every float tensor random (offsets and masks start at zero otherwise), running variances positive."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor) * 0.2)
    return model.eval()


# Our head names -> mmsegmentation's (the layout of the official InternImage checkpoints).
TO_MMSEG = [
    (r"decode_head\.ppm\.(\d+)\.", r"decode_head.psp_modules.\1.1."),
    (r"decode_head\.ppm_bottleneck\.", "decode_head.bottleneck."),
    (r"decode_head\.fusion\.", "decode_head.fpn_bottleneck."),
    (r"decode_head\.classifier\.", "decode_head.conv_seg."),
    (r"aux_head\.classifier\.", "auxiliary_head.conv_seg."),
    (r"aux_head\.", "auxiliary_head."),
]


def to_mmseg(state_dict):
    out = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in TO_MMSEG:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


def test_reference_key_names():
    pre = small_model(post_norm=False, offset_scale=1.0).state_dict()
    post = small_model(post_norm=True, offset_scale=1.0).state_dict()
    for key in [
        "backbone.patch_embed.conv1.weight", "backbone.patch_embed.norm1.1.weight", "backbone.patch_embed.norm2.1.bias",
        "backbone.levels.0.blocks.0.norm1.0.weight", "backbone.levels.0.blocks.0.gamma1",
        "backbone.levels.0.blocks.0.dcn.dw_conv.0.weight", "backbone.levels.0.blocks.0.dcn.dw_conv.1.1.weight",
        "backbone.levels.0.blocks.0.dcn.offset.weight", "backbone.levels.0.blocks.0.dcn.mask.bias",
        "backbone.levels.0.blocks.0.dcn.input_proj.weight", "backbone.levels.0.blocks.0.mlp.fc2.weight",
        "backbone.levels.0.downsample.conv.weight", "backbone.levels.0.downsample.norm.1.weight",
        "backbone.levels.3.norm.0.weight",
    ]:
        assert key in pre, key
    assert "backbone.levels.3.downsample.conv.weight" not in pre
    assert not any(".norm.0." in k for k in post if k.startswith("backbone.levels."))  # post-norm: no level norm
    assert "backbone.levels.0.blocks.0.dcn.offset.weight" in post


def test_backbone_features_and_strides():
    model = small_model(post_norm=False, offset_scale=1.0).eval()
    features = model.backbone(torch.randn(1, 3, 70, 90))
    assert [tuple(f.shape[1:]) for f in features] == [(8, 18, 23), (16, 9, 12), (32, 5, 6), (64, 3, 3)]
    assert model.backbone.strides == [4, 8, 16, 32]


@pytest.mark.parametrize("post_norm,offset_scale", [(False, 1.0), (True, 2.0)])
def test_official_checkpoint_layout_converts(tmp_path, post_norm, offset_scale):
    model = randomise(small_model(post_norm, offset_scale))
    config_text = f"model = dict(backbone=dict(type='InternImage', offset_scale={offset_scale}, post_norm={post_norm}))"
    checkpoint = {"state_dict": to_mmseg(model.state_dict()),
                  "meta": {"CLASSES": ("a", "b", "c", "d"), "PALETTE": [[1, 2, 3]] * 4, "config": config_text}}
    assert set(checkpoint["state_dict"]) >= {"decode_head.psp_modules.0.1.conv.weight", "decode_head.fpn_bottleneck.bn.weight",
                                             "decode_head.conv_seg.bias", "auxiliary_head.convs.0.conv.weight"}
    src = tmp_path / "iter_160000.pth"
    torch.save(checkpoint, src)

    from upernet.convert import detect_format

    assert detect_format(src) == "internimage"
    assert cli_main(["convert", str(src), str(tmp_path / "converted")]) == 0
    converted = upernet.load_model(tmp_path / "converted")
    backbone = converted.backbone
    assert backbone.levels[0].blocks[0].dcn.offset_scale == offset_scale
    assert converted.meta["class_names"] == ["a", "b", "c", "d"]
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, got = model(images)["out"], converted(images)["out"]
    assert (expected - got).abs().max().item() <= 1e-5


@pytest.mark.peers
def test_onnx_export_matches_pytorch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")

    # Pool scales 1 and 2: the legacy exporter needs the stride-32 map (2x2) divisible by each.
    model = randomise(small_model(post_norm=True, offset_scale=2.0, pool_scales=(1, 2)))
    images = torch.randn(1, 3, 64, 64)
    path = tmp_path / "internimage.onnx"
    torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=["out"], opset_version=17,
                      dynamo=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Gather" in ops and not any("DCN" in op or op.startswith("ATen") for op in ops)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch_out = model(images)["out"].numpy()
    assert np.abs(onnx_out - torch_out).max() <= 1e-4


def test_flop_count_adds_published_dcn_convention():
    from upernet.models.stats import count_macs

    model = small_model(post_norm=False, offset_scale=1.0)
    h, w = 64, 96
    dcn_macs = sum(5 * (h // s) * (w // s) * 9 * c * d
                   for s, c, d in zip([4, 8, 16, 32], model.backbone.channels, model.backbone.depths))
    layers = [m for m in model.modules() if isinstance(m, DCNv3)]
    with_sampling = count_macs(model, (h, w))
    for layer in layers:  # hide the convention: only torch's counter remains
        layer.extra_macs = lambda out: 0
    assert with_sampling - count_macs(model, (h, w)) == dcn_macs


def test_layer_wise_lr_decay_as_reference():
    from upernet.config import OptimConfig
    from upernet.training.optim import param_groups

    model = small_model(post_norm=False, offset_scale=1.0)  # depths 1, 1, 2, 1: 5 layers
    cfg = OptimConfig(name="adamw", lr=1.0, weight_decay=0.05, no_weight_decay=["norm", "bias", "1d"],
                      layer_decay_type="layer_wise", layer_decay_rate=0.5, layer_decay_num_layers=5)
    groups = {name: g for g in param_groups(model, cfg) for name in g["param_names"]}
    expected_ids = {
        "backbone.patch_embed.conv1.weight": 0,
        "backbone.levels.0.blocks.0.dcn.offset.weight": 1,
        "backbone.levels.0.downsample.conv.weight": 2,  # a level's downsampling: its last layer's id
        "backbone.levels.2.blocks.1.mlp.fc1.weight": 4,
        "backbone.levels.3.blocks.0.dcn.input_proj.weight": 5,
        "backbone.levels.1.downsample.norm.1.weight": 3,
        "backbone.levels.2.norm.0.weight": 5,
        "backbone.levels.3.norm.0.weight": 5,  # the reference gives level 3's norm level 2's norm's id
        "decode_head.classifier.weight": 6,
        "aux_head.convs.0.conv.weight": 6,
    }
    for name, layer_id in expected_ids.items():
        assert groups[name]["lr_scale"] == pytest.approx(0.5 ** (6 - layer_id)), name
    for name in ["backbone.levels.1.blocks.0.gamma1", "backbone.levels.1.blocks.0.dcn.offset.bias",
                 "backbone.levels.1.blocks.0.norm2.0.weight", "backbone.patch_embed.conv1.bias"]:
        assert groups[name]["weight_decay"] == 0.0, name
    assert groups["backbone.levels.1.blocks.0.dcn.offset.weight"]["weight_decay"] == 0.05  # the reference decays it
    # The recipe: no decay on offsets either (`no_weight_decay: [..., offset]`, as configs/ set it).
    cfg.no_weight_decay = ["norm", "bias", "1d", "offset"]
    groups = {name: g for g in param_groups(model, cfg) for name in g["param_names"]}
    assert groups["backbone.levels.1.blocks.0.dcn.offset.weight"]["weight_decay"] == 0.0
    assert groups["backbone.levels.1.blocks.0.dcn.mask.weight"]["weight_decay"] == 0.05


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke(compiled_dcnv3, capsys):
    bench = load_benchmark("dcnv3")
    bench.main(["--smoke", "--dtypes", "float32"])
    out = capsys.readouterr().out
    assert "UPerNet InternImage-T forward" in out and "DCNv3 layer" in out and "compiled vs grid_sample" in out
    # The straightforward formulation it compares against computes the same thing.
    torch.manual_seed(0)
    x, offset = torch.randn(1, 6, 7, 8), torch.randn(1, 6, 7, 2 * 9 * 2)
    mask = torch.randn(1, 6, 7, 2, 9).softmax(-1).view(1, 6, 7, 18)
    from upernet.ops.dcnv3 import dcnv3_core

    assert (bench.straightforward_core(x, offset, mask, 3, 2, 2.0) - dcnv3_core(x, offset, mask, 3, 2, 2.0)).abs().max() < 1e-5
    # So does torchvision's compiled DCNv2 operator with a depthwise all-ones kernel (a peer
    # implementation of the same sampling), at offset_scale 1 and 2 (dilation 2) and kernel 5.
    for kernel, scale in ((3, 1.0), (3, 2.0), (5, 1.0)):
        offset = torch.randn(1, 6, 7, 2 * kernel * kernel * 2) * 2
        mask = torch.randn(1, 6, 7, 2, kernel * kernel).softmax(-1).view(1, 6, 7, -1)
        ours = dcnv3_core(x, offset, mask, kernel, 2, scale)
        assert (bench.torchvision_core(x, offset, mask, kernel, 2, scale) - ours).abs().max() < 1e-5


def test_predict_with_compiled_dcnv3_kernel(compiled_dcnv3, tmp_path, monkeypatch):
    """`upernet predict --dcnv3-kernel compiled` gives the labels of the default kernel."""
    from PIL import Image

    from upernet.ops import dcnv3

    monkeypatch.setattr(dcnv3, "_kernel", "torch")  # restored after the test: the flag sets it process-wide
    model = randomise(small_model(post_norm=False, offset_scale=1.0))
    with torch.no_grad():
        model.decode_head.classifier.weight.mul_(20)  # several classes win somewhere
    model.save(tmp_path / "model")
    labels = {}
    for kernel in ("torch", "compiled"):
        out = tmp_path / kernel
        assert cli_main(["predict", "--model", str(tmp_path / "model"), "--out", str(out), "--size", "96",
                     "--precision", "fp32", "--dcnv3-kernel", kernel]) == 0
        (path,) = out.glob("*_labels.png")
        labels[kernel] = np.asarray(Image.open(path))
    assert dcnv3._kernel == "compiled"
    assert len(np.unique(labels["torch"])) > 1
    assert (labels["torch"] == labels["compiled"]).mean() > 0.999


def test_classification_checkpoint_initialises_backbone(tmp_path):
    from upernet.models.backbones.internimage import load_classification_checkpoint

    source = randomise(small_model(post_norm=False, offset_scale=1.0, seed=1)).backbone.state_dict()
    # The layout of internimage_t_1k_224.pth: {"model": backbone keys + classifier}, no layer scales.
    state = {k: v for k, v in source.items() if not k.endswith(("gamma1", "gamma2"))}
    state.update({"conv_head.0.weight": torch.zeros(4, 64, 1, 1), "head.weight": torch.zeros(10, 4)})
    torch.save({"model": state}, tmp_path / "internimage_t_1k_224.pth")
    backbone = small_model(post_norm=False, offset_scale=1.0).backbone
    kept = load_classification_checkpoint(backbone, tmp_path / "internimage_t_1k_224.pth")
    assert kept and all(k.endswith(("gamma1", "gamma2")) for k in kept)
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    del state["levels.0.blocks.0.dcn.offset.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"(?s)broken.pth.*missing keys.*dcn.offset.weight"):
        load_classification_checkpoint(backbone, tmp_path / "broken.pth")


# A tiny InternImage UPerNet trained for one step on 32x32 synthetic scenes (tests/test_train.py's recipe).
TINY_RUN = ["model.name=upernet_internimage_t",
            "model.args={channels: 16, aux_channels: 8, backbone_args: {channels: 8, depths: [1, 1, 1, 1], "
            "groups: [1, 2, 2, 4]}}",
            "data.options={num_samples: 4, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
            "data.batch_size=2", "data.workers=0", "val.interval=0", "val.max_images=1", "schedule.iters=1",
            "schedule.warmup_iters=0", "train.checkpoint_interval=1"]


def tiny_backbone_state() -> dict:
    """The state dict of a backbone of TINY_RUN's size with every tensor random (offsets included)."""
    backbone = upernet.build_model("upernet_internimage_t", num_classes=2, channels=16, aux_channels=8,
                                   backbone_args={"channels": 8, "depths": (1, 1, 1, 1), "groups": (1, 2, 2, 4)}).backbone
    return {k: torch.randn_like(v) * 0.2 for k, v in backbone.state_dict().items()}


def test_backbone_checkpoint_option_initialises_the_training_model(tmp_path):
    """`model.backbone_checkpoint` loads an official ImageNet checkpoint (`{"model": ...}`, classifier
    keys, no layer scales) into the backbone before training; lr 1e-12 keeps them through a step."""
    from upernet.config import load_config
    from upernet.training.loop import build_datasets, build_training_model, train

    torch.manual_seed(3)
    source = tiny_backbone_state()
    state = dict(source, **{"conv_head.0.weight": torch.zeros(4, 64, 1, 1), "head.weight": torch.zeros(10, 4)})
    path = tmp_path / "internimage_t_1k_224.pth"
    torch.save({"model": state}, path)

    config = load_config(None, TINY_RUN + [f"model.backbone_checkpoint={path}", "optim.lr=1.0e-12"])
    assert config.model.backbone_checkpoint == str(path)
    model = build_training_model(config, build_datasets(config)[0])
    loaded = model.backbone.state_dict()
    assert set(source) == set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    fresh = build_training_model(load_config(None, TINY_RUN), build_datasets(config)[0]).backbone.state_dict()
    assert not torch.equal(fresh["levels.0.blocks.0.dcn.offset.weight"], source["levels.0.blocks.0.dcn.offset.weight"])

    train(config, tmp_path / "run", progress=False)
    trained = upernet.load_model(tmp_path / "run" / "model").backbone.state_dict()
    assert all(torch.allclose(trained[k], v, rtol=0, atol=1e-9) for k, v in source.items())


def test_backbone_checkpoint_of_the_wrong_layout_names_the_file(tmp_path):
    from upernet.config import load_config
    from upernet.training.loop import train

    state = tiny_backbone_state()
    del state["levels.1.blocks.0.dcn.mask.weight"]
    path = tmp_path / "not_this_one.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"(?s)not_this_one\.pth.*missing keys.*levels\.1\.blocks\.0\.dcn\.mask\.weight"):
        train(load_config(None, TINY_RUN + [f"model.backbone_checkpoint={path}"]), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        train(load_config(None, TINY_RUN + [f"model.backbone_checkpoint={tmp_path / 'absent.pth'}"]), tmp_path / "run2",
              progress=False)


def test_backbone_checkpoint_of_another_backbone_is_its_state_dict(tmp_path):
    """Other backbones read a state dict of the backbone (here under "backbone.", as segmentation
    checkpoints store it); one that does not fit is an error naming the file."""
    from upernet.config import load_config
    from upernet.training.loop import build_datasets, build_training_model

    overrides = ["model.name=upernet_timm", "model.args={model_name: test_convnext, channels: 16, aux_channels: 8}"]
    config = load_config(None, TINY_RUN + overrides)
    train_set = build_datasets(config)[0]
    source = build_training_model(config, train_set).backbone.state_dict()
    with torch.no_grad():
        source = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.items()}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.items()}}, tmp_path / "convnext.pth")
    model = build_training_model(load_config(None, TINY_RUN + overrides + [f"model.backbone_checkpoint={tmp_path / 'convnext.pth'}"]),
                                 train_set)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in source.items())
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"(?s)other\.pth.*unexpected keys.*something"):
        build_training_model(load_config(None, TINY_RUN + overrides + [f"model.backbone_checkpoint={tmp_path / 'other.pth'}"]),
                             train_set)
