"""Dataset layouts and the checks run when a dataset is opened or an item is loaded."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upernet.data.classes import VOC_PALETTE
from upernet.data.build import build_dataset
from upernet.data.datasets import colour_mask_to_index, image_size
from upernet.data.transforms import build_eval_transform

RAW = build_eval_transform(scale=None, mean=(0, 0, 0), std=(1, 1, 1))  # image values stay 0-255


def _image(path: Path, h: int = 8, w: int = 12, value: int = 100, exif=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((h, w, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path, **({"exif": exif} if exif is not None else {}))
    return path


def _mask(path: Path, values: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8))
    if mode == "P":
        img = img.convert("P")
        img.putpalette([v for c in VOC_PALETTE for v in c])
        img.putdata(values.astype(np.uint8).flatten().tolist())
    img.save(path)
    return path


def _folder(tmp_path: Path, n: int = 2, h: int = 8, w: int = 12, values=(0, 1)) -> Path:
    for i in range(n):
        _image(tmp_path / "img_dir" / "train" / f"{i:02d}.png", h, w)
        grid = np.resize(np.array(values), h * w).reshape(h, w)
        _mask(tmp_path / "ann_dir" / "train" / f"{i:02d}.png", grid)
    return tmp_path


def _open_folder(root: Path, **kw):
    kw.setdefault("classes", ["a", "b", "c"])
    return build_dataset("folder", root, "train", RAW, **kw)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_image_without_mask(tmp_path):
    _folder(tmp_path)
    _image(tmp_path / "img_dir" / "train" / "lonely.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask(.|\n)*lonely.png"):
        _open_folder(tmp_path)


def test_mask_without_image(tmp_path):
    _folder(tmp_path)
    _mask(tmp_path / "ann_dir" / "train" / "orphan.png", np.zeros((8, 12)))
    with pytest.raises(ValueError, match=r"1 mask\(s\) without an image(.|\n)*orphan.png"):
        _open_folder(tmp_path)


@pytest.mark.parametrize("verify", ["full", "headers"])
def test_mask_size_differs_from_image(tmp_path, verify):
    _folder(tmp_path)
    _mask(tmp_path / "ann_dir" / "train" / "01.png", np.zeros((8, 10)))
    with pytest.raises(ValueError, match=r"01.png is 10x8 \(WxH\) but its image .*01.png is 12x8"):
        _open_folder(tmp_path, verify=verify)


def test_rgb_mask_is_refused_but_palette_indices_are_labels(tmp_path):
    _folder(tmp_path)
    rgb = tmp_path / "ann_dir" / "train" / "01.png"
    Image.fromarray(np.zeros((8, 12, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(ValueError, match=r"mask .*01.png is a RGB image.*colour_mask_to_index"):
        _open_folder(tmp_path)
    # A "P" PNG whose indices are the labels is fine: labels are the indices, not the colours.
    values = np.array([[0, 2, 255, 1]] * 8).repeat(3, 1)
    _mask(rgb, values, mode="P")
    assert Image.open(rgb).mode == "P"
    assert torch.equal(_open_folder(tmp_path)[1]["label"], torch.from_numpy(values).long())


def test_out_of_range_values_are_listed(tmp_path):
    _folder(tmp_path, values=(0, 1, 2, 7, 200))
    with pytest.raises(ValueError, match=r"values \[7, 200\] that are neither a class \(3 classes"):
        _open_folder(tmp_path)


def test_binary_0_255_masks(tmp_path):
    _folder(tmp_path, values=(0, 255))
    with pytest.raises(ValueError, match=r"only the values 0 and 255.*0/1"):
        _open_folder(tmp_path, classes=["background", "object"])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
    _folder(tmp_path)
    path = tmp_path / "img_dir" / "train" / f"01.{ext}"
    (tmp_path / "img_dir" / "train" / "01.png").unlink()
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"image .*01.{ext} is truncated or corrupt"):
        _open_folder(tmp_path)


def test_unreadable_mask(tmp_path):
    _folder(tmp_path)
    (tmp_path / "ann_dir" / "train" / "00.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"mask .*00.png cannot be read as an image"):
        _open_folder(tmp_path)


def test_every_problem_reported_at_once(tmp_path):
    _folder(tmp_path, n=3)
    _mask(tmp_path / "ann_dir" / "train" / "00.png", np.zeros((8, 10)))
    _mask(tmp_path / "ann_dir" / "train" / "02.png", np.full((8, 12), 9))
    with pytest.raises(ValueError, match=r"2 problem\(s\)(.|\n)*00.png(.|\n)*02.png"):
        _open_folder(tmp_path)


def test_empty_split(tmp_path):
    (tmp_path / "img_dir" / "train").mkdir(parents=True)
    (tmp_path / "ann_dir" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"split is empty.*img_dir/train"):
        _open_folder(tmp_path)
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"split is empty.*val.txt"):
        build_dataset("voc", tmp_path, "val", RAW)


def test_big_datasets_check_the_rest_when_items_load(tmp_path):
    _folder(tmp_path, n=20)
    # Index 4 is outside the 16 evenly spaced pairs decoded on open.
    _mask(tmp_path / "ann_dir" / "train" / "04.png", np.full((8, 12), 9))
    dataset = _open_folder(tmp_path, verify="sample")
    dataset[3]
    with pytest.raises(ValueError, match=r"04.png has values \[9\]"):
        dataset[4]
    with pytest.raises(ValueError, match=r"04.png has values \[9\]"):
        _open_folder(tmp_path, verify="full")


def test_build_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'"):
        build_dataset("coco", tmp_path, "train", None)
    with pytest.raises(ValueError, match="needs a root folder"):
        build_dataset("ade20k", None, "train", None)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['crop'\]"):
        build_dataset("folder", tmp_path, "train", None, classes=2, crop=3)
    with pytest.raises(ValueError, match="give the class names"):
        build_dataset("folder", tmp_path, "train", None)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_dataset("ade20k", tmp_path, "dev", None)


# ---- EXIF ---------------------------------------------------------------------------------------
def test_exif_rotation_applies_to_image_not_mask(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 12 wide x 8 high, displayed rotated 90 degrees clockwise: 8 x 12
    img = np.zeros((8, 12, 3), dtype=np.uint8)
    img[:, :6] = 255  # left half white in storage -> top half white when displayed
    path = tmp_path / "img_dir" / "train" / "r.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(img).save(path, exif=exif, quality=100)
    values = np.zeros((12, 8), dtype=np.uint8)
    values[:6] = 1
    mask_path = tmp_path / "ann_dir" / "train" / "r.png"
    mask_path.parent.mkdir(parents=True)
    Image.fromarray(values).save(mask_path, exif=exif)  # an orientation tag on a mask is ignored
    assert image_size(path) == (12, 8)
    item = _open_folder(tmp_path)[0]
    assert item["image"].shape == (3, 12, 8)
    assert item["image"][:, :6].mean() > 240 and item["image"][:, 6:].mean() < 15
    assert torch.equal(item["label"], torch.from_numpy(values).long())
    # A mask drawn on the stored (unrotated) pixels no longer matches: the error says why.
    Image.fromarray(np.zeros((8, 12), dtype=np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match="EXIF orientation"):
        _open_folder(tmp_path)


# ---- standard layouts -----------------------------------------------------------------------------
def test_ade20k_layout_reduces_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    values = np.array([[0, 1, 150, 255, 7, 0]] * 4)
    for folder in ("training", "validation"):
        _image(base / "images" / folder / "ADE_x_00000001.jpg", 4, 6)
        _mask(base / "annotations" / folder / "ADE_x_00000001.png", values)
    for root, split in ((tmp_path, "train"), (base, "validation")):
        dataset = build_dataset("ade20k", root, split, RAW)
        assert len(dataset) == 1 and len(dataset.classes) == 150 and dataset.ignore_index == 255
        assert dataset[0]["label"][0].tolist() == [255, 0, 149, 255, 6, 255]
    _mask(base / "annotations" / "training" / "ADE_x_00000001.png", values.clip(0, 151) + 1)
    with pytest.raises(ValueError, match=r"values \[151, 152\]"):
        build_dataset("ade20k", tmp_path, "train", RAW)


def test_cityscapes_layout_uses_train_ids(tmp_path):
    city = "aachen"
    stem = "aachen_000000_000019"
    values = np.array([[0, 18, 255, 5]] * 2)
    _image(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 2, 4)
    gt = tmp_path / "gtFine" / "val" / city
    _mask(gt / f"{stem}_gtFine_labelIds.png", values + 7)
    with pytest.raises(ValueError, match="createTrainIdLabelImgs"):
        build_dataset("cityscapes", tmp_path, "val", RAW)
    _mask(gt / f"{stem}_gtFine_labelTrainIds.png", values)
    Image.fromarray(np.zeros((2, 4, 3), dtype=np.uint8)).save(gt / f"{stem}_gtFine_color.png")
    dataset = build_dataset("cityscapes", tmp_path, "val", RAW)
    assert len(dataset) == 1 and len(dataset.classes) == 19
    assert dataset[0]["label"].tolist() == values.tolist()
    assert dataset[0]["path"].endswith(f"{stem}_leftImg8bit.png")


def test_voc_layout_with_palette_masks_and_aug(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    values = np.array([[0, 15, 255, 20]] * 3)
    for i in ("2007_000032", "2007_000039", "2008_000001"):
        _image(voc / "JPEGImages" / f"{i}.jpg", 3, 4)
    _mask(voc / "SegmentationClass" / "2007_000032.png", values, mode="P")
    _mask(voc / "SegmentationClass" / "2007_000039.png", values, mode="P")
    _mask(voc / "SegmentationClassAug" / "2008_000001.png", values[:, ::-1])
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n")
    (lists / "val.txt").write_text("2007_000039\n")
    train = build_dataset("voc", tmp_path, "train", RAW)
    assert len(train) == 1 and len(train.classes) == 21 and train.classes[0] == "background"
    assert train[0]["label"].tolist() == values.tolist()
    with pytest.raises(FileNotFoundError, match="aug.txt"):
        build_dataset("voc", tmp_path, "train", RAW, aug=True)
    (lists / "aug.txt").write_text("2008_000001\n")
    aug = build_dataset("voc", voc, "train", RAW, aug=True)
    assert len(aug) == 2 and aug[1]["label"].tolist() == values[:, ::-1].tolist()
    assert len(build_dataset("voc", tmp_path, "val", RAW, aug=True)) == 1
    (lists / "val.txt").write_text("2007_000039\n2007_999999\n")
    with pytest.raises(ValueError, match=r"listed in .*val.txt do not exist(.|\n)*2007_999999.jpg"):
        build_dataset("voc", tmp_path, "val", RAW)


def test_folder_layout_options(tmp_path):
    values = np.array([[0, 1, 2, 3]] * 2)
    _image(tmp_path / "images" / "val" / "sub" / "a.jpg", 2, 4)
    _mask(tmp_path / "labels" / "val" / "sub" / "a_mask.png", values)
    dataset = build_dataset("folder", tmp_path, "val", RAW, classes=3, reduce_zero_label=True, img_dir="images",
                            ann_dir="labels", img_suffix=".jpg", seg_suffix="_mask.png")
    assert dataset.classes == ["class_0", "class_1", "class_2"] and len(dataset.palette) == 3
    assert dataset[0]["label"][0].tolist() == [255, 0, 1, 2]


def test_colour_mask_to_index():
    palette = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    rgb = np.array([[[0, 0, 0], [128, 0, 0], [0, 128, 0], [1, 2, 3]]], dtype=np.uint8)
    assert colour_mask_to_index(rgb, palette).tolist() == [[0, 1, 2, 255]]


def test_docstring_args_match_signatures():
    """Every public data function/class documents exactly its parameters, in order."""
    import inspect
    import re

    from upernet.data import datasets, synthetic, transforms

    public = [build_dataset, datasets.ade20k, datasets.cityscapes, datasets.voc, datasets.folder,
              datasets.pair_files, datasets.SegmentationDataset, datasets.FileDataset, synthetic.SyntheticDataset,
              synthetic.synthetic_sample, synthetic.write_synthetic_folder, transforms.build_train_transform,
              transforms.build_eval_transform]
    for obj in public:
        doc = inspect.getdoc(obj)
        documented = re.findall(r"^    \**(\w+):", doc.split("Args:")[1], flags=re.M)
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = [p for p in inspect.signature(target).parameters if p != "self"]
        assert documented == params, obj.__name__


def test_load_label_reads_the_mask_alone_and_equals_the_label_of_load(tmp_path, monkeypatch):
    """Class statistics (class_weight: auto) read masks only: no image is decoded, same labels."""
    from upernet.data import datasets, write_synthetic_folder
    from upernet.data.build import build_dataset

    write_synthetic_folder(tmp_path / "lake", num_train=3, num_val=1)
    data = build_dataset("folder", tmp_path / "lake", "train", None, classes=7)
    expected = [data.load(i)[1] for i in range(len(data))]
    monkeypatch.setattr(datasets, "read_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    assert all(torch.equal(data.load_label(i), label) for i, label in enumerate(expected))
