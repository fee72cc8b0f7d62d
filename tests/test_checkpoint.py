"""Checkpoints: atomic writes, keep-last-N, weights_only loading, RNG round trip, no NaN checkpoints."""
import random

import numpy as np
import pytest
import torch

from upernet.training import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "iteration": 1, "config": {"optim": {"lr": 0.1}}}


def test_atomic_save_leaves_no_temp_and_loads_weights_only(tmp_path):
    path = ckpt.atomic_save({**_state(1.0), "rng": ckpt.rng_state()}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    loaded = torch.load(path, weights_only=True)  # plain containers only: no pickled code
    assert torch.equal(loaded["model"]["w"], torch.ones(3))


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = ckpt.atomic_save(_state(1.0), tmp_path / "a.pt")

    def broken_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save(_state(2.0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_keep_last_and_find_resume(tmp_path):
    for it in (10, 20, 30):
        ckpt.save_checkpoint(_state(float(it)), tmp_path, it, keep_last=2)
    names = [p.name for p in ckpt.periodic_checkpoints(tmp_path / "checkpoints")]
    assert names == ["iter_0000020.pt", "iter_0000030.pt"]
    assert ckpt.find_resume(tmp_path).name == "iter_0000030.pt"
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        ckpt.find_resume(tmp_path / "empty")


def test_nan_weights_are_never_saved(tmp_path):
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1, keep_last=2)
    with pytest.raises(ValueError, match="non-finite weights in w"):
        ckpt.save_checkpoint(_state(float("nan")), tmp_path, 2, keep_last=2)
    assert [p.name for p in ckpt.periodic_checkpoints(tmp_path / "checkpoints")] == ["iter_0000001.pt"]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = ckpt.atomic_save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(4), random.random(), np.random.rand(2))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(path))
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(2), expected[2])


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot read the checkpoint"):
        ckpt.load_checkpoint(bad)
