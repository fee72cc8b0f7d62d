"""Every shipped recipe trains: `upernet train RECIPE` runs a few iterations with its dataset swapped for
the built-in synthetic data and its backbone shrunk (everything else, optimiser, parameter groups,
layer decay, schedule, loss, validation mode, is the recipe's own)."""
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_BACKBONE, small_args
from upernet import cli

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "upernet" / "configs").glob("*.yaml")
                 if p.stem not in {"builtin", "multitask_builtin"})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def synthetic_overrides(recipe: Path) -> list[str]:
    """The dataset swapped for 4 synthetic 64x64 scenes, the model shrunk, 2 iterations on the CPU."""
    model_name = yaml.safe_load(recipe.read_text())["model"]["name"]
    small = small_args(model_name)
    overrides = [f"model.args.backbone_args.{key}={list(value) if isinstance(value, tuple) else value}"
                 for key, value in small["backbone_args"].items()]
    overrides += [f"model.args.{key}={value}" for key, value in small.items() if key != "backbone_args"]
    return overrides + [
        "model.args.pretrained_backbone=false", "model.backbone_checkpoint=null",
        "data.kind=synthetic", "data.root=", "data.options={num_samples: 4, image_size: 64}",
        "data.crop_size=[64,64]", "data.scale=[128,64]", "data.batch_size=2", "data.workers=0",
        "schedule.iters=2", "schedule.warmup_iters=1", "val.interval=0", "val.max_images=1",
        "val.crop_size=[64,64]", "val.stride=[48,48]",
        "train.device=cpu", "train.precision=fp32", "train.log_interval=1", "train.checkpoint_interval=2",
    ]


def test_every_recipe_has_reduced_arguments():
    for recipe in RECIPES:
        small_args(yaml.safe_load(recipe.read_text())["model"]["name"])  # KeyError names the missing family
    assert SMALL_BACKBONE


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_few_iterations_on_synthetic_data(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(recipe), *synthetic_overrides(recipe), "--out", str(run)]) == 0
    metrics = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # two iterations, no NaN
    assert (run / "model").is_dir()
