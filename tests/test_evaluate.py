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

from upernet.engine.evaluate import evaluate, evaluate_confusion, format_table, save_results
from upernet.engine.metrics import confusion_matrix, summarize

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

    class_names = [f"c{i}" for i in range(C)]
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
    expected = summarize(expected_confusion(split), TinySplit.class_names)
    assert _same(results, expected)
    assert math.isnan(results["per_class"][C - 1]["IoU"])  # never labelled nor predicted
    confusion, names = evaluate_confusion(model, split, progress=False)
    assert torch.equal(confusion, expected_confusion(split)) and names == TinySplit.class_names


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
    assert [r["class"] for r in rows] == TinySplit.class_names
    assert float(rows[0]["IoU"]) == results["per_class"][0]["IoU"]


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
        torch.save({"confusion": confusion, "results": results}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    n = 5  # odd: the ranks get 3 and 2 samples, none duplicated
    mp.spawn(_worker, args=(2, _free_port(), n, str(tmp_path)), nprocs=2, join=True)
    single, _ = evaluate_confusion(EncodedClassModel(), TinySplit(n), progress=False)
    single_results = evaluate(EncodedClassModel(), TinySplit(n), progress=False)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(saved["confusion"], single)
        assert _same(saved["results"], single_results)
    assert int(single.sum()) == sum(int((s["label"] != 255).sum()) for s in TinySplit(n).samples)
