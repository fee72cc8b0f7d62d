"""Training defects of the audit and the newcomer's first hour: each test failed before its fix."""
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upernet
from upernet.config import ConfigNote, load_config
from upernet.errors import UserError
from upernet.training import checkpoint as ckpt
from upernet.training.loop import TrainingDiverged, resolve_run, train

TINY = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}",
        "data.options={num_samples: 8, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
        "data.batch_size=2", "data.workers=0", "val.interval=0", "val.max_images=2", "train.log_interval=1",
        "train.checkpoint_interval=2", "schedule.warmup_iters=1", "optim.lr=0.01", "schedule.iters=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def tiny(*overrides):
    return load_config(None, TINY + list(overrides))


# ---- B1: a trained model carries its test-time protocol ------------------------------------------
def test_trained_model_and_its_checkpoints_carry_the_test_time_protocol(tmp_path):
    train(tiny("val.mode=slide", "val.crop_size=[32,32]", "val.stride=[16,16]"), tmp_path / "run", progress=False)
    expected = {"test_size": "64x32", "inference": {"mode": "slide", "crop_size": [32, 32], "stride": [16, 16]}}
    for source in (tmp_path / "run" / "model", tmp_path / "run" / "checkpoints" / "best.pt",
                   tmp_path / "run" / "checkpoints" / "iter_0000002.pt"):
        meta = upernet.load_model(source).meta
        assert {k: meta[k] for k in expected} == expected, source
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["model_config"]["name"] == "upernet_timm" and state["meta"]["class_names"][0] == "sky"
    card = (tmp_path / "run" / "model" / "README.md").read_text()  # the card quotes the recipe and metrics
    assert "## Training recipe" in card and "mIoU" in card
    train(tiny("data.scale=null"), tmp_path / "none", progress=False)
    meta = upernet.load_model(tmp_path / "none" / "model").meta
    assert meta["test_size"] == "none" and meta["inference"] == {"mode": "whole"}


# ---- B3: DDP validation uses the saved buffers ---------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_validation_equals_evaluating_the_saved_model(tmp_path):
    from upernet.evaluation.evaluate import evaluate
    from upernet.training.loop import build_datasets

    overrides = ["model.norm_eval=false", "schedule.iters=3", "val.max_images=8", "data.batch_size=2",
                 "optim.lr=0.05"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "upernet.cli",
           "train", *TINY, *overrides, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "val"][-1]
    assert logged["iter"] == 3
    model = upernet.load_model(tmp_path / "ddp" / "checkpoints" / "iter_0000003.pt")
    metrics = evaluate(model, build_datasets(tiny(*overrides))[1], progress=False)
    assert logged["mIoU"] == float(metrics["mIoU"]) and logged["aAcc"] == float(metrics["aAcc"])


# ---- B5: a full disk ------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0"),
                                   RuntimeError("File x.pt cannot be opened: No space left on device")])
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    state = {"model": {"w": torch.ones(2)}, "iteration": 1}
    ckpt.save_checkpoint(state, tmp_path, 1, keep_last=1)

    def full(obj, f):
        Path(f).write_bytes(b"half")
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as raised:
        ckpt.save_checkpoint({**state, "iteration": 2}, tmp_path, 2, keep_last=1)
    message = str(raised.value)
    assert "\n" not in message and "iter_0000002.pt" in message and "disk is full" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_0000001.pt"]


def test_other_write_errors_stay_errors(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("some bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        ckpt.atomic_save({}, tmp_path / "a.pt")


# ---- B6: data errors in DataLoader workers --------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_error_reads_the_same_with_and_without_workers(tmp_path, monkeypatch, workers):
    from upernet.data.synthetic import SyntheticDataset

    def broken(self, index):
        raise UserError("data/img_3.png: cannot read the image (truncated file)")

    monkeypatch.setattr(SyntheticDataset, "__getitem__", broken)
    with pytest.raises(UserError) as raised:
        train(tiny(f"data.workers={workers}"), tmp_path / "run", progress=False)
    assert str(raised.value) == "data/img_3.png: cannot read the image (truncated file)"
    assert not (tmp_path / "run").exists()  # failed before its first iteration: no run folder


# ---- B7: temp files of a killed write -------------------------------------------------------------
def test_stale_temp_files_are_removed_on_resume_and_never_resumed_from(tmp_path):
    run = tmp_path / "run"
    train(tiny("schedule.iters=4"), run, stop_at=2, progress=False)
    stale = run / "checkpoints" / ".iter_0000004.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert ckpt.find_resume(run).name == "iter_0000002.pt"
    result = train(tiny("schedule.iters=4"), run, resume=run, progress=False)
    assert result["iteration"] == 4 and not stale.exists()
    assert not list((run / "checkpoints").glob(".*"))


# ---- B8: a resumed run keeps its config -----------------------------------------------------------
def test_resume_keeps_the_stored_config_and_logs_override_changes(tmp_path):
    run = tmp_path / "run"
    config, run_dir, resume_file = resolve_run(None, TINY + ["schedule.iters=4"], out=str(run))
    assert run_dir == run and resume_file is None
    train(config, run_dir, stop_at=2, progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("schedule:\n  iters: 1000\n")
    with pytest.raises(UserError, match=r"recipe.yaml differs from the config of the run.*schedule.iters"):
        resolve_run(str(recipe), [], out=str(run), resume_flag=True)
    # Without the recipe the stored config is kept; an explicit override changes it and is logged.
    config, _, resume_file = resolve_run(None, ["optim.lr=0.02"], out=str(run), resume_flag=True)
    assert config.schedule.iters == 4 and config.optim.lr == 0.02 and resume_file.name == "iter_0000002.pt"
    result = train(config, run, resume=resume_file, progress=False)
    assert result["config_changes"] == {"optim.lr": [0.01, 0.02]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "config", "iter": 2, "changes": {"optim.lr": [0.01, 0.02]}} in records
    assert load_config(run / "config.yaml").schedule.iters == 4
    # A recipe that differs, when allowed, replaces the config.
    allowed, _, _ = resolve_run(str(recipe), [], out=str(run), resume_flag=True, allow_changes=True)
    assert allowed.schedule.iters == 1000


def test_new_run_over_checkpoints_is_refused(tmp_path):
    train(tiny(), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="already holds checkpoints.*--resume"):
        resolve_run(None, TINY, out=str(tmp_path / "run"))


# ---- B9: small -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, suggests_fp32", [("fp32", False), ("bf16", True)])
def test_nan_message_suggests_fp32_only_when_not_fp32(tmp_path, monkeypatch, precision, suggests_fp32):
    original = upernet.UPerNet.forward

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        return {"loss": outputs["loss"] * float("nan")} if "loss" in outputs else outputs

    monkeypatch.setattr(upernet.UPerNet, "forward", forward)
    with pytest.raises(TrainingDiverged) as raised:
        train(tiny(f"train.precision={precision}", "train.device=cpu"), tmp_path / "run", progress=False)
    assert ("train.precision=fp32" in str(raised.value)) == suggests_fp32


def test_model_weights_get_the_mode_of_config_json(tmp_path):
    old = os.umask(0o027)
    try:
        model = upernet.build_model("upernet_timm", model_name="test_convnext", num_classes=2, channels=8,
                                    aux_channels=8)
        model.save(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {"config.json": 0o640, "model.safetensors": 0o640, "README.md": 0o640}


# ---- C: the newcomer's first hour -----------------------------------------------------------------
def test_a_root_with_the_generated_dataset_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"data.root=data/mine is not read by data.kind=synthetic.*data.kind=folder"):
        resolve_run(None, ["data.root=data/mine"], out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="data.kind=folder"):
        train(tiny("data.root=data/mine"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_switching_to_folder_drops_the_synthetic_options_and_asks_for_classes(tmp_path):
    from upernet.training.loop import drop_foreign_options

    config = load_config(None, ["data.kind=folder", f"data.root={tmp_path}"])
    with pytest.warns(ConfigNote, match=r"data.options image_size, seed: not options of data.kind=folder; dropped"):
        assert drop_foreign_options(config) == ["image_size", "seed"]
    assert config.data.options == {}
    with pytest.warns(ConfigNote), pytest.raises(UserError, match=r"data.options.classes=\[.*\]"):
        train(load_config(None, ["data.kind=folder", f"data.root={tmp_path}"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_iteration_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError):
        train(tiny("model.name=upernet_nonexistent"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
