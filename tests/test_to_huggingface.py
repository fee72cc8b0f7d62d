"""Our ConvNeXt / Swin UPerNet -> a transformers UperNet folder: strict load, same logits, same masks."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from test_huggingface import randomize_

import upernet
from upernet.cli import main as cli
from upernet.errors import UserError
from upernet.loading import save_huggingface

pytestmark = pytest.mark.peers
CLASSES = ["sky", "road", "tree", "car", "person"]


@pytest.fixture(autouse=True, scope="module")
def transformers():
    return pytest.importorskip("transformers")


def ours(name: str, **overrides) -> torch.nn.Module:
    """A tiny model of ours with every normalisation and scale made to matter, and class names."""
    model = tiny_model(name, **overrides).eval()
    randomize_(model, classifier_std=1.0)
    model.meta.update(class_names=CLASSES, test_size="96x64")
    return model


def load_hf(folder):
    from transformers import UperNetForSemanticSegmentation

    hf, info = UperNetForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    return hf.eval(), info


@pytest.mark.parametrize("name,overrides", [
    ("upernet_convnext_tiny", {}),
    ("upernet_swin_tiny", {}),
    ("upernet_swin_tiny", {"aux_head": False, "pool_scales": [1, 3]}),
    ("upernet_convnext_tiny", {"aux_num_convs": 2, "backbone_args": {"dims": (8, 16, 32, 64), "depths": (1, 2, 1, 1),
                                                                   "ls_init_value": None}}),
])
def test_transformers_loads_it_with_the_same_logits(tmp_path, name, overrides):
    model = ours(name, **overrides)
    save_huggingface(model, tmp_path)
    hf, info = load_hf(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == dict(enumerate(CLASSES)) and hf.config.label2id["car"] == 3
    for size in [(64, 96), (75, 101)]:  # 75x101: not divisible by any stride or window
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected, got = model(images)["out"], hf(images).logits
        assert expected.std() > 0.2
        assert (expected - got).abs().max().item() <= 1e-4
    # and back: the import reads what the export wrote, tensor for tensor
    again = upernet.load_model(tmp_path)
    assert again.meta["class_names"] == CLASSES
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_folder_contents(tmp_path):
    save_huggingface(ours("upernet_swin_tiny"), tmp_path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SegformerImageProcessor"
    assert processor["size"] == {"shortest_edge": 64, "longest_edge": 96}
    assert processor["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transformers" in card and "3: car" in card and 'pipeline("image-segmentation"' in card
    assert "Differences from upernet's own pipeline" in card and "antialias" in card


@pytest.mark.slow
def test_pipeline_masks_match_upernet_predict(tmp_path, capsys):
    """`pipeline("image-segmentation")` on the exported folder = `upernet predict` on ours (images at the
    model's test size, so neither resizes)."""
    from transformers import pipeline

    model = ours("upernet_convnext_tiny")
    with torch.no_grad():  # centre the logits, so that every class wins somewhere on noise images
        model.decode_head.classifier.bias -= model(torch.randn(1, 3, 64, 96))["out"].mean((0, 2, 3))
    model.save(tmp_path / "ours")
    assert cli(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    assert "transformers UperNet folder" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(images[-1])
    assert cli(["predict", "--model", str(tmp_path / "ours"), *map(str, images), "--out", str(tmp_path / "pred"),
                "--precision", "fp32", "--device", "cpu"]) == 0
    segment = pipeline("image-segmentation", model=str(tmp_path / "hf"), device="cpu")
    for image in images:
        labels = np.array(Image.open(tmp_path / "pred" / f"{image.stem}_labels.png"))
        theirs = np.full(labels.shape, -1)
        for entry in segment(str(image), subtask="semantic"):
            theirs[np.array(entry["mask"]) > 0] = CLASSES.index(entry["label"])
        assert len(np.unique(labels)) >= 3
        assert (theirs == labels).all()


def test_what_cannot_be_written(tmp_path, capsys):
    tiny_model("upernet_r50").save(tmp_path / "r50")
    assert cli(["convert", str(tmp_path / "r50"), str(tmp_path / "x"), "--to", "huggingface"]) == 2
    assert "only UPerNet with a ConvNeXt or Swin backbone" in capsys.readouterr().err
    with pytest.raises(UserError, match="only UPerNet with a ConvNeXt or Swin backbone"):
        save_huggingface(tiny_model("upernet_r50"), tmp_path)
    with pytest.raises(UserError, match="align_corners=True"):
        save_huggingface(tiny_model("upernet_convnext_tiny", align_corners=True), tmp_path)
