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
