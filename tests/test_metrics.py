"""Confusion-matrix metrics against an independent per-class computation (and torchmetrics)."""
import math

import numpy as np
import pytest
import torch

from upernet.evaluation.metrics import confusion_matrix, reduce, summarize

C = 7
ABSENT_BOTH = 4  # never labelled, never predicted: IoU and Acc NaN, left out of both means
ABSENT_LABEL = 5  # predicted but never labelled: IoU 0, Acc NaN


def random_batch(seed: int, shape=(3, 37, 53)):
    """Random predictions/labels with ~15% ignore pixels and the two absent classes arranged."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, label, torch.randint(0, C, shape, generator=g))
    label[label == ABSENT_BOTH] = 0
    label[label == ABSENT_LABEL] = 1
    pred[pred == ABSENT_BOTH] = 2
    label[torch.rand(shape, generator=g) < 0.15] = 255
    return pred, label


def brute_force(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255):
    """Per-class loops over boolean masks, as the definitions read (fractions, not percent)."""
    valid = label != ignore_index
    iou, acc = [], []
    for c in range(C):
        is_pred = (pred == c) & valid
        is_label = (label == c) & valid
        inter = int((is_pred & is_label).sum())
        union = int((is_pred | is_label).sum())
        iou.append(inter / union if union else math.nan)
        acc.append(inter / int(is_label.sum()) if is_label.sum() else math.nan)
    all_acc = int(((pred == label) & valid).sum()) / int(valid.sum())
    return all_acc, np.array(iou), np.array(acc)


def test_confusion_matrix_counts_pairs_and_skips_ignore():
    pred = torch.tensor([[0, 1, 2], [2, 2, 1]])
    label = torch.tensor([[0, 1, 255], [2, 1, 255]])
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for p, l in [(0, 0), (1, 1), (2, 2), (2, 1)]:
        expected[l, p] += 1
    got = confusion_matrix(pred, label, 3)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


def test_summary_matches_brute_force_with_absent_classes():
    # Several images accumulated, as over a split; the summary is of the sum.
    batches = [random_batch(seed) for seed in range(3)]
    confusion = sum(confusion_matrix(p, l, C) for p, l in batches)
    names = [f"class{i}" for i in range(C)]
    results = summarize(confusion, names)

    pred = np.concatenate([p.numpy().ravel() for p, _ in batches])
    label = np.concatenate([l.numpy().ravel() for _, l in batches])
    all_acc, iou, acc = brute_force(pred, label)
    assert results["aAcc"] == np.round(all_acc * 100, 2)
    # mmsegmentation: mean over non-NaN classes, taken before rounding.
    assert results["mIoU"] == pytest.approx(np.round(np.nanmean(iou) * 100, 2), abs=1e-9)
    assert results["mAcc"] == pytest.approx(np.round(np.nanmean(acc) * 100, 2), abs=1e-9)
    assert [r["class"] for r in results["per_class"]] == names
    for c, row in enumerate(results["per_class"]):
        for key, ref in (("IoU", iou[c]), ("Acc", acc[c])):
            if math.isnan(ref):
                assert math.isnan(row[key]), (c, key)
            else:
                assert row[key] == pytest.approx(np.round(ref * 100, 2), abs=1e-9), (c, key)

    # The arranged cases: absent from both -> NaN twice; absent from labels only -> IoU 0, Acc NaN.
    assert math.isnan(results["per_class"][ABSENT_BOTH]["IoU"])
    assert math.isnan(results["per_class"][ABSENT_BOTH]["Acc"])
    assert results["per_class"][ABSENT_LABEL]["IoU"] == 0.0
    assert math.isnan(results["per_class"][ABSENT_LABEL]["Acc"])
    # NaN classes are left out of the mean, not counted as 0.
    assert results["mIoU"] > round(np.nan_to_num(iou).mean() * 100, 2)


@pytest.mark.peers
def test_against_torchmetrics_on_present_classes():
    tm = pytest.importorskip("torchmetrics.classification")
    pred, label = random_batch(7, shape=(2, 64, 48))
    results = summarize(confusion_matrix(pred, label, C))
    jaccard = tm.MulticlassJaccardIndex(num_classes=C, ignore_index=255, average="none")(pred, label)
    recall = tm.MulticlassRecall(num_classes=C, ignore_index=255, average="none")(pred, label)
    micro = tm.MulticlassAccuracy(num_classes=C, ignore_index=255, average="micro")(pred, label)
    assert results["aAcc"] == pytest.approx(float(micro) * 100, abs=0.006)
    # torchmetrics reports absent classes as 0 rather than NaN: compare where the class is labelled.
    labelled = [c for c in range(C) if (label == c).any()]
    assert ABSENT_BOTH not in labelled and ABSENT_LABEL not in labelled
    for c in labelled:
        assert results["per_class"][c]["IoU"] == pytest.approx(float(jaccard[c]) * 100, abs=0.006)
        assert results["per_class"][c]["Acc"] == pytest.approx(float(recall[c]) * 100, abs=0.006)


def test_out_of_range_labels_are_an_error_listing_the_values():
    pred = torch.zeros(4, 4, dtype=torch.int64)
    label = torch.zeros(4, 4, dtype=torch.int64)
    label[0, :2] = torch.tensor([9, 12])
    label[1, 0] = 255  # the ignore index itself is fine
    with pytest.raises(ValueError, match=r"label values \[9, 12\].*0\.\.2"):
        confusion_matrix(pred, label, 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred, label[:2], 3)


def test_custom_ignore_index_and_empty_labels():
    pred = torch.tensor([0, 1, 1, 0])
    label = torch.tensor([0, 1, 0, 3])  # 3 is the ignore index here
    conf = confusion_matrix(pred, label, 2, ignore_index=3)
    assert conf.sum() == 3
    results = summarize(conf)
    assert results["aAcc"] == round(2 / 3 * 100, 2)
    assert [r["class"] for r in results["per_class"]] == ["0", "1"]
    # Nothing labelled at all: every ratio is undefined.
    empty = summarize(torch.zeros(2, 2, dtype=torch.int64))
    assert math.isnan(empty["aAcc"]) and math.isnan(empty["mIoU"]) and math.isnan(empty["mAcc"])


def test_summarize_checks_its_inputs():
    with pytest.raises(ValueError, match="3 class names.*2 classes"):
        summarize(torch.zeros(2, 2, dtype=torch.int64), ["a", "b", "c"])
    with pytest.raises(ValueError, match="square"):
        summarize(torch.zeros(2, 3, dtype=torch.int64))


def test_reduce_is_identity_without_distributed():
    conf = confusion_matrix(*random_batch(1), C)
    assert torch.equal(reduce(conf), conf)
