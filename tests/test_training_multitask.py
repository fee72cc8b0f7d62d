"""Every config key means the same in the multi-task run as in the segmentation run (one loop)."""
import pytest
import torch

import upernet
from upernet.config import load_config
from upernet.training.checkpoint import load_checkpoint
from upernet.training.loop import train
from upernet.training.tasks import MultitaskTask, SegmentationTask

BASE = ["schedule.iters=2", "schedule.warmup_iters=0", "multitask.texture_iters=1", "data.options.image_size=32",
        "data.batch_size=2", "val.interval=0", "train.checkpoint_interval=10", "model.args.channels=8",
        "data.options.val_samples=2", "model.args.base_args.model_name=resnet10t"]
SEGMENTATION = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}",
                "data.options={num_samples: 8, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
                "data.batch_size=2", "data.workers=0", "val.interval=0", "schedule.iters=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def config(*overrides):
    return load_config("multitask_builtin", BASE + list(overrides))


def run(tmp_path, name, *overrides):
    result = train(config(*overrides), tmp_path / name, progress=False)
    state = load_checkpoint(tmp_path / name / "checkpoints" / f"iter_{result['iteration']:07d}.pt")
    return result, state


def test_best_checkpoint_is_written_and_rebuilds_its_model(tmp_path):
    result, _ = run(tmp_path, "run")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["best_metric"] == "object/mIoU" and best["best_mIoU"] == result["val"]["object/mIoU"]
    model = upernet.load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    assert set(model.tasks) == {"object", "part", "material", "scene", "texture"}
    assert model.meta["test_size"] == "none" and model.meta["inference"] == {"mode": "whole"}
    assert result["is_main"] is True


def test_accumulate_sums_batches_as_in_segmentation(tmp_path):
    _, once = run(tmp_path, "once")
    _, twice = run(tmp_path, "twice", "optim.accumulate=2")
    # 3 iterations (2 main + 1 texture) of batch 2: each accumulated step takes twice the samples.
    assert sum(once["data"]["consumed"]) == 3 * 2 and sum(twice["data"]["consumed"]) == 3 * 2 * 2
    assert any(not torch.equal(once["model"][k], twice["model"][k]) for k in once["model"])


def test_workers_load_the_data_and_do_not_change_the_run(tmp_path, monkeypatch):
    import os

    from upernet.data.multitask import BuiltinSource

    original, pids = BuiltinSource.__getitem__, tmp_path / "pids"

    def recording(self, index):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, index)

    monkeypatch.setattr(BuiltinSource, "__getitem__", recording)
    _, none = run(tmp_path, "w0", "data.workers=0")
    pids.unlink()
    _, one = run(tmp_path, "w1", "data.workers=1")
    loaders = set(pids.read_text().split()) - {str(os.getpid())}
    assert loaders, "no sample was loaded in a worker process"
    assert all(torch.equal(none["model"][k], one["model"][k]) for k in none["model"])


def test_loss_average_changes_the_pixel_losses(tmp_path):
    valid, _ = run(tmp_path, "valid", "train.loss_average=valid")
    every, _ = run(tmp_path, "all", "train.loss_average=all")
    assert valid["loss"] != every["loss"]


def test_val_max_images(tmp_path):
    task = MultitaskTask(config("val.max_images=1"))
    task.build_data()
    assert [len(s) for s in task.val_sources] == [1, 1, 1, 1]
    segmentation = SegmentationTask(load_config(None, SEGMENTATION + ["val.max_images=1"]))
    segmentation.build_data()
    assert len(segmentation.val_set) == 1



def test_val_mode_slide_runs_as_in_segmentation(tmp_path):
    """val.mode/crop_size/stride reach the multi-task validation: the model sees the windows, and
    one window covering the image gives the numbers of whole mode."""
    def validate(*overrides):
        task = MultitaskTask(config(*overrides))
        task.build_data()
        torch.manual_seed(0)
        model = task.build_model(pretrained=False).eval()
        sizes = set()
        model.register_forward_pre_hook(lambda module, args: sizes.add(tuple(args[0].shape[-2:])))
        return task.validate(model, False, None), sizes

    whole, whole_sizes = validate()
    one_window, _ = validate("val.mode=slide", "val.crop_size=[32,32]", "val.stride=[16,16]")
    windows, window_sizes = validate("val.mode=slide", "val.crop_size=[16,16]", "val.stride=[8,8]")
    assert (32, 32) in whole_sizes and window_sizes == {(16, 16)}  # the 32x32 images, then their windows
    assert one_window == whole and windows.keys() == whole.keys()
    result, _ = run(tmp_path, "slide", "val.mode=slide", "val.crop_size=[16,16]", "val.stride=[8,8]")
    assert set(result["val"]) == set(whole)
    model = upernet.load_model(tmp_path / "slide" / "checkpoints" / "best.pt")
    assert model.meta["inference"] == {"mode": "slide", "crop_size": [16, 16], "stride": [8, 8]}


def test_augmentation_fields_apply_to_every_label(tmp_path):
    plain = MultitaskTask(config())
    plain.build_data()
    cropped = MultitaskTask(config("data.crop_size=[24,20]", "data.scale=[64,32]", "data.photometric=true"))
    cropped.build_data()
    for source in cropped.train_sources:
        item = source[0]
        if "object" in item["targets"]:
            assert item["image"].shape == (3, 24, 20)
            assert all(v.shape == (24, 20) for v in item["targets"].values() if v.dim() == 2)
    assert plain.train_sources[0][0]["image"].shape == (3, 32, 32)
    a, b = run(tmp_path, "plain")[0], run(tmp_path, "photometric", "data.photometric=true")[0]
    assert a["loss"] != b["loss"]


def test_backbone_checkpoint_initialises_the_multitask_backbone(tmp_path):
    task = MultitaskTask(config())
    task.build_data()
    source = {k: torch.randn_like(v) if v.is_floating_point() else v
              for k, v in task.build_model(pretrained=False).backbone.state_dict().items()}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.items()}}, tmp_path / "backbone.pth")
    task = MultitaskTask(config(f"model.backbone_checkpoint={tmp_path / 'backbone.pth'}"))
    task.build_data()
    loaded = task.build_model(pretrained=True).backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        train(config(f"model.backbone_checkpoint={tmp_path / 'absent.pth'}"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
