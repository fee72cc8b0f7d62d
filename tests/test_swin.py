"""Our SwinTransformer against transformers' SwinBackbone, and its own invariants."""
import inspect
import re

import pytest
import torch

import upernet
from upernet.convert.common import rename_keys
from upernet.convert.huggingface import SWIN_RULES, fuse_qkv
from upernet.models.backbones import SwinTransformer
from upernet.models.backbones.swin import SwinBlock, WindowAttention

STAGES = ["stage1", "stage2", "stage3", "stage4"]
SMALL = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 7}


def hf_backbone_and_ours(**arch) -> tuple[torch.nn.Module, SwinTransformer]:
    """A random HF SwinBackbone (non-trivial norms and position biases) and ours with its weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.swin.modeling_swin import SwinBackbone

    torch.manual_seed(0)
    hf = SwinBackbone(transformers.SwinConfig(**arch, out_features=STAGES)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    renamed, dropped = rename_keys({f"backbone.{k}": v for k, v in hf.state_dict().items()}, SWIN_RULES, "hf")
    ours = SwinTransformer(**arch).eval()
    ours.load_state_dict({k.removeprefix("backbone."): v for k, v in fuse_qkv(renamed, "hf").items()}, strict=True)
    assert all("layernorm" in k for k in dropped)  # only the classifier's final norm, unused by the backbone
    return hf, ours


@pytest.fixture(scope="module")
def small_pair() -> tuple[torch.nn.Module, SwinTransformer]:
    return hf_backbone_and_ours(**SMALL)


@pytest.mark.peers
@pytest.mark.parametrize("size", [(512, 512), (333, 517), (64, 64), (30, 45)])
def test_matches_hf_swin_backbone(small_pair, size):
    """512x512 (stage maps 128..16), odd sizes (padding everywhere), and maps smaller than the window."""
    hf, ours = small_pair
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = hf(images).feature_maps
        got = ours(images)
    assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in expected]
    for level, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max().item() <= 1e-4, f"level {level} at {size}"


@pytest.mark.peers
def test_matches_hf_other_hyperparameters():
    """Window 5 (shift 2), patch size 2, MLP ratio 2, no qkv bias."""
    arch = {**SMALL, "window_size": 5, "patch_size": 2, "mlp_ratio": 2.0, "qkv_bias": False}
    hf, ours = hf_backbone_and_ours(**arch)
    assert ours.strides == [2, 4, 8, 16] and ours.stages[0].blocks[0].attn.qkv.bias is None
    images = torch.randn(1, 3, 61, 90)
    with torch.no_grad():
        diffs = [(a - b).abs().max().item() for a, b in zip(ours(images), hf(images).feature_maps)]
    assert max(diffs) <= 1e-4


@pytest.mark.peers
def test_shift_then_pad_would_differ(small_pair):
    """Why the order matters (timm rolls first): rolling one block's map before padding it changes the output."""
    ours = small_pair[1]
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        reference = ours(images)
        block = ours.stages[0].blocks[1]  # a shifted block on the 32x32 map (not a multiple of 7)
        original_forward = block.forward

        def shift_before_pad(x, mask):  # roll, then pad and attend in unshifted windows, roll back
            shifted = torch.roll(x, (-block.shift, -block.shift), (1, 2))
            saved, block.shift = block.shift, 0
            out = original_forward(shifted, None)
            block.shift = saved
            return torch.roll(out, (block.shift, block.shift), (1, 2))

        block.forward = shift_before_pad
        changed = ours(images)
    assert (changed[0] - reference[0]).abs().max().item() > 1e-2


def test_levels_channels_strides_and_any_size():
    model = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=3)
    assert model.channels == [8, 16, 32, 64] and model.strides == [4, 8, 16, 32]
    features = model(torch.randn(1, 3, 37, 50))
    # Padding (image to a patch multiple, maps to even sizes) makes each level ceil(size / stride).
    assert [tuple(f.shape[1:]) for f in features] == [(8, 10, 13), (16, 5, 7), (32, 3, 4), (64, 2, 2)]


def test_drop_path_grows_linearly_and_index_is_not_saved():
    model = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), drop_path_rate=0.7)
    blocks = [b for stage in model.stages for b in stage.blocks]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.7 * i / 7 for i in range(8)])
    assert [b.shift for b in blocks[:2]] == [0, 3]
    assert not any("relative_position_index" in k for k in model.state_dict())
    assert any(k.endswith("relative_position_index") for k, _ in model.named_buffers())


@pytest.mark.parametrize("name,published", [("upernet_swin_tiny", 60), ("upernet_swin_small", 81),
                                            ("upernet_swin_base", 121), ("upernet_swin_large", 234)])
def test_published_parameter_counts(name, published):
    with torch.device("meta"):
        model = upernet.build_model(name, num_classes=150)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - published) < 0.6


def test_no_pretrained_backbone():
    with pytest.raises(ValueError, match="pretrained_backbone is not available for Swin"):
        upernet.build_model("upernet_swin_tiny", pretrained_backbone=True)


def test_docstring_args_match_signatures():
    for obj in [SwinTransformer, SwinBlock, WindowAttention]:
        documented = re.findall(r"^    (\w+):", inspect.getdoc(obj).split("Args:")[1], flags=re.M)
        assert documented == [p for p in inspect.signature(obj.__init__).parameters if p != "self"], obj.__name__


@pytest.mark.peers
def test_onnx_export_matches(tmp_path):
    """The padding arithmetic stays non-negative, so the exported graph pads like eager mode at odd sizes."""
    onnxruntime = pytest.importorskip("onnxruntime")

    model = SwinTransformer(embed_dim=8, depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2)).eval()
    images = torch.randn(1, 3, 61, 90)
    torch.onnx.export(model, (images,), str(tmp_path / "swin.onnx"), dynamo=False, opset_version=17,
                      input_names=["images"])
    outputs = onnxruntime.InferenceSession(str(tmp_path / "swin.onnx")).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert max((torch.from_numpy(o) - e).abs().max().item() for o, e in zip(outputs, expected)) <= 1e-4
