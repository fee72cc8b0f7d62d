"""Dice / F-score / precision / recall by hand and against mmsegmentation, the confusion-matrix files and
heat map, the worst images of one evaluation pass."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from upernet.evaluation.evaluate import SegmentationMetrics
from upernet.evaluation.loop import evaluate_dataset
from upernet.evaluation.metrics import confusion_matrix, image_miou, per_class_ratios, summarize
from upernet.evaluation.report import (EvalReport, WorstImage, WorstImages, confusion_heatmap, heatmap_classes,
                                       normalized_rows, worst_panel, write_report)
from upernet.inference.segmenter import overlay_image

# rows label, columns prediction. Class 2: labelled and predicted, never where labelled (P = R = 0);
# class 3: labelled, never predicted (P undefined); class 4: absent from both.
SMALL = torch.tensor([[6, 2, 0, 0, 0],
                      [1, 3, 4, 0, 0],
                      [0, 1, 0, 0, 0],
                      [2, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0]])


def test_small_matrix_by_hand():
    r = summarize(SMALL, list("abcde"))
    a, b, c, d, e = r["per_class"]
    # class a: intersect 6, label area 8, pred area 9
    assert (a["Precision"], a["Recall"], a["Acc"]) == (round(600 / 9, 2), 75.0, 75.0)
    assert a["Dice"] == round(100 * 12 / 17, 2) and a["IoU"] == round(100 * 6 / 11, 2)
    assert a["Fscore"] == round(100 * 2 * (6 / 9) * (6 / 8) / (6 / 9 + 6 / 8), 2) == a["Dice"]  # F1 = Dice
    # class b: intersect 3, label area 8, pred area 6
    assert (b["Precision"], b["Recall"], b["Dice"]) == (50.0, 37.5, round(100 * 6 / 14, 2))
    assert (c["Precision"], c["Recall"], c["Dice"], c["Fscore"]) == (0.0, 0.0, 0.0, 0.0)  # mmseg: F NaN (0 / 0)
    assert math.isnan(d["Precision"]) and math.isnan(d["Fscore"]) and d["Recall"] == 0.0 and d["Dice"] == 0.0
    assert all(math.isnan(e[k]) for k in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"))
    assert r["mDice"] == round((12 / 17 + 6 / 14 + 0 + 0) / 4 * 100, 2)
    assert r["mFscore"] == round((12 / 17 + 6 / 14 + 0) / 3 * 100, 2)  # d (NaN) left out
    assert r["mPrecision"] == round((6 / 9 + 0.5 + 0) / 3 * 100, 2)
    assert r["mRecall"] == r["mAcc"] == round((0.75 + 0.375 + 0 + 0) / 4 * 100, 2)
    assert r["aAcc"] == round(100 * 9 / 19, 2)


def test_beta_weighs_recall():
    p, r = 6 / 9, 0.75
    for beta in (0.5, 2.0):
        got = summarize(SMALL, beta=beta)["per_class"][0]["Fscore"]
        assert got == round(100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r), 2)
    assert summarize(SMALL, beta=2.0)["per_class"][0]["Fscore"] > summarize(SMALL)["per_class"][0]["Fscore"]  # R > P


def test_nan_to_num_counts_undefined_classes_in_the_means():
    plain, zero, full = summarize(SMALL), summarize(SMALL, nan_to_num=0), summarize(SMALL, nan_to_num=100)
    assert zero["per_class"][4]["IoU"] == 0.0 and full["per_class"][4]["IoU"] == 100.0
    assert zero["per_class"][3]["Precision"] == 0.0
    iou = [r["IoU"] for r in plain["per_class"][:4]]  # the four defined IoUs, rounded
    assert zero["mIoU"] < plain["mIoU"] < full["mIoU"]
    assert abs(zero["mIoU"] - sum(iou) / 5) < 0.01
    assert summarize(torch.zeros(2, 2, dtype=torch.int64), nan_to_num=0)["aAcc"] == 0.0
    assert math.isnan(summarize(torch.zeros(2, 2, dtype=torch.int64))["aAcc"])


@pytest.mark.peers
def test_against_mmsegmentation_total_area_to_metrics():
    pytest.importorskip("mmseg")
    from mmseg.evaluation.metrics import IoUMetric

    g = torch.Generator().manual_seed(0)
    for beta, nan_to_num in ((1, None), (2, None), (0.5, 0)):
        confusion = torch.randint(0, 50, (6, 6), generator=g)
        confusion[4, :] = 0  # never labelled: precision defined, recall NaN
        confusion[:, 5] = 0  # never predicted
        intersect = confusion.diag().double()
        area_label, area_pred = confusion.sum(1).double(), confusion.sum(0).double()
        theirs = IoUMetric.total_area_to_metrics(intersect, area_label + area_pred - intersect, area_pred, area_label,
                                                 ["mIoU", "mDice", "mFscore"], nan_to_num, beta)
        ours = per_class_ratios(confusion, beta)
        if nan_to_num is not None:
            ours = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in ours.items()}
        for key in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, equal_nan=True, err_msg=key)
        np.testing.assert_allclose(ours["aAcc"], theirs["aAcc"], rtol=1e-12)
        summary = summarize(confusion, beta=beta, nan_to_num=nan_to_num)  # their summary rule: nanmean, %, 2 decimals
        for key in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"):
            assert summary[f"m{key}"] == np.round(np.nanmean(theirs[key]) * 100, 2), key
    # The one difference: mmsegmentation's F-score of a class with P = R = 0 is 0 / 0.
    intersect, area_pred, area_label = (torch.tensor([0.0, 5.0]), torch.tensor([3.0, 5.0]), torch.tensor([2.0, 8.0]))
    theirs = IoUMetric.total_area_to_metrics(intersect, area_pred + area_label - intersect, area_pred, area_label,
                                             ["mFscore"])
    assert math.isnan(theirs["Fscore"][0]) and per_class_ratios(torch.tensor([[0, 2], [3, 5]]))["Fscore"][0] == 0.0


def test_image_miou_over_present_classes():
    assert image_miou(SMALL) == pytest.approx(np.mean([6 / 11, 3 / 11, 0, 0]))
    assert math.isnan(image_miou(torch.zeros(3, 3, dtype=torch.int64)))


# ---- confusion matrix files and heat map --------------------------------------------------------
def test_confusion_csvs_and_heatmap(tmp_path):
    names = list("abcde")
    report = EvalReport(SMALL, names, [[10 * i, 0, 0] for i in range(5)], 255, [])
    written = write_report(report, tmp_path)
    assert {p.name for p in written} == {"confusion_matrix.csv", "confusion_matrix_normalized.csv",
                                         "confusion_matrix.png"}
    counts = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert counts[0][1:] == names and [r[0] for r in counts[1:]] == names
    assert np.array_equal(np.array([r[1:] for r in counts[1:]], dtype=np.int64), SMALL.numpy())
    rows = list(csv.reader((tmp_path / "confusion_matrix_normalized.csv").open()))
    normalized = np.array([r[1:] for r in rows[1:]], dtype=np.float64)
    np.testing.assert_allclose(normalized[:4].sum(axis=1), 1.0, atol=1e-5)
    assert np.isnan(normalized[4]).all()  # never labelled
    assert normalized[1, 2] == pytest.approx(0.5)
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 5 * 18
    assert not (tmp_path / "worst").exists()


def test_heatmap_above_40_classes_shows_the_largest_first():
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 5, (60, 60), generator=g)
    confusion[7] += 1000  # by far the largest class
    confusion[50] += 500
    shown = heatmap_classes(confusion)
    pixels = confusion.sum(1)
    assert len(shown) == 40 and shown[:2] == [7, 50]
    assert all(pixels[a] >= pixels[b] for a, b in zip(shown, shown[1:]))
    assert min(pixels[shown]) >= max(pixels[sorted(set(range(60)) - set(shown))])
    assert heatmap_classes(confusion[:40, :40]) == list(range(40))  # 40 or fewer: index order
    big, small = confusion_heatmap(confusion, [f"class{i}" for i in range(60)]), confusion_heatmap(SMALL, list("abcde"))
    assert big.height > 40 * 18 > small.height
    assert normalized_rows(confusion)[7, 7] == pytest.approx(float(confusion[7, 7]) / float(pixels[7]))


# ---- the worst images -------------------------------------------------------------------------------
def _record(index, miou):
    return WorstImage(index, f"img{index}.png", miou, np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.int32),
                      np.zeros((2, 2), np.int32))


def test_worst_images_keeps_the_k_lowest_ties_by_index():
    worst = WorstImages(3)
    made = []
    for index, miou in enumerate([50.0, 10.0, 80.0, 10.0, math.nan, 5.0, 30.0, 10.0]):
        worst.offer(miou, index, lambda i=index, m=miou: made.append(i) or _record(i, m))
    assert [(r.index, r.miou) for r in worst.sorted()] == [(5, 5.0), (1, 10.0), (3, 10.0)]
    assert 4 not in made and 7 not in made  # NaN, and a tie after the list filled: never built
    assert WorstImages(0).sorted() == [] and not WorstImages(0).wants(0.0, 0)


class EncodedClassModel(torch.nn.Module):
    """Predicts, per pixel, the class written in the image's first channel."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, images):
        classes = torch.arange(self.num_classes, dtype=images.dtype).view(1, -1, 1, 1)
        return {"out": -self.scale * (images[:, :1] - classes) ** 2}


def encoded_split(n: int, seed: int = 0) -> list[dict]:
    """Image i predicts one class everywhere; its label agrees on a fraction of the pixels that varies."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        k = i % 3
        label = torch.full((10, 14), k, dtype=torch.int64)
        wrong = torch.rand(10, 14, generator=g) < float(torch.rand(1, generator=g))
        label[wrong] = (k + 1) % 3
        label[0, :3] = 255
        image = torch.zeros(3, 10, 14)
        image[0] = float(k)
        image[1:] = torch.rand(2, 10, 14, generator=g)
        samples.append({"image": image, "label": label, "path": f"img{i}.png", "k": k})
    return samples


def test_worst_images_of_one_pass_match_per_image_mious():
    split = encoded_split(7)
    metrics = SegmentationMetrics(3, ["a", "b", "c"], 255, worst=3, mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0))
    evaluate_dataset(EncodedClassModel(), split, metrics, progress=False)
    per_image = []
    for i, s in enumerate(split):
        conf = confusion_matrix(torch.full_like(s["label"], s["k"]), s["label"], 3)
        per_image.append((100 * image_miou(conf), i))
    expected = sorted(per_image)[:3]
    got = metrics.worst.sorted()
    assert [(r.miou, r.index) for r in got] == expected
    for r in got:
        s = split[r.index]
        assert r.path == s["path"] and np.array_equal(r.label, s["label"].numpy())
        assert (r.prediction == s["k"]).all()
        assert np.array_equal(r.image[..., 0], np.full((10, 14), 2 * s["k"] + 10, np.uint8))  # input, de-normalised
    total = sum(confusion_matrix(torch.full_like(s["label"], s["k"]), s["label"], 3) for s in split)
    assert torch.equal(metrics.confusion, total)  # the same pass gives the split's matrix


def test_worst_panel_is_image_prediction_and_ground_truth_overlays(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    prediction = rng.integers(0, 3, (12, 16)).astype(np.int32)
    label = rng.integers(0, 3, (12, 16)).astype(np.int32)
    label[:2] = 255
    record = WorstImage(4, "dir/street.png", 12.345, image, prediction, label)
    palette, names = [[255, 0, 0], [0, 255, 0], [0, 0, 255]], ["a", "b", "c"]
    panel = worst_panel(record, names, palette, 255, rank=1)
    pred_overlay = overlay_image(image, prediction, [*palette, [0, 0, 0]], [*names, "(ignored)"])
    picture = np.asarray(panel)
    assert np.array_equal(picture[40:52, :16], image)  # below two caption lines
    assert np.array_equal(picture[40:40 + pred_overlay.height, 24:24 + pred_overlay.width], np.asarray(pred_overlay))
    gt_left = 24 + pred_overlay.width + 8
    gt = picture[40:52, gt_left:gt_left + 16]
    assert (gt[:2] == np.round(0.5 * image[:2])).all()  # ignored pixels: blended with black
    report = EvalReport(SMALL[:3, :3], names, palette, 255, [record])
    (tmp_path / "worst").mkdir()
    (tmp_path / "worst" / "09_old.png").write_bytes(b"stale")
    written = write_report(report, tmp_path)
    assert tmp_path / "worst" / "01_street.png" in written
    assert sorted(p.name for p in (tmp_path / "worst").iterdir()) == ["01_street.png"]  # the earlier panel went
    assert report.worst_summary() == [{"rank": 1, "index": 4, "path": "dir/street.png", "mIoU": 12.35,
                                       "file": "worst/01_street.png"}]
