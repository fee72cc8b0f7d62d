"""The built-in synthetic dataset: deterministic, context-dependent classes, folder export."""
import torch
from PIL import Image

from upernet.data.build import build_dataset
from upernet.data.synthetic import (BOAT, BUOY, PIER, REEDS, SHORE, SKY, SYNTHETIC_CLASSES, WATER,
                                    synthetic_sample, synthetic_sample_image, write_synthetic_folder)
from upernet.data.transforms import build_eval_transform

RAW = build_eval_transform(scale=None, mean=(0, 0, 0), std=(1, 1, 1))


def test_same_seed_same_data_and_different_seeds_differ():
    a = build_dataset("synthetic", None, "train", RAW, num_samples=4, image_size=64, seed=1)
    b = build_dataset("synthetic", None, "train", RAW, num_samples=4, image_size=64, seed=1)
    c = build_dataset("synthetic", None, "train", RAW, num_samples=4, image_size=64, seed=2)
    v = build_dataset("synthetic", None, "val", RAW, num_samples=4, image_size=64, seed=1)
    for i in range(4):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
        assert not torch.equal(a[i]["image"], c[i]["image"])
        assert not torch.equal(a[i]["image"], v[i]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert a.classes == list(SYNTHETIC_CLASSES) and len(a.palette) == len(a.classes) and len(a) == 4


def test_item_format_and_sizes():
    dataset = build_dataset("synthetic", None, "val", None, num_samples=2, image_size=(48, 64))
    item = dataset[1]
    assert item["image"].shape == (3, 48, 64) and item["image"].dtype == torch.float32
    assert item["label"].shape == (48, 64) and item["label"].dtype == torch.int64
    assert isinstance(item["path"], str)
    assert synthetic_sample_image(image_size=40).size == (40, 40)


def _pool(indices, size=64):
    images, labels = zip(*(synthetic_sample(i, 0, "train", size) for i in indices))
    return (torch.stack(images).permute(0, 2, 3, 1).reshape(-1, 3).long(), torch.stack(labels).reshape(-1).long())


def test_class_pairs_are_not_separable_by_colour():
    """A colour-only classifier fitted on some scenes is no better than the prior on new ones."""
    fit, test = _pool(range(120)), _pool(range(120, 240))
    code = lambda rgb: ((rgb // 32) * torch.tensor([64, 8, 1])).sum(1)  # 8 levels per channel

    def colour_only_accuracy(a: int, b: int) -> tuple[float, float]:
        rgb, label = fit
        hists = [torch.bincount(code(rgb[label == c]), minlength=512).float() for c in (a, b)]
        scores = [h / h.sum() * (label == c).float().mean() for h, c in zip(hists, (a, b))]
        rgb, label = test
        keep = (label == a) | (label == b)
        codes, truth = code(rgb[keep]), label[keep]
        pred = torch.where(scores[0][codes] >= scores[1][codes], a, b)
        prior = max((truth == a).float().mean().item(), (truth == b).float().mean().item())
        return (pred == truth).float().mean().item(), prior

    for a, b in ((SKY, WATER), (REEDS, PIER), (BOAT, BUOY)):
        accuracy, prior = colour_only_accuracy(a, b)
        assert accuracy < prior + 0.05, (SYNTHETIC_CLASSES[a], SYNTHETIC_CLASSES[b], accuracy, prior)
    accuracy, prior = colour_only_accuracy(SKY, SHORE)  # control: a pair that colour does separate
    assert accuracy > 0.95 > prior
    rgb, label = fit
    assert (rgb[label == SKY].float().mean(0) - rgb[label == WATER].float().mean(0)).abs().max() < 5


def test_context_decides_sky_and_water():
    """In every column sky lies above the shore and water below it; every class occurs."""
    seen = set()
    for i in range(40):
        _, label = synthetic_sample(i, 3, "train", 64)
        seen.update(label.unique().tolist())
        rows = torch.arange(64).view(64, 1).expand(64, 64)
        sky_bottom = torch.where(label == SKY, rows, -1).max(0).values
        shore_top = torch.where(label == SHORE, rows, 64).min(0).values
        shore_bottom = torch.where(label == SHORE, rows, -1).max(0).values
        water_top = torch.where(label == WATER, rows, 64).min(0).values
        assert (shore_top < 64).float().mean() > 0.5  # patches may hide the shore in a few columns
        assert (sky_bottom < shore_top).all() and (shore_bottom < water_top).all() and (sky_bottom < water_top).all()
    assert seen == set(range(len(SYNTHETIC_CLASSES)))


def test_boats_are_long_and_buoys_round():
    ratios = {BOAT: [], BUOY: []}
    for i in range(30):
        _, label = synthetic_sample(i, 0, "train", 96)
        for cls in (BOAT, BUOY):
            ys, xs = torch.nonzero(label == cls, as_tuple=True)
            if len(ys) > 20:  # one or more instances; extents of the union are enough for a check
                ratios[cls].append((xs.max() - xs.min() + 1).item() / (ys.max() - ys.min() + 1).item())
    assert ratios[BOAT] and ratios[BUOY]
    assert sorted(ratios[BOAT])[len(ratios[BOAT]) // 2] > 2.0
    assert min(ratios[BUOY]) < 1.3


def test_write_folder_round_trips_through_the_folder_loader(tmp_path):
    options = write_synthetic_folder(tmp_path, num_train=3, num_val=2, image_size=32, seed=4)
    folder = build_dataset("folder", tmp_path, "train", RAW, **options)
    memory = build_dataset("synthetic", None, "train", RAW, num_samples=3, image_size=32, seed=4)
    assert len(folder) == 3 and len(build_dataset("folder", tmp_path, "val", RAW, **options)) == 2
    assert folder.classes == memory.classes
    for i in range(3):
        assert torch.equal(folder[i]["image"], memory[i]["image"])
        assert torch.equal(folder[i]["label"], memory[i]["label"])
    assert Image.open(tmp_path / "ann_dir" / "train" / "00000.png").mode == "L"
