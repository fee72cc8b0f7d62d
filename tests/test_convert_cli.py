"""`upernet convert` options: --list-formats, --strict false with its printed list, --output-stride."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from upernet import load_model
from upernet.cli import main
from upernet.convert import FORMATS


def test_list_formats(capsys):
    assert main(["convert", "--list-formats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(FORMATS)


@pytest.mark.peers
def test_strict_false_prints_what_was_skipped(tmp_path, capsys):
    smp = pytest.importorskip("segmentation_models_pytorch")
    smp.UPerNet("resnet18", encoder_weights=None, classes=3, decoder_channels=16).save_pretrained(tmp_path / "smp")
    weights = tmp_path / "smp" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["decoder.fusion_block.1.running_var"]
    save_file({**tensors, "decoder.extra.weight": torch.zeros(2)}, str(weights))

    assert main(["convert", str(tmp_path / "smp"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: 1 keys of an unknown layout" in err and "decoder.extra.weight" in err

    assert main(["convert", str(tmp_path / "smp"), str(tmp_path / "out"), "--strict", "false"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2:" in captured.err
    assert "unknown source key decoder.extra.weight" in captured.err
    assert "missing key decode_head.fusion.bn.running_var (left at its initial value)" in captured.err
    assert "converted" in captured.out
    assert load_model(tmp_path / "out").config["name"] == "upernet_timm"


def test_output_stride_option_reaches_the_converter(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--from", "smp", "--output-stride", "8"]) == 2
    assert "the smp converter does not take output_stride" in capsys.readouterr().err
