"""Typed config: YAML + dotted overrides, unknown keys and wrong types fail with the key named."""
from pathlib import Path

import pytest
import yaml

import upernet
from upernet.config import Config, config_from_dict, load_config, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "upernet" / "configs").glob("*.yaml"))


def test_overrides_are_typed_and_applied():
    config = config_from_dict({"optim": {"lr": 1, "betas": [0.8, 0.9]}},
                              ["optim.lr=0.02", "data.crop_size=[64,96]", "model.args.backbone_args.drop_path_rate=0.3",
                               "val.crop_size=null", "train.precision=bf16", "optim.no_weight_decay=[norm,pos]"])
    assert config.optim.lr == 0.02 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.9)
    assert config.data.crop_size == (64, 96)
    assert config.model.args == {"backbone_args": {"drop_path_rate": 0.3}}
    assert config.val.crop_size is None
    assert config.train.precision == "bf16"
    assert config.optim.no_weight_decay == ["norm", "pos"]


def test_int_field_takes_no_float_and_float_field_takes_int():
    assert config_from_dict({"schedule": {"min_lr": 0}}).schedule.min_lr == 0.0
    with pytest.raises(ValueError, match=r"schedule.iters: expected int, got 1.5"):
        config_from_dict({}, ["schedule.iters=1.5"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr'. Did you mean 'lr'\?.*Valid keys here: name, lr, momentum"),
    ("optimizer.lr=0.1", r"unknown config key 'optimizer.lr'.*Valid keys here: model, data, optim"),
    ("optim.lr=fast", r"optim.lr: expected float, got 'fast'"),
    ("data.crop_size=[512]", r"data.crop_size: expected tuple\[int, int\], got \[512\]"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("optim.lr.x=1", r"optim.lr is a float, it has no sub-keys"),
    ("optim.no_weight_decay=[norms]", r"unknown kinds \['norms'\]"),
    ("optim.lr", r"not of the form key=value"),
    ("val.mode=slide", r"val.mode=slide needs val.crop_size and val.stride"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"recipe.yaml: unknown config key 'optim.learning_rate'"):
        load_config(path)
    with pytest.raises(ValueError, match="nope.yaml: no such recipe file"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = config_from_dict({}, ["optim.betas=[0.1,0.2]", "model.args={model_name: resnet18}"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert to_dict(again) == yaml.safe_load((tmp_path / "config.yaml").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_loads_and_names_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in upernet.list_models()
    assert isinstance(config, Config)


def test_builtin_is_the_default():
    assert load_config().data.kind == "synthetic"


def test_recipes_match_the_published_settings():
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    r50 = by_name["upernet_r50_ade20k_512x512_160k"]
    assert (r50.optim.name, r50.optim.lr, r50.optim.momentum, r50.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (r50.schedule.iters, r50.schedule.power, r50.schedule.min_lr) == (160000, 0.9, 1e-4)
    swin = by_name["upernet_swin_tiny_ade20k_512x512_160k"]
    assert (swin.optim.name, swin.optim.lr, swin.optim.weight_decay, swin.schedule.warmup_iters) == ("adamw", 6e-5, 0.01, 1500)
    assert "pos" in swin.optim.no_weight_decay and "norm" in swin.optim.no_weight_decay
    tiny = by_name["upernet_convnext_tiny_ade20k_512x512_160k"]
    assert (tiny.optim.layer_decay_type, tiny.optim.layer_decay_rate, tiny.optim.layer_decay_num_layers) == ("stage_wise", 0.9, 6)
    xl = by_name["upernet_convnext_xlarge_ade20k_640x640_160k"]
    assert (xl.optim.lr, xl.optim.layer_decay_num_layers, xl.data.crop_size) == (8e-5, 12, (640, 640))


# ---- floats as people write them (YAML 1.1 reads 6e-5 as a string) --------------------------------
@pytest.mark.parametrize("text, value", [("6e-5", 6e-5), ("1e6", 1e6), ("1E+6", 1e6), (".5", 0.5), ("1_000.5", 1000.5),
                                         ("-2.5e-3", -2.5e-3), ("3", 3.0)])
def test_floats_in_scientific_notation_in_overrides_and_files(tmp_path, text, value):
    assert config_from_dict({}, [f"optim.lr={abs(value) if value < 0 else value}"]).optim.lr == abs(value)
    assert config_from_dict({}, [f"schedule.min_lr={text}"]).schedule.min_lr == value
    path = tmp_path / "recipe.yaml"
    path.write_text(f"schedule:\n  min_lr: {text}\n  warmup_ratio: {text}\n")
    config = load_config(path)
    assert config.schedule.min_lr == value and isinstance(config.schedule.min_lr, float)
    # free-form arguments read the exponent forms as numbers too
    assert config_from_dict({}, [f"model.args.backbone_args.drop_path_rate={text}"]).model.args[
        "backbone_args"]["drop_path_rate"] == pytest.approx(value)


def test_string_fields_keep_strings_and_nonsense_is_not_a_float():
    assert config_from_dict({}, ["model.backbone_checkpoint=1e5"]).model.backbone_checkpoint == "1e5"
    assert config_from_dict({}, ["model.args.model_name=resnet18"]).model.args["model_name"] == "resnet18"
    for text in ("1e", "e5", "1e5x", "inf", "nan", "1.2.3"):
        with pytest.raises(ValueError, match="optim.lr: expected float"):
            config_from_dict({}, [f"optim.lr={text}"])


# ---- old recipes and checkpoint configs --------------------------------------------------------------
def test_old_multitask_keys_are_read_as_the_typed_section_with_a_note():
    from upernet.config import ConfigNote

    old = {"data": {"kind": "upp_builtin", "options": {"image_size": 48, "loss_weights": {"object": 2},
                                                       "texture_iters": 7, "sources": ["parts"]}}}
    with pytest.warns(ConfigNote, match="data.options.texture_iters is now multitask.texture_iters"):
        config = config_from_dict(old)
    assert config.train.task == "multitask" and config.data.kind == "multitask_synthetic"
    assert config.data.options == {"image_size": 48}
    assert (config.multitask.loss_weights, config.multitask.texture_iters, config.multitask.sources) == (
        {"object": 2.0}, 7, ["parts"])
    with pytest.warns(ConfigNote):
        assert load_config("upp_builtin", ["data.options.texture_iters=3"]).multitask.texture_iters == 3
    assert load_config("multitask_builtin") == load_config("upp_builtin")


def test_task_and_data_kind_must_agree():
    with pytest.raises(ValueError, match="data.kind=synthetic is not a dataset of train.task=multitask"):
        config_from_dict({}, ["train.task=multitask"])
    with pytest.raises(ValueError, match="data.kind=broden is not a dataset of train.task=segmentation"):
        config_from_dict({}, ["data.kind=broden", "train.task=segmentation"])
