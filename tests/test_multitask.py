import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from upernet.data.multitask import (BUILTIN_SOURCES, BrodenFolder, BuiltinSource, SourceSampler, builtin_tasks,
                                    multitask_sample)
from upernet.evaluation.multitask import MultiTaskMetrics


def test_source_sampler_proportions_and_determinism():
    sampler = SourceSampler([600, 300, 100], seed=3)
    draws = [sampler(i) for i in range(6000)]
    counts = Counter(draws)
    for source, expected in enumerate([0.6, 0.3, 0.1]):
        assert abs(counts[source] / 6000 - expected) < 0.03
    assert draws == [SourceSampler([600, 300, 100], seed=3)(i) for i in range(6000)]  # same on every process


def test_builtin_sources_annotate_only_their_tasks():
    for name, (tasks, _) in BUILTIN_SOURCES.items():
        item = BuiltinSource(name, "val", num_samples=2, image_size=64)[0]
        assert set(item["targets"]) == set(tasks)
        assert item["source"] == name


def test_builtin_labels_consistent():
    image, t = multitask_sample(3, 0, "train", 96)
    assert image.shape == (3, 96, 96)
    boat_or_pier = (t["object"] == 4) | (t["object"] == 5)
    assert ((t["part"] != 255) == boat_or_pier).all()  # parts exist exactly inside objects with parts
    assert ((t["material"] == 255) == (t["object"] == 0)).all()  # the sky has no material
    assert 0 <= int(t["scene"]) < builtin_tasks()["scene"]


def test_metrics_hand_computed():
    tasks = {"object": 3, "part": {"objects": [1], "num_parts": [2]}, "scene": 2}
    metrics = MultiTaskMetrics(tasks, {})
    obj_label = torch.tensor([[[0, 1], [1, 2]]])
    obj_pred = torch.tensor([[[0, 1], [2, 2]]])
    part_label = torch.tensor([[[255, 0], [1, 255]]])
    part_pred = torch.tensor([[[1, 0], [0, 1]]])  # scored only at the two object-1 pixels: one right, one wrong
    outputs = {"object": torch.nn.functional.one_hot(obj_pred, 3).permute(0, 3, 1, 2).float(),
               "part": torch.nn.functional.one_hot(part_pred, 2).permute(0, 3, 1, 2).float(),
               "scene": torch.tensor([[0.1, 0.9]])}
    metrics.update(outputs, {"object": obj_label, "part": part_label, "scene": torch.tensor([0])})
    s = metrics.summary()
    # object IoUs: class0 1/1, class1 1/2, class2 1/2 -> 66.67; pixel acc 3/4
    assert s["object/mIoU"] == pytest.approx(66.67, abs=0.01) and s["object/pixel_acc"] == 75.0
    # parts of object 1: background part 0: pred{0}, label{0} -> IoU 1/2 (pred 0 also at the part-1 pixel)
    # part 1: IoU 0/1 -> mean 25
    assert s["part/mIoU"] == pytest.approx(25.0)
    assert s["scene/top1"] == 0.0


def write_broden(root, with_scene=True):
    meta = {"objects": ["thing", "stuff"], "parts": {"thing": ["background", "top"]}, "materials": ["a", "b"],
            "scenes": ["s0", "s1"], "sources": {"ade": {"tasks": ["object", "scene"] if with_scene else ["object"]},
                                                "os": {"tasks": ["material"]}}}
    (root / "meta.json").write_text(json.dumps(meta))
    for source, task in (("ade", "object"), ("os", "material")):
        for sub in ("images", task):
            (root / source / "train" / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(root / source / "train" / "images" / f"{i}.png")
            Image.fromarray(np.full((8, 10), i % 2, np.uint8)).save(root / source / "train" / task / f"{i}.png")
    (root / "ade" / "train" / "labels.json").write_text(json.dumps({str(i): {"scene": i % 2} for i in range(2)}))


def test_broden_folder(tmp_path):
    write_broden(tmp_path, with_scene=False)
    item = BrodenFolder(tmp_path, "ade", "train")[1]
    assert item["targets"]["object"].shape == (8, 10) and int(item["targets"]["object"][0, 0]) == 1
    assert BrodenFolder(tmp_path, "os", "train")[0]["targets"].keys() == {"material"}


def test_broden_missing_label_names_file(tmp_path):
    write_broden(tmp_path, with_scene=True)  # labels.json lacks image 2's scene
    with pytest.raises(ValueError, match="labels.json.*scene"):
        BrodenFolder(tmp_path, "ade", "train")
    with pytest.raises(ValueError, match="no source 'nope'"):
        BrodenFolder(tmp_path, "nope", "train")


def test_short_multitask_training_run(tmp_path):
    from upernet.config import load_config
    from upernet.training.loop import train
    import upernet

    cfg = load_config("multitask_builtin", [
        "schedule.iters=6", "data.options.texture_iters=2", "data.options.image_size=48", "data.batch_size=2",
        "val.interval=0", "train.checkpoint_interval=6", "model.args.channels=16", "data.options.val_samples=6"])
    trained = train(cfg, tmp_path / "run", progress=False)
    assert trained["iteration"] == 8
    # The texture phase (iterations 7-8) trains the texture head only: everything else, BatchNorm
    # statistics included, is exactly as after the main phase.
    from upernet.training.checkpoint import load_checkpoint

    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_0000006.pt")["model"]
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_0000008.pt")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.texture.") for k in changed), sorted(changed)[:5]
    assert {"object/mIoU", "material/mIoU", "part/mIoU", "scene/top1", "texture/top1"} <= set(trained["val"])
    model = upernet.load_model(tmp_path / "run" / "model")
    out = model(torch.randn(1, 3, 48, 48))
    assert out["object"].shape == (1, 7, 48, 48) and out["texture"].shape == (1, 4)

    # predict writes one picture per pixel task and the image-level labels
    from PIL import Image

    from upernet.data.multitask import multitask_sample

    image, _ = multitask_sample(0, 0, "demo", 48)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    from upernet.cli import main

    assert main(["predict", "--model", str(tmp_path / "run" / "model"), str(tmp_path / "scene.png"),
                 "--out", str(tmp_path / "pred")]) == 0
    for task in ("object", "part", "material"):
        written = Image.open(tmp_path / "pred" / f"scene_{task}.png")
        assert written.size == (48, 48) and written.mode == "P"
        assert (tmp_path / "pred" / f"scene_{task}_overlay.png").is_file()
    labels = json.loads((tmp_path / "pred" / "scene_labels.json").read_text())
    assert labels["scene"] in ("open lake", "marsh", "harbour") and labels["texture"] in ("striped", "speckled", "smooth", "dotted")

    # eval prints the per-task table, from the final model folder or a training checkpoint

    assert main(["eval", "multitask_builtin", "data.options.image_size=48", "data.options.val_samples=6",
                 "--checkpoint", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "eval"),
                 "--precision", "fp32"]) == 0
    metrics = _without_settings(json.loads((tmp_path / "eval" / "metrics.json").read_text()))
    assert metrics == trained["val"]  # the same numbers as the loop's final validation (fp32)
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "iter_0000008.pt"),
                 "--out", str(tmp_path / "eval2"), "--precision", "fp32"]) == 0
    assert _without_settings(json.loads((tmp_path / "eval2" / "metrics.json").read_text())) == metrics


def _without_settings(results: dict) -> dict:
    """The metrics of an eval's metrics.json (it also records the settings it ran with)."""
    return {k: v for k, v in results.items() if k != "settings"}


def test_cli_train_stop_and_resume_is_exact(tmp_path):
    """`upernet train` dispatches to the multi-task loop; a stop + --resume equals the straight run."""
    from upernet.cli import main
    from upernet.training.checkpoint import load_checkpoint

    args = ["train", "multitask_builtin", "schedule.iters=3", "multitask.texture_iters=1",
            "data.options.image_size=32", "data.batch_size=2", "val.interval=0", "train.checkpoint_interval=2",
            "model.args.channels=8", "data.options.val_samples=1", "model.args.base_args.model_name=resnet10t"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert main(args + ["--out", str(tmp_path / "split"), "--stop-at", "2"]) == 0
    assert not (tmp_path / "split" / "model").exists()
    assert main(args + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "iter_0000004.pt")["model"]
    resumed = load_checkpoint(tmp_path / "split" / "checkpoints" / "iter_0000004.pt")["model"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    """torchrun with 2 CPU processes: every step's source is the same on both (else DDP's gradient
    reduction would mix heads), the run finishes and writes a loadable model."""
    import os
    import subprocess
    import sys

    import upernet

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "upernet.cli",
           "train", "multitask_builtin", "schedule.iters=4", "multitask.texture_iters=1",
           "data.options.image_size=40", "data.batch_size=2", "val.interval=0", "model.args.channels=8",
           "data.options.val_samples=3", "train.log_interval=1", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    sources = [r["source"] for r in records if r["kind"] == "train"]
    names = list(BUILTIN_SOURCES)
    main_sizes = [BUILTIN_SOURCES[n][1] for n in names if n != "textures"]
    expected = [[n for n in names if n != "textures"][SourceSampler(main_sizes, 0)(i)] for i in range(1, 5)]
    assert sources == expected + ["textures"]
    model = upernet.load_model(tmp_path / "ddp" / "model")
    assert set(model(torch.randn(1, 3, 40, 40))) == {"object", "part", "material", "scene", "texture"}
