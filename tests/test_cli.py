"""The command line a newcomer meets: one way to name a model in every verb, every checkpoint kind
accepted everywhere, the same --device/--threads, help for everything, one-line errors."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

import upernet
from upernet import cli
from upernet.cli import main

# The built-in recipe shrunk to seconds (the same tiny model as tests/test_train.py).
TINY = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}",
        "data.options={num_samples: 8, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
        "data.batch_size=2", "data.workers=0", "val.interval=0", "val.max_images=2", "train.log_interval=1",
        "train.checkpoint_interval=2", "schedule.warmup_iters=1"]
MODEL_VERBS = ["predict", "eval", "export", "bench", "info", "convert"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped with --stop-at: checkpoints, no model/ folder yet."""
    run = tmp_path_factory.mktemp("cli") / "run"
    torch.set_num_threads(1)
    assert main(["train", *TINY, "schedule.iters=4", "--stop-at", "2", "--out", str(run)]) == 0
    assert not (run / "model").exists() and (run / "checkpoints" / "iter_0000002.pt").is_file()
    return run


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (90, 140, 200)).save(path)
    return path


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_verbs_in_readme_order_and_all_documented():
    verbs = subparsers()
    assert list(verbs) == ["predict", "train", "eval", "convert", "export", "bench", "serve", "info", "plot", "data"]
    for name, parser in verbs.items():
        assert parser.description, f"upernet {name} has no description"
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"upernet {name}: option {action.option_strings or action.dest} has no help"


def test_every_model_verb_takes_model_and_runtime_options_alike():
    verbs = subparsers()
    for name in MODEL_VERBS:
        assert "--model" in verbs[name]._option_string_actions, name
    for name in ["predict", "eval"]:
        device = verbs[name]._option_string_actions["--device"]
        assert device.type is cli.device_name and device.default == "auto"
    for name in ["predict", "train", "eval", "export", "bench"]:
        assert "--threads" in verbs[name]._option_string_actions, name


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"upernet {upernet.__version__}"


def test_training_checkpoint_and_stopped_run_accepted_everywhere(stopped_run, image, tmp_path, capsys):
    checkpoint = stopped_run / "checkpoints" / "iter_0000002.pt"
    for source in (checkpoint, stopped_run):
        assert main(["info", str(source), "--shape", "32", "32"]) == 0
        assert "params:" in capsys.readouterr().out
    assert main(["predict", "--model", str(stopped_run), str(image), "--out", str(tmp_path / "p")]) == 0
    assert Image.open(tmp_path / "p" / "img_labels.png").size == (40, 30)
    assert main(["convert", str(checkpoint), str(tmp_path / "converted")]) == 0
    converted = upernet.load_model(tmp_path / "converted")
    original = upernet.load_model(checkpoint)
    for key, value in original.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key
    capsys.readouterr()
    assert main(["export", "--model", str(checkpoint), str(tmp_path / "m.onnx"), "--shape", "32", "32"]) == 0
    assert (tmp_path / "m.onnx").is_file()
    progress = capsys.readouterr().err  # the ~30 s of export and check are not silent
    assert "exporting" in progress and "checking onnxruntime against PyTorch" in progress
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"), "--precision", "fp32"]) == 0
    assert "mIoU" in json.loads((tmp_path / "e" / "metrics.json").read_text())


def test_old_and_new_spellings_agree(stopped_run, capsys):
    checkpoint = str(stopped_run / "checkpoints" / "iter_0000002.pt")
    assert main(["info", checkpoint, "--shape", "32", "32"]) == 0
    positional = capsys.readouterr().out
    assert main(["info", "--model", checkpoint, "--shape", "32", "32"]) == 0
    assert capsys.readouterr().out == positional
    assert main(["info", checkpoint, "--model", "upernet_r50"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_onnx_where_a_verb_cannot_use_it_is_one_line(tmp_path, capsys):
    fake = tmp_path / "x.onnx"
    fake.write_bytes(b"not onnx")
    assert main(["info", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "x.onnx: an ONNX file cannot be used here" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.onnx" in err and "weights_only" not in err


def test_device_without_gpu_is_one_line_naming_the_option(image, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    assert main(["predict", "--model", "upernet_r50", str(image), "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda: no CUDA GPU" in err
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--model", "upernet_r50", "--device", "gpu"])
    assert stop.value.code == 2


@pytest.mark.parametrize("verb", ["export", "bench"])
def test_zero_sizes_refused_before_anything_runs(verb, tmp_path, capsys):
    argv = [verb, "upernet_r50", *([str(tmp_path / "m.onnx")] if verb == "export" else []), "--shape", "0", "0"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_threads_option_sets_torch_threads(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert main(["info", "--list", "--model", "upernet_r50"]) == 0  # info runs no model: no --threads
    args = cli.build_parser().parse_args(["export", "upernet_r50", "x.onnx", "--threads", "1"])
    cli.apply_runtime(args)
    assert seen == [1]


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "run_info", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["info", "--list"])


def test_config_notes_are_one_line(monkeypatch, capsys):
    from upernet.config import note

    monkeypatch.setattr(cli, "run_info", lambda args: note("data.options.image_size belongs to data.kind=synthetic; dropped"))
    assert main(["info", "--list"]) == 0
    assert capsys.readouterr().err.strip() == "upernet info: note: data.options.image_size belongs to data.kind=synthetic; dropped"


def test_eval_of_a_run_folder_writes_into_it(stopped_run, tmp_path):
    assert main(["eval", "--model", str(stopped_run), "--precision", "fp32", "--max-images", "2"]) == 0
    assert (stopped_run / "eval" / "metrics.json").is_file()
    assert not (stopped_run.parent / "eval").exists()
