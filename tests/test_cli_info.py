import re

import upernet
from upernet.cli import main
from upernet.errors import UserError


def test_info_published_counts(capsys):
    assert main(["info", "upernet_swin_tiny"]) == 0
    out = capsys.readouterr().out
    params = float(re.search(r"params:\s+([\d.]+) M", out).group(1))
    macs = float(re.search(r"MACs:\s+([\d.]+) G", out).group(1))
    assert abs(params - 60.0) < 0.5  # published UPerNet Swin-T: 60M
    assert abs(macs * 4 - 945) < 10  # published 945G at 512x2048; 512x512 is a quarter of it
    assert "strides [4, 8, 16, 32]" in out


def test_info_checkpoint_and_list(tmp_path, capsys):
    model = upernet.build_model("upernet_convnext_tiny", num_classes=3, channels=16, aux_channels=8,
                                backbone_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    model.save(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--shape", "64", "96"]) == 0
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in model.parameters()) / 1e6
    assert f"{expected:.2f} M" in out and "at 64x96" in out
    assert main(["info", "--list"]) == 0
    assert "upernet_r50_d8" in capsys.readouterr().out.split()


def test_info_unknown_name(capsys):
    assert main(["info", "upernet_nope"]) == 2
    assert "upernet_nope: no such file or folder, nor a registered model name" in capsys.readouterr().err


def test_overrides_may_follow_options(monkeypatch):
    import upernet.training.loop as train_module

    seen = {}

    def fake_resolve_run(config, overrides, out, resume, resume_flag, allow_changes):
        seen.update(config=config, overrides=overrides, out=out)
        raise UserError("stop here")

    monkeypatch.setattr(train_module, "resolve_run", fake_resolve_run)
    assert main(["train", "configs/builtin.yaml", "optim.lr=0.1", "--out", "runs/x", "schedule.iters=5"]) == 2
    assert seen == {"config": "configs/builtin.yaml", "overrides": ["optim.lr=0.1", "schedule.iters=5"], "out": "runs/x"}
