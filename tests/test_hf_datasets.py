"""`data.kind: hf`: Hugging Face `datasets` folders (save_to_disk, parquet) as training data, and the same checks."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from upernet.data import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, build_dataset
from upernet.data.check import check_dataset, convert_dataset
from upernet.data.synthetic import synthetic_sample
from upernet.errors import UserError

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")
PALETTE = np.array(SYNTHETIC_PALETTE, dtype=np.uint8)


def scenes(split: str, count: int = 3, size: int = 48) -> tuple[list[Image.Image], list[np.ndarray]]:
    images, labels = [], []
    for i in range(count):
        image, label = synthetic_sample(i, 0, split, size)
        images.append(Image.fromarray(image.permute(1, 2, 0).numpy()))
        labels.append(label.numpy().astype(np.uint8))
    return images, labels


def hf_split(split: str, encode=Image.fromarray, image_column="image", mask_column="annotation"):
    images, labels = scenes(split)
    data = datasets.Dataset.from_dict({image_column: images, mask_column: [encode(a) for a in labels],
                                       "id": list(range(len(images)))})
    return data.cast_column(image_column, datasets.Image()).cast_column(mask_column, datasets.Image()), labels


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """A DatasetDict (train, validation) of index masks written with save_to_disk."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    train, train_labels = hf_split("train")
    val, val_labels = hf_split("val")
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root))
    return root, {"train": train_labels, "validation": val_labels}


def test_a_saved_folder_is_a_dataset_kind(saved):
    root, labels = saved
    dataset = build_dataset("hf", root, "validation", classes=list(SYNTHETIC_CLASSES))
    assert len(dataset) == 3 and dataset.num_classes == 7
    item = dataset[1]
    assert item["image"].shape == (3, 48, 48)
    np.testing.assert_array_equal(item["label"].numpy(), labels["validation"][1])
    with pytest.raises(UserError, match="no split 'val'; it has \\['train', 'validation'\\]"):
        build_dataset("hf", root, "val", classes=7)
    with pytest.raises(UserError, match="no classes"):
        build_dataset("hf", root, "train")


def test_check_reads_it_and_decides_the_protocol(saved):
    root, _ = saved
    report = check_dataset(root, classes=list(SYNTHETIC_CLASSES))
    assert report.layout == "hf" and set(report.stats) == {"train", "validation"}
    assert report.problems == [] and report.clean
    assert report.protocol.mask_kind == "index" and report.protocol.num_classes == 7
    data = report.recipe_data()
    assert data["kind"] == "hf" and data["train_split"] == "train" and data["val_split"] == "validation"
    assert data["options"]["classes"] == list(SYNTHETIC_CLASSES)


def test_parquet_layout_and_columns_found_or_given(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data, labels = hf_split("train", image_column="pixel_values", mask_column="seg_map")
    (tmp_path / "pq" / "data").mkdir(parents=True)
    data.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    # "seg_map" is not a known mask name: the other image column is taken
    dataset = build_dataset("hf", tmp_path / "pq", "train", classes=7)
    assert (dataset.image_column, dataset.mask_column) == ("pixel_values", "seg_map")
    np.testing.assert_array_equal(dataset[2]["label"].numpy(), labels[2])
    swapped = build_dataset("hf", tmp_path / "pq", "train", classes=7, image_column="pixel_values", mask_column="seg_map")
    assert swapped.mask_column == "seg_map"
    with pytest.raises(UserError, match="no column 'mask'"):
        build_dataset("hf", tmp_path / "pq", "train", classes=7, mask_column="mask")


def test_an_imagefolder_with_mask_file_names_in_its_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    images, labels = scenes("train", count=2)
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        image.save(folder / f"img{i}.png")
        Image.fromarray(label).save(folder / f"mask{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "annotation_file_name": f"mask{i}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    report = check_dataset(tmp_path / "imagefolder", classes=7)
    assert report.layout == "hf" and report.stats["train"].checked == 2 and report.clean
    dataset = build_dataset("hf", tmp_path / "imagefolder", "train", classes=7)
    np.testing.assert_array_equal(dataset[1]["label"].numpy(), labels[1])


def test_colour_masks_are_reported_and_converted_to_a_folder(tmp_path):
    data, labels = hf_split("train", encode=lambda a: Image.fromarray(PALETTE[a]))
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "rgb"))
    with pytest.raises(UserError, match="colour-coded RGB.*upernet data convert"):
        build_dataset("hf", tmp_path / "rgb", "train", classes=7)
    report = check_dataset(tmp_path / "rgb")
    assert report.protocol.mask_kind == "rgb" and report.protocol.needs_conversion and not report.clean
    palette = tmp_path / "palette.json"
    palette.write_text('{"classes": %s, "palette": %s}' % (str(list(SYNTHETIC_CLASSES)).replace("'", '"'),
                                                           PALETTE.tolist()))
    convert_dataset(tmp_path / "rgb", tmp_path / "out", palette_file=palette)
    for i, expected in enumerate(labels):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "ann_dir" / "train" / f"{i:06d}.png")), expected)
    assert check_dataset(tmp_path / "out").clean


def test_binary_255_masks_are_refused_on_open_and_converted(tmp_path):
    data, labels = hf_split("train", encode=lambda a: Image.fromarray(np.where(a == 1, 255, 0).astype(np.uint8)))
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "binary"))
    with pytest.raises(UserError, match="only 0 and 255.*upernet data convert"):
        build_dataset("hf", tmp_path / "binary", "train", classes=2)
    convert_dataset(tmp_path / "binary", tmp_path / "out")
    for i, expected in enumerate(labels):
        converted = np.asarray(Image.open(tmp_path / "out" / "ann_dir" / "train" / f"{i:06d}.png"))
        np.testing.assert_array_equal(converted, (expected == 1).astype(np.uint8))


def test_a_hub_name_goes_to_load_dataset(monkeypatch, saved):
    """The Hub path is only called, never reached: load_dataset is replaced."""
    root, _ = saved
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.load_from_disk(str(root))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = build_dataset("hf", "someone/lake-scenes", "train", classes=7, revision="v1")
    assert calls == [("someone/lake-scenes", {"revision": "v1"})] and len(dataset) == 3
    with pytest.raises(UserError, match="not a Hub dataset name"):
        build_dataset("hf", "no-such-folder", "train", classes=7)


def test_train_two_steps_on_a_saved_folder(saved, tmp_path):
    from upernet.config import load_config
    from upernet.training.loop import train

    root, _ = saved
    overrides = ["data.kind=hf", f"data.root={root}", "data.val_split=validation",
                 f"data.options={{classes: {list(SYNTHETIC_CLASSES)}}}",
                 "model.args={model_name: test_convnext, channels: 16, aux_channels: 8}", "data.crop_size=[32,32]",
                 "data.scale=[64,32]", "data.batch_size=2", "data.workers=0", "val.interval=0", "schedule.iters=2",
                 "schedule.warmup_iters=1", "train.checkpoint_interval=2"]
    result = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert result["iteration"] == 2 and np.isfinite(result["loss"])
