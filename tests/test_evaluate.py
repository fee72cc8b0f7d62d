"""evaluate(): known predictions through the whole path, 2-process gloo = 1 process, files, CLI."""
import csv
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from upernet.evaluation.evaluate import evaluate, evaluate_confusion, format_table, save_results
from upernet.evaluation.metrics import confusion_matrix, summarize

C = 4


class EncodedClassModel(nn.Module):
    """Predicts, per pixel, the class whose index is written in the image's first channel."""

    def __init__(self, num_classes: int = C):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(10.0))  # gives evaluate a device to read

    def forward(self, images):
        classes = torch.arange(self.num_classes, dtype=images.dtype).view(1, -1, 1, 1)
        return {"out": -self.scale * (images[:, :1] - classes) ** 2}


class TinySplit:
    """Sample i: an image (smaller than its label) that encodes one class k_i everywhere, so the
    prediction at label size is k_i everywhere; the label is k_i with some other-class and ignore pixels."""

    classes = [f"c{i}" for i in range(C)]
    ignore_index = 255

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            h, w = 12 + i, 17 + 2 * i
            k = int(torch.randint(0, C - 1, (1,), generator=g))  # class C-1 is never predicted
            label = torch.full((h, w), k, dtype=torch.int64)
            noise = torch.rand(h, w, generator=g)
            label[noise < 0.3] = torch.randint(0, C - 1, (h, w), generator=g)[noise < 0.3]  # C-1 never labelled
            label[noise > 0.9] = 255
            image = torch.zeros(3, h // 2 + 1, w // 2 + 1)
            image[0] = float(k)
            self.samples.append({"image": image, "label": label, "path": f"img{i}.png", "k": k})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def expected_confusion(split: TinySplit) -> torch.Tensor:
    return sum(confusion_matrix(torch.full_like(s["label"], s["k"]), s["label"], C) for s in split.samples)


def test_evaluate_known_predictions():
    split = TinySplit(5)
    model = EncodedClassModel().train()
    results = evaluate(model, split, progress=False)
    assert model.training  # restored
    expected = summarize(expected_confusion(split), TinySplit.classes)
    assert _same(results, expected)
    assert math.isnan(results["per_class"][C - 1]["IoU"])  # never labelled nor predicted
    confusion, names = evaluate_confusion(model, split, progress=False)
    assert torch.equal(confusion, expected_confusion(split)) and names == TinySplit.classes


def _same(a: dict, b: dict) -> bool:
    """Equal result dicts, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_slide_and_flip_pass_through():
    # The fake model is per-pixel, so slide windows, flips and scales change nothing.
    split = TinySplit(3)
    model = EncodedClassModel()
    whole = evaluate(model, split, progress=False)
    other = evaluate(model, split, mode="slide", crop_size=(4, 5), stride=(3, 3), flip=True, scales=(1.0, 1.5),
                     progress=False)
    assert _same(whole, other)


def test_mismatched_class_count_and_bad_labels_are_errors():
    split = TinySplit(2)
    with pytest.raises(ValueError, match="3 classes.*4 class names"):
        evaluate(EncodedClassModel(3), split, progress=False)
    split.samples[1]["label"][0, 0] = 7
    with pytest.raises(ValueError, match=r"img1\.png: label values \[7\]"):
        evaluate(EncodedClassModel(), split, progress=False)


def test_format_table_and_save_results(tmp_path):
    results = evaluate(EncodedClassModel(), TinySplit(3), progress=False)
    table = format_table(results)
    for row in results["per_class"]:
        assert row["class"] in table
    assert f"mIoU: {results['mIoU']:.2f}" in table and "nan" in table
    json_path, csv_path = save_results(results, tmp_path / "out")
    saved = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert saved["mIoU"] == results["mIoU"] and saved["per_class"][C - 1]["IoU"] is None
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["class"] for r in rows] == TinySplit.classes
    assert float(rows[0]["IoU"]) == results["per_class"][0]["IoU"]


def _tiny_real_model(num_classes=3):
    import upernet

    torch.manual_seed(0)
    return upernet.build_model("upernet_convnext_tiny", num_classes=num_classes, channels=16, aux_channels=8,
                               backbone_args={"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}).eval()


def test_eval_resizes_logits_before_the_softmax():
    from upernet.inference.modes import infer
    from upernet.ops.resize import resize

    model = _tiny_real_model()
    image = torch.randn(3, 40, 56)
    with torch.no_grad():
        model.decode_head.classifier.weight.mul_(300)  # confident, varied logits: the order matters then
        logits = model(image[None])["out"]
        ours = infer(model, image, out_size=(97, 131))
    mmseg_order = resize(logits, (97, 131)).softmax(dim=1)
    torch.testing.assert_close(ours, mmseg_order)
    assert (resize(logits.softmax(dim=1), (97, 131)) - mmseg_order).abs().max() > 0.1  # the other order differs


# ---- 2 processes (gloo, loopback) give exactly the matrix of 1 process ---------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, n: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        confusion, _ = evaluate_confusion(EncodedClassModel(), TinySplit(n), distributed=True, progress=False)
        results = evaluate(EncodedClassModel(), TinySplit(n), distributed=True, progress=False)
        worst = _worst_of(TinySplit(n), distributed=True)
        torch.save({"confusion": confusion, "results": results, "worst": worst}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _worst_of(split, distributed=False) -> list:
    """The worst list of one evaluation pass, as plain (index, path, mIoU, image, prediction, label) tuples."""
    from upernet.evaluation.evaluate import SegmentationMetrics
    from upernet.evaluation.loop import evaluate_dataset

    metrics = SegmentationMetrics(C, TinySplit.classes, worst=3)
    evaluate_dataset(EncodedClassModel(), split, metrics, distributed, progress=False)
    return [(r.index, r.path, r.miou, torch.from_numpy(r.image), torch.from_numpy(r.prediction),
             torch.from_numpy(r.label)) for r in metrics.worst.sorted()]


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    n = 5  # odd: the ranks get 3 and 2 samples, none duplicated
    mp.spawn(_worker, args=(2, _free_port(), n, str(tmp_path)), nprocs=2, join=True)
    single, _ = evaluate_confusion(EncodedClassModel(), TinySplit(n), progress=False)
    single_results = evaluate(EncodedClassModel(), TinySplit(n), progress=False)
    single_worst = _worst_of(TinySplit(n))
    assert {w[0] % 2 for w in single_worst} == {0, 1}  # the worst come from both ranks' shares
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(saved["confusion"], single)
        assert _same(saved["results"], single_results)
        assert [w[:3] for w in saved["worst"]] == [w[:3] for w in single_worst]  # gathered over the ranks
        assert all(torch.equal(a, b) for w, v in zip(saved["worst"], single_worst) for a, b in zip(w[3:], v[3:]))
    assert int(single.sum()) == sum(int((s["label"] != 255).sum()) for s in TinySplit(n).samples)


def test_subset_and_model_meta_supply_names_and_ignore_index():
    split = TinySplit(5)
    model = EncodedClassModel()
    subset = torch.utils.data.Subset(split, range(3))
    assert _same(evaluate(model, subset, progress=False), evaluate(model, TinySplit(3), progress=False))

    class Bare:  # no `classes`, no `ignore_index`: the model's meta supplies them
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split)

        def __getitem__(self, i):
            return self.split[i]

    model.meta = {"class_names": ["w", "x", "y", "z"], "ignore_index": 255}
    results = evaluate(model, Bare(split), progress=False)
    assert [r["class"] for r in results["per_class"]] == ["w", "x", "y", "z"]
    assert results["mIoU"] == evaluate(model, split, progress=False)["mIoU"]


# ---- `upernet eval` on a tiny saved model and a tiny folder dataset ---------------------------
TINY_MODEL = {"name": "upernet_convnext_tiny", "args": {
    "num_classes": 3, "backbone_args": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
    "channels": 16, "aux_channels": 8}}


def _tiny_folder_dataset(root):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(3):
            h, w = 40 + 4 * i, 56 - 4 * i
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img_dir" / split / f"{i}.png")
            mask = g.integers(0, 3, (h, w), dtype=np.uint8)
            mask[:3] = 255
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")


def _tiny_config(tmp_path):
    import yaml

    _tiny_folder_dataset(tmp_path / "data")
    config = {"model": TINY_MODEL,
              "data": {"kind": "folder", "root": str(tmp_path / "data"), "scale": [48, 32],
                       "options": {"classes": ["sky", "tree", "road"]}},
              "val": {"mode": "whole"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _direct_results(model, config_path):
    from upernet.data.build import build_dataset
    from upernet.data.transforms import build_eval_transform
    from upernet.config import load_config

    d = load_config(config_path).data
    dataset = build_dataset(d.kind, d.root, d.val_split, build_eval_transform(d.scale, d.mean, d.std), **d.options)
    return evaluate(model, dataset, progress=False)


def test_cli_eval_model_folder_writes_files(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import upernet
    from upernet.cli import main

    torch.manual_seed(0)
    config_path = _tiny_config(tmp_path)
    model = upernet.build_model(TINY_MODEL["name"], **TINY_MODEL["args"]).eval()
    model.save(str(tmp_path / "run" / "model"))
    assert main(["eval", str(config_path), "--checkpoint", str(tmp_path / "run" / "model"), "--out",
                 str(tmp_path / "out"), "--flip", "--max-images", "2"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "out" / "per_class.csv").open()))
    assert [r["class"] for r in rows] == ["sky", "tree", "road"] and "road" in printed and "mIoU" in printed
    assert saved["settings"]["flip"] is True and saved["settings"]["images"] == 2
    assert saved["settings"]["precision"] == "fp32"  # eval's default: the numbers of training's validation
    # The error analysis: more metrics (old keys kept), the confusion matrix files, the worst images.
    assert list(rows[0]) == ["class", "IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"]
    assert {"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall"} <= set(saved)
    out = tmp_path / "out"
    for name in ("confusion_matrix.csv", "confusion_matrix_normalized.csv", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    counts = [list(map(int, r[1:])) for r in list(csv.reader((out / "confusion_matrix.csv").open()))[1:]]
    masks = [np.asarray(Image.open(tmp_path / "data" / "ann_dir" / "val" / f"{i}.png")) for i in range(2)]
    assert sum(map(sum, counts)) == sum(int((m != 255).sum()) for m in masks)  # every labelled pixel of 2 images
    assert len(saved["worst"]) == 2 and saved["worst"][0]["mIoU"] <= saved["worst"][1]["mIoU"]
    assert sorted(p.name for p in (out / "worst").iterdir()) == [w["file"].split("/")[1] for w in saved["worst"]]
    assert "report" not in saved and "worst-image panels" in printed
    # Without --flip (and with the default --out) the CLI gives the numbers of evaluate() called directly.
    assert main(["eval", str(config_path), "--checkpoint", str(tmp_path / "run" / "model"), "--precision", "fp32",
                 "--worst", "0", "--nan-to-num", "0", "--beta", "2"]) == 0
    default = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())  # default --out: RUN_DIR/eval
    assert not (tmp_path / "run" / "eval" / "worst").exists() and default["worst"] == []
    assert default["settings"]["beta"] == 2.0 and default["settings"]["nan_to_num"] == 0.0
    direct = _direct_results(upernet.load_model(tmp_path / "run" / "model"), config_path)
    assert {k: default[k] for k in ("aAcc", "mIoU", "mAcc")} == {k: direct[k] for k in ("aAcc", "mIoU", "mAcc")}


def test_cli_eval_training_checkpoint_uses_its_config(tmp_path, capsys):
    import upernet
    from upernet.cli import main
    from upernet.training.checkpoint import atomic_save
    from upernet.config import load_config, to_dict

    torch.manual_seed(1)
    config_path = _tiny_config(tmp_path)
    config = to_dict(load_config(config_path))
    args = {k: v for k, v in TINY_MODEL["args"].items() if k != "num_classes"}  # training fills it from the data
    config["model"]["args"] = args
    model = upernet.build_model(TINY_MODEL["name"], num_classes=3, **args).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    atomic_save({"model": model.state_dict(), "config": config, "iteration": 10}, ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--precision", "fp32"]) == 0  # no CONFIG: the checkpoint's own
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    direct = _direct_results(model, config_path)
    assert saved["mIoU"] == direct["mIoU"] and saved["aAcc"] == direct["aAcc"]
    assert [r["class"] for r in saved["per_class"]] == ["sky", "tree", "road"]


def test_cli_eval_errors_name_the_problem(tmp_path, capsys):
    from upernet.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder, nor a registered model name" in capsys.readouterr().err


def test_docstring_args_match_signatures():
    import inspect
    import re

    from upernet.evaluation import evaluate as ev
    from upernet.evaluation import metrics

    for fn in [ev.evaluate, ev.evaluate_confusion, ev.evaluate_model,
               metrics.confusion_matrix, metrics.summarize, metrics.per_class_ratios]:
        doc = inspect.getdoc(fn).split("Args:")[1].split("Returns:")[0]
        documented = re.findall(r"^    (?:\*\*)?(\w+):", doc, flags=re.M)
        assert documented == list(inspect.signature(fn).parameters), fn.__name__
