"""Training losses (upernet/training/losses.py): each against a hand computation or its published
definition on small tensors, ignore_index everywhere, gradients, the recipe's list, a short training run."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from upernet.config import load_config
from upernet.errors import UserError
from upernet.training.losses import (binary_cross_entropy, build_loss, class_weights_from_frequencies,
                                     count_class_pixels, cross_entropy, dice_loss, focal_loss, is_default,
                                     lovasz_softmax, ohem_weights)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")]
IGNORE = 255


def sample(num_classes=3, n=2, h=4, w=5, seed=0):
    """Logits (n, C, h, w) needing a gradient and labels with a few ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, h, w, generator=g).requires_grad_()
    labels = torch.randint(0, num_classes, (n, h, w), generator=g)
    labels[0, 0, :2] = IGNORE
    labels[1, -1, -1] = IGNORE
    return logits, labels


# ---- each loss against its definition --------------------------------------------------------
def test_cross_entropy_with_class_weights_by_hand():
    logits, labels = sample()
    weight = torch.tensor([0.5, 2.0, 1.0])
    total, count = 0.0, 0
    for i, y, x in itertools.product(range(2), range(4), range(5)):
        c = int(labels[i, y, x])
        if c == IGNORE:
            continue
        p = logits[i, :, y, x].detach().softmax(0)
        total += -float(weight[c]) * math.log(float(p[c]))
        count += 1
    assert float(cross_entropy(logits.detach(), labels, IGNORE, class_weight=weight)) == pytest.approx(total / count, rel=1e-5)
    # mmsegmentation's avg_non_ignore=False: the same sum over every pixel
    assert float(cross_entropy(logits, labels, IGNORE, class_weight=weight, average="all")) == pytest.approx(
        total / 40, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_pixels():
    logits, labels = sample()
    assert float(focal_loss(logits, labels, IGNORE, gamma=0)) == pytest.approx(
        float(F.cross_entropy(logits, labels, ignore_index=IGNORE)), rel=1e-6)
    p_t = logits.detach().softmax(1).gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)
    valid = labels != IGNORE
    by_hand = (-(1 - p_t) ** 2 * p_t.log())[valid].mean()
    assert float(focal_loss(logits, labels, IGNORE, gamma=2)) == pytest.approx(float(by_hand), rel=1e-5)


def test_dice_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, IGNORE]]])
    p = logits.softmax(1)[0, :, 0, 0]  # the one labelled pixel
    expected = [1 - (2 * float(p[0]) + 1) / (float(p[0]) ** 2 + 1 + 1),  # class 0: g = 1
                1 - (0 + 1) / (float(p[1]) ** 2 + 0 + 1)]  # class 1: g = 0
    assert float(dice_loss(logits, labels, IGNORE)) == pytest.approx(sum(expected) / 2, rel=1e-6)


def jaccard_loss_of_set(mispredicted: set, truth: set) -> float:
    """Berman et al.'s set function Delta_J(M) = |M| / |truth union M| (0 for an empty union)."""
    union = truth | mispredicted
    return len(mispredicted) / len(union) if union else 0.0


def lovasz_by_definition(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The Lovasz extension written from the paper: errors m sorted decreasingly (pi), sum_i m_pi(i)
    [Delta(first i pixels) - Delta(first i-1 pixels)], averaged over the classes present."""
    terms = []
    for c in range(probs.shape[1]):
        truth = {i for i in range(len(labels)) if labels[i] == c}
        if not truth:
            continue
        errors = [abs((1.0 if labels[i] == c else 0.0) - float(probs[i, c])) for i in range(len(labels))]
        order = sorted(range(len(labels)), key=lambda i: -errors[i])
        value = 0.0
        for k in range(1, len(order) + 1):
            value += errors[order[k - 1]] * (jaccard_loss_of_set(set(order[:k]), truth)
                                             - jaccard_loss_of_set(set(order[:k - 1]), truth))
        terms.append(value)
    return sum(terms) / len(terms)


def test_lovasz_softmax_equals_the_papers_definition():
    logits, labels = sample(num_classes=4, seed=3)
    keep = labels.reshape(-1) != IGNORE
    probs = logits.detach().softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)[keep]
    expected = lovasz_by_definition(probs, labels.reshape(-1)[keep].tolist())
    assert float(lovasz_softmax(logits, labels, IGNORE)) == pytest.approx(expected, rel=1e-5)


def test_lovasz_of_a_perfect_prediction_is_zero():
    labels = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert float(lovasz_softmax(logits, labels, IGNORE)) == pytest.approx(0.0, abs=1e-6)


def test_binary_cross_entropy_is_cross_entropy_of_the_two_class_logits():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 4, 4, generator=g)
    labels = torch.randint(0, 2, (2, 4, 4), generator=g)
    labels[0, 0] = IGNORE
    two = torch.cat([torch.zeros_like(z), z], 1)
    assert float(binary_cross_entropy(z, labels, IGNORE)) == pytest.approx(
        float(F.cross_entropy(two, labels, ignore_index=IGNORE)), rel=1e-6)


# ---- OHEM: the kept set by hand --------------------------------------------------------------
def test_ohem_keeps_the_pixels_below_the_threshold_or_the_min_kept_hardest():
    # one image, 1x6 pixels, 2 classes; the true class's probability is set through the logit gap
    p_true = torch.tensor([0.9, 0.3, 0.6, 0.95, 0.5, 0.8])
    labels = torch.tensor([[[0, 1, 0, 1, IGNORE, 0]]])
    gap = torch.log(p_true / (1 - p_true))
    logits = torch.zeros(1, 2, 1, 6)
    logits[0, labels[0, 0].clamp(max=1), 0, torch.arange(6)] = gap
    # thresh 0.7, min_kept 2: the kept are p < max(0.7, 3rd smallest valid p = 0.8) -> 0.3, 0.6 (pixel 4 ignored)
    kept = ohem_weights(logits, labels, IGNORE, thresh=0.7, min_kept=2)
    assert kept[0, 0].tolist() == [0, 1, 1, 0, 0, 0]
    # min_kept 3: the threshold rises to the 4th smallest (0.9), so 0.8 is kept too
    kept = ohem_weights(logits, labels, IGNORE, thresh=0.7, min_kept=3)
    assert kept[0, 0].tolist() == [0, 1, 1, 0, 0, 1]
    # without thresh: the min_kept labelled pixels of largest loss
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    kept = ohem_weights(logits, labels, IGNORE, thresh=None, min_kept=2, pixel_losses=losses)
    assert kept[0, 0].tolist() == [0, 1, 1, 0, 0, 0]


def test_ohem_loss_divides_the_kept_pixels_loss_as_mmsegmentation():
    logits, labels = sample(seed=5)
    criterion = build_loss([{"name": "cross_entropy", "ohem": {"thresh": 0.7, "min_kept": 3}}], 3, IGNORE)
    kept = ohem_weights(logits, labels, IGNORE, 0.7, 3)
    pixels = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    assert 0 < kept.sum() < (labels != IGNORE).sum()
    total, _ = criterion(logits, labels)
    assert float(total) == pytest.approx(float((pixels * kept).sum() / (labels != IGNORE).sum()), rel=1e-6)
    plain, _ = criterion(logits, labels, sample=False)  # the auxiliary head: no sampling
    assert float(plain) == pytest.approx(float(F.cross_entropy(logits, labels, ignore_index=IGNORE)), rel=1e-6)


# ---- ignore_index and gradients everywhere ---------------------------------------------------
ALL = [{"name": "cross_entropy", "class_weight": [1.0, 2.0, 3.0]}, {"name": "focal", "gamma": 2.0},
       {"name": "dice"}, {"name": "lovasz"}, {"name": "cross_entropy", "ohem": {"thresh": 0.9, "min_kept": 2}}]


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e["name"] + ("_ohem" if "ohem" in e else ""))
def test_ignored_pixels_change_nothing_and_gradients_flow(entry):
    criterion = build_loss([entry], 3, IGNORE)
    logits, labels = sample()
    loss, _ = criterion(logits, labels)
    loss.backward()
    ignored = (labels == IGNORE).unsqueeze(1).expand_as(logits)
    assert logits.grad[~ignored].abs().sum() > 0
    assert logits.grad[ignored].abs().max() == 0
    other = logits.detach().clone()
    other[ignored] = 100.0  # whatever the model says on ignored pixels
    assert float(criterion(other, labels)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_binary_mode_ignores_and_back_propagates():
    criterion = build_loss([{"name": "binary_cross_entropy", "threshold": 0.3}, {"name": "dice", "weight": 0.5}],
                           2, IGNORE)
    assert criterion.binary_threshold == 0.3
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 1, 3, 3, generator=g).requires_grad_()
    labels = torch.randint(0, 2, (1, 3, 3), generator=g)
    labels[0, 1, 1] = IGNORE
    loss, parts = criterion(z, labels)
    assert set(parts) == {"binary_cross_entropy", "dice"}
    two = torch.cat([torch.zeros_like(z), z], 1)
    assert float(loss) == pytest.approx(float(binary_cross_entropy(z, labels) + 0.5 * dice_loss(two, labels)), rel=1e-6)
    loss.backward()
    assert z.grad[0, 0, 1, 1] == 0 and z.grad.abs().sum() > 0


# ---- the recipe's list ------------------------------------------------------------------------
def test_combined_losses_are_the_weighted_sum():
    logits, labels = sample()
    criterion = build_loss([{"name": "cross_entropy", "weight": 1.0}, {"name": "lovasz", "weight": 0.5},
                            {"name": "focal", "weight": 2.0, "gamma": 1.0}], 3, IGNORE)
    total, parts = criterion(logits, labels)
    expected = (cross_entropy(logits, labels) + 0.5 * lovasz_softmax(logits, labels)
                + 2.0 * focal_loss(logits, labels, gamma=1.0))
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert set(parts) == {"cross_entropy", "lovasz", "focal"}


def test_class_weight_rules():
    pixels = [700, 200, 100]
    assert class_weights_from_frequencies(pixels, "enet") == pytest.approx(
        [1 / math.log(1.02 + f) for f in (0.7, 0.2, 0.1)])
    # median frequency: the median of (0.7, 0.2, 0.1) is 0.2
    assert class_weights_from_frequencies(pixels, "median") == pytest.approx([0.2 / 0.7, 1.0, 2.0])
    # with the pixels of the images each class appears in (Eigen & Fergus' frequency)
    assert class_weights_from_frequencies([10, 30, 0], "median", image_pixels=[100, 60, 0]) == pytest.approx(
        [((0.1 + 0.5) / 2) / 0.1, 0.3 / 0.5, 0.0])


def test_class_weight_auto_counts_the_training_masks():
    class Masks:
        ignore_index = IGNORE

        def __init__(self, labels):
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def load_label(self, i):  # masks only, as SegmentationDataset.load_label
            return self.labels[i]

    data = Masks([torch.tensor([[0, 0, 1, IGNORE]]), torch.tensor([[0, 2, 2, 2]])])
    assert count_class_pixels(data, 3) == ([3, 1, 3], [7, 3, 4])
    auto = build_loss([{"name": "cross_entropy", "class_weight": "auto"}], 3, IGNORE, dataset=data)
    given = build_loss([{"name": "cross_entropy", "class_weight": "auto", "class_frequencies": [3, 1, 3]}], 3, IGNORE)
    logits, labels = sample()
    weights = class_weights_from_frequencies([3, 1, 3], "enet")
    expected = cross_entropy(logits, labels, IGNORE, class_weight=torch.tensor(weights))
    assert float(auto(logits, labels)[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(given(logits, labels)[0]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("entries, message", [
    ([{"name": "crossentropy"}], "unknown loss 'crossentropy'"),
    ([{"name": "focal", "gama": 2}], "unknown option(s) ['gama']"),
    ([{"name": "cross_entropy", "class_weight": [1, 2]}], "expected auto or 3 numbers"),
    ([{"name": "cross_entropy", "ohem": {"thresh": 0.7, "minkept": 5}}], "train.losses[0].ohem"),
    ([{"name": "binary_cross_entropy"}], "needs a dataset of 2 classes"),
    ([], "train.losses is empty"),
])
def test_bad_entries_are_one_line_user_errors(entries, message):
    with pytest.raises(UserError, match=None) as error:
        build_loss(entries, 3, IGNORE)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_default_is_todays_cross_entropy():
    config = load_config(None)
    assert is_default(config.train.losses)
    assert not is_default([{"name": "cross_entropy", "class_weight": "auto"}])
    changed = load_config(None, ["train.losses=[{name: focal, gamma: 2}, {name: dice, weight: 0.5}]"])
    assert changed.train.losses == [{"name": "focal", "gamma": 2}, {"name": "dice", "weight": 0.5}]


# ---- a short training run --------------------------------------------------------------------
TINY = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}",
        "data.options={num_samples: 4, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
        "data.batch_size=2", "data.workers=0", "val.interval=0", "val.max_images=1", "train.log_interval=1",
        "schedule.iters=2", "schedule.warmup_iters=1", "optim.lr=0.01", "train.device=cpu"]


def test_two_steps_with_a_combined_loss(tmp_path):
    import json

    from upernet.training.loop import train

    losses = ("train.losses=[{name: cross_entropy, class_weight: auto, ohem: {thresh: 0.7, min_kept: 100}}, "
              "{name: lovasz, weight: 0.5}, {name: dice, weight: 0.5}]")
    result = train(load_config(None, TINY + [losses]), tmp_path, progress=False)
    assert result["iteration"] == 2 and math.isfinite(result["loss"])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if entry.get("kind") == "train"]
    assert len(steps) == 2 and all({"loss/cross_entropy", "loss/lovasz", "loss/dice"} <= set(s) for s in steps)


# ---- binary mode: one output channel, a threshold at inference --------------------------------
def test_a_one_channel_model_predicts_labels_split_at_its_threshold():
    import numpy as np
    from conftest import tiny_model

    from upernet.inference.modes import infer_outputs
    from upernet.inference.probabilities import binary_probabilities
    from upernet.inference.segmenter import Segmenter

    model = tiny_model("upernet_r50", num_classes=1).eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    logit = None
    for threshold in (0.3, 0.5, 0.7):
        model.meta = {"class_names": ["background", "object"], "binary_threshold": threshold}
        seg = Segmenter(model, precision="fp32", size="none")
        result = seg(image)
        if logit is None:  # the model's own foreground logit, at the image size
            x = seg.preprocessor(image)[1]
            logit = model(x)["out"][0, 0]
        assert result.class_names == ["background", "object"]
        expected = (torch.sigmoid(logit) > threshold).numpy()
        assert (result.labels == expected).mean() > 0.999  # a pixel exactly at the threshold may differ
    probs = binary_probabilities(torch.tensor([[[[-2.0, 0.0, 3.0]]]]))
    assert torch.allclose(probs[0, 1, 0], torch.sigmoid(torch.tensor([-2.0, 0.0, 3.0])))
    assert infer_outputs(model, torch.zeros(1, 3, 32, 32))["out"].shape[1] == 2


def test_tiled_prediction_of_a_one_channel_model_splits_at_its_threshold():
    import numpy as np
    from conftest import tiny_model

    from upernet.inference.segmenter import Segmenter
    from upernet.inference.tiles import ArraySource, TiledModel, tiled_probabilities

    model = tiny_model("upernet_r50", num_classes=1).eval()
    model.meta = {"class_names": ["background", "object"], "binary_threshold": 0.7}
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    tiled = TiledModel.from_segmenter(Segmenter(model, precision="fp32", size="none"))
    assert tiled.num_classes == 2 and tiled.binary_threshold == 0.7
    # one window covers the image: the tiled probabilities are the model's own, split at 0.7
    probs = torch.cat([band.pixels["out"] for band in tiled_probabilities(tiled, ArraySource(image), 64, 8)], dim=-2)
    assert probs.shape[-3:] == (2, 48, 64)  # (background, foreground), not a softmax over one channel
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (tiled.mean, tiled.std))
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std
    with torch.no_grad():
        logit = model(x)["out"]
    expected = torch.sigmoid(logit - math.log(0.7 / 0.3))[:, 0]
    assert torch.allclose(probs[:, 1], expected, atol=1e-5) and torch.allclose(probs.sum(dim=1), torch.ones(1, 48, 64))


def write_binary_folder(root):
    """A 2-class folder dataset: 32x32 images with a bright square that is the foreground."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), dtype=np.uint8)
            y, x = rng.integers(0, 16, 2)
            image[y:y + 12, x:x + 12] = 220
            mask[y:y + 12, x:x + 12] = 1
            mask[0, :4] = 255
            Image.fromarray(image).save(root / "img_dir" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "ann_dir" / split / f"{i}.png")


def test_binary_training_saves_a_one_channel_model_with_its_threshold(tmp_path):
    import upernet
    from upernet.training.loop import train

    write_binary_folder(tmp_path / "data")
    binary = [f"data.kind=folder", f"data.root={tmp_path / 'data'}", "data.options={classes: [background, object]}",
              "train.losses=[{name: binary_cross_entropy, threshold: 0.4}, {name: lovasz, weight: 0.5}]",
              "val.interval=2"]
    result = train(load_config(None, TINY + binary), tmp_path / "run", progress=False)
    assert math.isfinite(result["loss"]) and 0 <= result["val"]["mIoU"] <= 100
    model = upernet.load_model(tmp_path / "run" / "model")
    assert model.num_classes == 1 and model.meta["binary_threshold"] == 0.4
    labels = upernet.Segmenter(model, precision="fp32")(tmp_path / "data" / "img_dir" / "val" / "0.png").labels
    assert set(labels.reshape(-1).tolist()) <= {0, 1}
