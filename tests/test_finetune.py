"""Fine-tuning with `model.init_from`: every tensor that fits is copied, the classifiers of another class
count start afresh and are listed, anything else is an error; the label protocol travels in the model."""
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

import upernet
from upernet.config import ConfigNote, load_config
from upernet.data.protocol import protocol_options
from upernet.errors import UserError
from upernet.loading import init_from
from upernet.models.init_from import copy_fitting_weights
from upernet.models.weights import input_convs
from upernet.training.loop import build_datasets, build_training_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIFIERS = ["decode_head.classifier.weight", "decode_head.classifier.bias",
               "aux_head.classifier.weight", "aux_head.classifier.bias"]
NEW_CLASSES = ["water", "sand", "grass", "rock", "road"]
COLOURS = [(30, 80, 170), (220, 200, 140), (40, 160, 60), (120, 120, 120), (60, 60, 60)]
# A few steps at 32-64 px: the recipe's data and schedule, shrunk.
TINY = ["data.crop_size=[32,32]", "data.scale=[64,32]", "data.batch_size=2", "data.workers=0",
        "val.interval=0", "val.max_images=1", "schedule.warmup_iters=0", "train.log_interval=1"]


def write_stripes(root, size: int = 48, count: int = 2) -> dict:
    """A 5-class folder dataset (`img_dir/`, `ann_dir/`): vertical stripes of one colour per class, with noise;
    returns its `data.options`."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            order = rng.permutation(len(NEW_CLASSES))
            label = np.repeat(order, size // len(NEW_CLASSES) + 1)[:size][None].repeat(size, 0).astype(np.uint8)
            image = np.array(COLOURS, dtype=np.float32)[label] + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"{i}.png")
            Image.fromarray(label).save(root / "ann_dir" / split / f"{i}.png")
    return {"classes": NEW_CLASSES, "palette": [list(c) for c in COLOURS]}


def saved_source(tmp_path, name="upernet_convnext_tiny", num_classes=7, **overrides):
    folder = tmp_path / "source"
    upernet.save_model(tiny_model(name, num_classes=num_classes, **overrides), folder)
    return folder


# ---- matching ---------------------------------------------------------------------------------------
def test_copies_what_fits_and_reinitialises_only_the_classifiers():
    source, model = tiny_model("upernet_convnext_tiny", num_classes=150, seed=1), tiny_model("upernet_convnext_tiny")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = copy_fitting_weights(model, source.state_dict(), "src")
    assert fitted.reinitialised == CLASSIFIERS and fitted.dropped == []
    for key, tensor in model.state_dict().items():
        expected = fresh[key] if key in CLASSIFIERS else source.state_dict()[key]
        assert torch.equal(tensor, expected), key
    assert sorted(fitted.copied + fitted.reinitialised) == sorted(fresh)


def test_same_class_count_copies_the_classifiers_too():
    source, model = tiny_model("upernet_convnext_tiny", seed=1), tiny_model("upernet_convnext_tiny")
    assert copy_fitting_weights(model, source.state_dict(), "src").reinitialised == []
    assert torch.equal(model.decode_head.classifier.weight, source.decode_head.classifier.weight)


def test_another_architecture_is_an_error_naming_the_tensors():
    source = tiny_model("upernet_convnext_tiny", channels=24)
    with pytest.raises(UserError, match=r"src: .*shapes differ: .*decode_head\.") as error:
        copy_fitting_weights(tiny_model("upernet_convnext_tiny"), source.state_dict(), "src")
    assert "\n" not in str(error.value)


def test_missing_and_unexpected_tensors_are_errors():
    with_aux, without_aux = tiny_model("upernet_convnext_tiny"), tiny_model("upernet_convnext_tiny", aux_head=False)
    with pytest.raises(UserError, match=r"missing from the source: aux_head\."):
        copy_fitting_weights(tiny_model("upernet_convnext_tiny"), without_aux.state_dict(), "src")
    state = {**with_aux.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"not in the model: .*extra\.weight"):
        copy_fitting_weights(tiny_model("upernet_convnext_tiny"), state, "src")


def test_an_auxiliary_head_the_model_leaves_out_is_dropped_and_listed():
    fitted = copy_fitting_weights(tiny_model("upernet_convnext_tiny", aux_head=False),
                                  tiny_model("upernet_convnext_tiny").state_dict(), "src")
    assert fitted.dropped and all(k.startswith("aux_head.") for k in fitted.dropped)


def test_an_rgb_source_starts_a_four_band_model_with_its_input_conv_adapted():
    from timm.models import adapt_input_conv

    source = tiny_model("upernet_convnext_tiny").state_dict()
    model = tiny_model("upernet_convnext_tiny", in_channels=4, num_classes=7)
    (key, channels), = input_convs(model).items()
    assert key.startswith("backbone.") and channels == 4
    fitted = copy_fitting_weights(model, source, "src")
    assert fitted.adapted == [key] and fitted.reinitialised == CLASSIFIERS
    assert torch.equal(model.state_dict()[key], adapt_input_conv(4, source[key]))  # timm's repeat-and-rescale
    assert source[key].shape[1] == 3  # the source's tensors are left as they were
    rest = [k for k in fitted.copied if k != key]
    assert rest and all(torch.equal(model.state_dict()[k], source[k]) for k in rest)


def test_a_source_with_other_than_rgb_input_names_in_channels():
    source = tiny_model("upernet_convnext_tiny", in_channels=4).state_dict()
    with pytest.raises(UserError, match=r"takes 4 channels and the model 3.*in_channels=4"):
        copy_fitting_weights(tiny_model("upernet_convnext_tiny"), source, "src")


def test_init_from_takes_the_source_architecture_and_the_recipe_args_of_the_same_variant(tmp_path):
    folder = saved_source(tmp_path)
    model, fitted, _ = init_from(folder, 3, {"backbone_args": {"drop_path_rate": 0.2}}, "upernet_convnext_tiny")
    assert model.num_classes == 3 and model.training and fitted.reinitialised == CLASSIFIERS
    assert model.config["args"]["backbone_args"] == {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1],
                                                     "drop_path_rate": 0.2}
    other, _, _ = init_from(folder, 3, {"model_name": "resnet18"}, "upernet_timm")  # another variant's args: unused
    assert other.config["name"] == "upernet_convnext_tiny" and "model_name" not in other.config["args"]


def test_init_from_a_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        init_from(tmp_path / "absent", 3)


@pytest.mark.parametrize("override, message", [
    ("train.task=multitask", "model.init_from=.* is for train.task=segmentation"),
    ("model.backbone_checkpoint=b.pth", "model.init_from and model.backbone_checkpoint both set"),
])
def test_config_refuses_init_from_where_it_cannot_apply(override, message):
    extra = ["data.kind=multitask_synthetic"] if "multitask" in override else []
    with pytest.raises(UserError, match=message):
        load_config(None, ["model.init_from=src", override, *extra])


# ---- training -----------------------------------------------------------------------------------------
def test_training_from_a_folder_lists_the_reinitialised_tensors_saves_the_architecture_and_resumes(tmp_path):
    folder = saved_source(tmp_path, num_classes=5)
    source = upernet.load_model(folder).state_dict()
    config = load_config(None, [f"model.init_from={folder}", "data.options={num_samples: 4, image_size: 32}",
                                "schedule.iters=2", *TINY])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigNote)
        train(config, tmp_path / "run", stop_at=1, progress=False)
    notes = [str(w.message) for w in caught if w.category is ConfigNote]
    assert any(f"re-initialised (new class count 7): {', '.join(CLASSIFIERS)}" in n for n in notes), notes
    assert any("model.name=upernet_timm and its model.args replaced by upernet_convnext_tiny" in n for n in notes)
    stored = load_config(tmp_path / "run" / "config.yaml")
    assert stored.model.name == "upernet_convnext_tiny" and stored.model.args["backbone_args"]["dims"] == [8, 16, 32, 64]
    # Resuming rebuilds the architecture from the run's config, without reading the source again.
    (folder / "model.safetensors").unlink()
    result = train(stored, tmp_path / "run", resume=tmp_path / "run", progress=False)
    assert result["iteration"] == 2
    model = upernet.load_model(tmp_path / "run")
    assert model.meta["class_names"][0] == "sky" and model.meta["reduce_zero_label"] is False
    (first_conv, _), = input_convs(model).items()
    assert not torch.equal(model.state_dict()[first_conv], source[first_conv])  # trained from the source's


# ---- the label protocol inside the model -------------------------------------------------------------
def test_protocol_options_fill_the_recipe_from_the_model_and_refuse_the_other_reading():
    meta = {"class_names": ["a", "b"], "palette": [[0, 0, 0], [9, 9, 9]], "reduce_zero_label": True}
    assert protocol_options("folder", {}, meta) == {"classes": ["a", "b"], "palette": [[0, 0, 0], [9, 9, 9]],
                                                    "reduce_zero_label": True}
    assert protocol_options("folder", {"classes": ["x", "y"]}, meta)["classes"] == ["x", "y"]
    assert protocol_options("synthetic", {"image_size": 32}, meta) == {"image_size": 32}
    assert protocol_options("folder", {"classes": 2}, {}) == {"classes": 2}  # an old model: today's defaults
    with pytest.raises(UserError, match="data.options.reduce_zero_label=false but the model was trained with "
                                        "reduce_zero_label=true"):
        protocol_options("folder", {"reduce_zero_label": False}, meta)


def test_eval_reads_a_folder_with_the_protocol_saved_in_the_model(tmp_path):
    options = write_stripes(tmp_path / "data", size=32)
    model = tiny_model("upernet_convnext_tiny", num_classes=4)
    model.meta = {"class_names": NEW_CLASSES[1:], "palette": [list(c) for c in COLOURS[1:]], "reduce_zero_label": True}
    upernet.save_model(model, tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert "mask value 0 is unlabelled (ignored), value v is class v-1" in card
    from upernet.evaluation.evaluate import evaluate_model

    loaded = upernet.load_model(tmp_path / "model")
    config = load_config(None, ["data.kind=folder", f"data.root={tmp_path / 'data'}", "data.options={}"])
    results = evaluate_model(loaded, config, device="cpu", precision="fp32", progress=False)
    assert [row["class"] for row in results["per_class"]] == NEW_CLASSES[1:]
    wrong = load_config(None, ["data.kind=folder", f"data.root={tmp_path / 'data'}",
                               f"data.options={json.dumps({**options, 'reduce_zero_label': False})}"])
    with pytest.raises(UserError, match="reduce_zero_label"):
        evaluate_model(loaded, wrong, device="cpu", precision="fp32", progress=False)


# ---- end to end: a Hugging Face UperNet of 150 classes fine-tuned on a 5-class folder ------------------
HF_SMALL = {"convnext": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
            "swin": dict(embed_dim=8, depths=[2, 2, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)}


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_huggingface_upernet_fine_tuned_on_a_folder(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    backbone = {"convnext": transformers.ConvNextConfig, "swin": transformers.SwinConfig}[family](
        **HF_SMALL[family], out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    hf = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, num_labels=150, hidden_size=16, auxiliary_channels=8))
    hf.save_pretrained(tmp_path / "hf")
    source = upernet.load_model(tmp_path / "hf").state_dict()
    options = write_stripes(tmp_path / "data")
    config = load_config("finetune_folder", [f"model.init_from={tmp_path / 'hf'}", f"data.root={tmp_path / 'data'}",
                                             f"data.options={json.dumps(options)}", "schedule.iters=8",
                                             "data.photometric=false", "data.flip_prob=0", "optim.lr=0.003",
                                             *TINY])

    # Before the first step: every tensor but the four classifiers is the source's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigNote)
        model = build_training_model(config, build_datasets(config)[0])
    state = model.state_dict()
    changed = [k for k in state if not (state[k].shape == source[k].shape and torch.equal(state[k], source[k]))]
    assert changed == CLASSIFIERS
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("decode_head.fpn") for k in state)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigNote)
        train(config, tmp_path / "run", progress=False)
    assert any(f"re-initialised (new class count 5): {', '.join(CLASSIFIERS)}" in str(w.message) for w in caught)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])

    tuned = upernet.load_model(tmp_path / "run")
    assert tuned.num_classes == 5 and tuned.meta["class_names"] == NEW_CLASSES
    result = upernet.Segmenter(tuned, device="cpu")(Image.open(tmp_path / "data" / "img_dir" / "val" / "0.png"))
    assert result.class_names == NEW_CLASSES and set(result.areas()) <= set(NEW_CLASSES)
