"""A tiny Broden+ copy in the authors' layout, trained 2 steps with the multi-task recipe, then
predict and eval through the CLI."""
import json

import numpy as np
import pytest
from PIL import Image

from test_broden import SCENES, write_broden_plus

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


@pytest.mark.slow
def test_train_predict_eval_on_their_layout(tmp_path):
    from upernet.cli import main

    root = write_broden_plus(tmp_path / "unifiedparsing")
    run = tmp_path / "run"
    assert main(["train", "multitask_builtin", "data.kind=broden", f"data.root={root}", "schedule.iters=2",
                 "schedule.warmup_iters=0", "multitask.texture_iters=1", "data.batch_size=2", "val.interval=0",
                 "train.checkpoint_interval=10", "model.args.channels=8",
                 "model.args.base_args.model_name=resnet10t", "--out", str(run)]) == 0

    image = root / "broden_dataset" / "opensurfaces" / "photos" / "101.jpg"
    assert main(["predict", "--model", str(run / "model"), str(image), "--out", str(tmp_path / "pred")]) == 0
    for task in ("object", "part", "material"):
        labels = Image.open(tmp_path / "pred" / f"101_{task}.png")
        assert labels.size == (48, 40)
        overlay = Image.open(tmp_path / "pred" / f"101_{task}_overlay.png")
        assert overlay.height == 40 and overlay.width > 48  # the picture and its legend
    written = json.loads((tmp_path / "pred" / "101_labels.json").read_text())
    top5 = written["scene_top5"]
    assert len(top5) == 3 and written["scene"] == top5[0][0]  # the tiny copy has 3 scenes
    assert [name for name, _ in top5] and {name for name, _ in top5} <= set(SCENES)
    probabilities = [p for _, p in top5]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=1e-4)

    assert main(["eval", "--checkpoint", str(run / "model"), "--out", str(tmp_path / "eval"),
                 "--precision", "fp32", "data.kind=broden", f"data.root={root}"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"object/mIoU", "object/pixel_acc", "material/mIoU", "material/pixel_acc", "part/mIoU",
            "part/pixel_acc", "scene/top1"} <= set(metrics)
    assert metrics["settings"]["images"] == 6  # 3 ADE20K + 2 Pascal + 1 OpenSurfaces validation records
    assert all(0 <= v <= 100 for k, v in metrics.items() if k != "settings")


def test_part_overlay_draws_parts_inside_their_objects():
    from upernet.inference.multitask import OBJECT_ALPHA, PART_ALPHA, part_overlay
    from upernet.inference.segmenter import MultiTaskSegmentation, Segmentation

    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    objects = np.zeros((4, 6), dtype=np.int64)
    objects[:, 3:] = 1
    parts = np.zeros((4, 6), dtype=np.int64)
    parts[:2, 3:] = 1
    result = MultiTaskSegmentation(tasks={
        "object": Segmentation(objects, ["a", "b"], [[0, 0, 0], [200, 0, 0]], image),
        "part": Segmentation(parts, ["(none)", "b:top"], [[0, 0, 0], [0, 200, 0]], image)})
    picture = np.array(part_overlay(result, legend=False)).astype(float)
    behind = (1 - OBJECT_ALPHA) * 100 + OBJECT_ALPHA * np.array([200, 0, 0])
    assert picture[3, 4] == pytest.approx(behind.round())  # object without a part: faint object colour
    assert picture[0, 4] == pytest.approx(((1 - PART_ALPHA) * behind + PART_ALPHA * np.array([0, 200, 0])).round())
    assert picture[0, 0] == pytest.approx([75, 75, 75])  # object "a" (black) behind no part
