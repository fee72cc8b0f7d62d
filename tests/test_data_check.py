"""`upernet data check` / `data convert`: mask kinds, the label protocol, conversion to index PNGs, bad input."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import upernet
from upernet import cli
from upernet.data import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, build_dataset, write_synthetic_folder
from upernet.data.check import check_dataset, convert_dataset, write_report
from upernet.data.labels import inspect_mask
from upernet.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
PALETTE = np.array(SYNTHETIC_PALETTE, dtype=np.uint8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Synthetic scenes as a folder dataset: 3 train + 2 val pairs, 48x48, masks 0..6."""
    root = tmp_path_factory.mktemp("scenes")
    write_synthetic_folder(root, num_train=3, num_val=2, image_size=48)
    return root


def masks_of(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root / "ann_dir")): np.asarray(Image.open(p)) for p in sorted((root / "ann_dir").rglob("*.png"))}


def rewrite_masks(source: Path, target: Path, encode) -> Path:
    """A copy of `source` whose masks are `encode(indices)` (a PIL image)."""
    shutil.copytree(source, target)
    for path in sorted((target / "ann_dir").rglob("*.png")):
        encode(np.asarray(Image.open(path))).save(path)
    return target


def as_palette(indices):
    image = Image.fromarray(indices.astype(np.uint8)).convert("P")
    image.putpalette(PALETTE.flatten().tolist())
    return image


def binary(indices, high):
    return Image.fromarray(np.where(indices == 1, high, 0).astype(np.uint8))


ENCODINGS = {  # kind -> (encoder, needs conversion)
    "index": (lambda a: Image.fromarray(a.astype(np.uint8)), False),
    "palette": (as_palette, False),
    "rgb": (lambda a: Image.fromarray(PALETTE[a]), True),
    "grey_rgb": (lambda a: Image.fromarray(np.repeat(a[..., None], 3, 2).astype(np.uint8)), True),
    "index_16bit": (lambda a: Image.fromarray(a.astype(np.uint16)), False),
    "binary_255": (lambda a: binary(a, 255), True),
    "binary_01": (lambda a: binary(a, 1), False),
}


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", list(ENCODINGS))
def test_mask_kind_is_detected_per_file_and_for_the_dataset(scenes, tmp_path, kind):
    encode, needs = ENCODINGS[kind]
    root = rewrite_masks(scenes, tmp_path / kind, encode)
    first = next((root / "ann_dir" / "train").glob("*.png"))
    assert inspect_mask(Image.open(first)).kind == kind
    report = check_dataset(root, classes=None if kind.startswith(("binary", "rgb")) else list(SYNTHETIC_CLASSES))
    assert report.problems == []
    assert report.protocol.mask_kind == kind
    assert report.protocol.needs_conversion is needs
    assert report.clean is not needs
    if kind.startswith("binary"):
        assert report.protocol.classes == ["background", "foreground"]
    else:
        assert report.protocol.num_classes == 7


@pytest.mark.parametrize("kind", list(ENCODINGS))
def test_convert_writes_exact_indices_and_check_on_the_output_is_clean(scenes, tmp_path, kind):
    encode, _ = ENCODINGS[kind]
    root = rewrite_masks(scenes, tmp_path / kind, encode)
    before = tree_digest(root)
    palette_file = None
    if kind == "rgb":  # the colour table, in the class order of the original indices
        palette_file = tmp_path / "palette.yaml"
        palette_file.write_text(yaml.safe_dump({"classes": list(SYNTHETIC_CLASSES), "palette": PALETTE.tolist()}))
    classes = None if kind.startswith(("binary", "rgb")) else list(SYNTHETIC_CLASSES)
    result = convert_dataset(root, tmp_path / "out", classes=classes, palette_file=palette_file)
    assert tree_digest(root) == before  # the source is never written
    original = masks_of(scenes)
    converted = masks_of(tmp_path / "out")
    assert converted.keys() == original.keys()
    for name, labels in original.items():
        expected = (labels == 1).astype(np.uint8) if kind.startswith("binary") else labels
        np.testing.assert_array_equal(converted[name], expected, err_msg=name)
        assert Image.open(tmp_path / "out" / "ann_dir" / name).mode == "L"
    assert len(list((tmp_path / "out" / "img_dir").rglob("*.png"))) == 5
    again = check_dataset(tmp_path / "out")
    assert again.clean, again.table()
    assert again.protocol.classes == (list(SYNTHETIC_CLASSES) if classes or kind == "rgb" else ["background", "foreground"])
    recipe = yaml.safe_load(Path(result["recipe"]).read_text())
    assert recipe["data"]["kind"] == "folder" and recipe["data"]["root"] == str((tmp_path / "out").resolve())
    assert recipe["data"]["options"]["classes"] == again.protocol.classes
    assert recipe["data"]["options"]["reduce_zero_label"] is False


def test_the_converted_recipe_trains_as_it_is(scenes, tmp_path):
    from upernet.config import load_config
    from upernet.training.loop import train

    root = rewrite_masks(scenes, tmp_path / "rgb", ENCODINGS["rgb"][0])
    recipe = convert_dataset(root, tmp_path / "out")["recipe"]
    tiny = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}", "data.crop_size=[32,32]",
            "data.scale=[64,32]", "data.batch_size=2", "data.workers=0", "val.interval=0", "schedule.iters=2",
            "schedule.warmup_iters=1", "train.checkpoint_interval=2", "train.log_interval=1"]
    result = train(load_config(recipe, tiny), tmp_path / "run", progress=False)
    assert result["iteration"] == 2 and np.isfinite(result["loss"])
    model = upernet.load_model(tmp_path / "run" / "model")
    assert model.meta["class_names"][0] == "#1e50aa"  # class names from the colours travel with the model


def test_a_failure_mid_write_leaves_no_half_png(scenes, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # write half a file, then fail
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    root = rewrite_masks(scenes, tmp_path / "rgb", ENCODINGS["rgb"][0])
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_dataset(root, tmp_path / "out")
    monkeypatch.undo()
    written = list((tmp_path / "out" / "ann_dir").rglob("*.png"))
    assert len(written) == 2  # the third mask failed half way: it is not there at all
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    for path in written:
        Image.open(path).load()  # complete files only


def test_protocol_decisions_are_explained(scenes, tmp_path):
    # values 1..7 with 0 = unlabelled and 7 class names: reduce_zero_label decided from the class count
    shifted = rewrite_masks(scenes, tmp_path / "shifted", lambda a: Image.fromarray((a + 1).astype(np.uint8)))
    report = check_dataset(shifted, classes=list(SYNTHETIC_CLASSES))
    assert report.protocol.reduce_zero_label is True and report.protocol.undecided == []
    assert any("reduce_zero_label" in n for n in report.protocol.notes)
    # without class names the same data cannot decide: the report names the option
    report = check_dataset(shifted)
    assert report.protocol.reduce_zero_label is False
    assert any("--reduce-zero-label" in u for u in report.protocol.undecided)
    # 255 present: taken as ignore and said so
    with_ignore = rewrite_masks(scenes, tmp_path / "ignore", lambda a: Image.fromarray(np.where(a == 6, 255, a).astype(np.uint8)))
    report = check_dataset(with_ignore, classes=6)
    assert report.protocol.num_classes == 6 and any("255" in n for n in report.protocol.notes)
    # another ignore value is converted to 255
    other = rewrite_masks(scenes, tmp_path / "other", lambda a: Image.fromarray(np.where(a == 6, 250, a).astype(np.uint8)))
    report = check_dataset(other, classes=6, ignore_value=250)
    assert report.protocol.needs_conversion
    convert_dataset(other, tmp_path / "other_out", classes=6, ignore_value=250)
    for name, labels in masks_of(tmp_path / "other_out").items():
        np.testing.assert_array_equal(labels, np.where(masks_of(scenes)[name] == 6, 255, masks_of(scenes)[name]))


def test_problems_are_all_reported_without_stopping(scenes, tmp_path):
    root = tmp_path / "messy"
    shutil.copytree(scenes, root)
    train_img, train_ann = root / "img_dir" / "train", root / "ann_dir" / "train"
    (train_ann / "00000.png").unlink()  # image without mask
    Image.new("L", (48, 48)).save(train_ann / "extra.png")  # mask without image
    shutil.copy(train_img / "00001.png", train_img / "00001.jpg")  # duplicate name
    Image.new("L", (40, 48)).save(train_ann / "00002.png")  # size mismatch
    (root / "ann_dir" / "val" / "00000.png").write_bytes(b"not a png")  # unreadable
    report = check_dataset(root, classes=7)
    text = "\n".join(report.problems)
    assert "image without mask" in text and "00000.png" in text
    assert "mask without image" in text and "extra.png" in text
    assert "duplicate name" in text and "00001.jpg" in text
    assert "40x48 (WxH)" in text
    assert "cannot be read" in text
    assert not report.clean
    with pytest.raises(UserError, match="problem\\(s\\) to fix first"):
        convert_dataset(root, tmp_path / "out", classes=7)
    assert not (tmp_path / "out").exists()


def test_report_files_and_sampling(scenes, tmp_path):
    report = check_dataset(scenes, classes=list(SYNTHETIC_CLASSES), max_images=1)
    assert report.stats["train"].pairs == 3 and report.stats["train"].checked == 1
    paths = write_report(check_dataset(scenes, classes=list(SYNTHETIC_CLASSES)), tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert data["clean"] and data["splits"]["train"]["pairs"] == 3
    assert data["splits"]["val"]["image_sizes"] == {"48x48": 2}
    assert set(data["splits"]["train"]["class_pixels"]) <= set(SYNTHETIC_CLASSES)
    assert sum(data["splits"]["train"]["class_pixels"].values()) == 3 * 48 * 48
    assert data["recipe_data"]["options"]["classes"] == list(SYNTHETIC_CLASSES)
    assert Image.open(paths["chart"]).size[0] > 0


def test_the_folder_dataset_reads_the_protocol_check_emits(scenes, tmp_path):
    shifted = rewrite_masks(scenes, tmp_path / "shifted", lambda a: Image.fromarray((a + 1).astype(np.uint8)))
    options = check_dataset(shifted, classes=list(SYNTHETIC_CLASSES)).recipe_data()["options"]
    dataset = build_dataset("folder", shifted, "train", **options)
    np.testing.assert_array_equal(dataset[0]["label"].numpy(), masks_of(scenes)["train/00000.png"])


def test_standard_layouts_bring_their_protocol(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(ade / "images" / split / "a.jpg")
        Image.fromarray(np.arange(32 * 32).reshape(32, 32).astype(np.uint8) % 151).save(ade / "annotations" / split / "a.png")
    report = check_dataset(tmp_path)
    assert report.layout == "ade20k" and report.protocol.reduce_zero_label and report.protocol.num_classes == 150
    assert report.clean


def test_bad_input_is_one_line_naming_the_file(scenes, tmp_path, capsys):
    mixed = rewrite_masks(scenes, tmp_path / "mixed", ENCODINGS["index"][0])
    ENCODINGS["rgb"][0](np.asarray(Image.open(mixed / "ann_dir" / "val" / "00001.png"))).save(mixed / "ann_dir" / "val" / "00001.png")
    with pytest.raises(UserError, match=r"masks mix RGB colour codes \(.*00001.png\) with index \(.*\.png\)"):
        check_dataset(mixed)
    rgb = rewrite_masks(scenes, tmp_path / "rgb", ENCODINGS["rgb"][0])
    with pytest.raises(UserError, match="class names alone do not say which colour"):
        check_dataset(rgb, classes=list(SYNTHETIC_CLASSES))
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump({"classes": ["sky"], "palette": [PALETTE[0].tolist()]}))
    with pytest.raises(UserError, match="not in .*short.yaml; add them"):
        convert_dataset(rgb, tmp_path / "out", palette_file=short)
    with pytest.raises(UserError, match="overlaps the source"):
        convert_dataset(scenes, scenes / "converted", classes=7)
    with pytest.raises(UserError, match="store values up to 6 but 3 classes"):
        check_dataset(scenes, classes=3)
    capsys.readouterr()
    assert cli.main(["data", "convert", str(rgb), str(tmp_path / "out2"), "--palette", str(short)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "short.yaml" in err
    assert cli.main(["data", "check", str(tmp_path / "nothing")]) == 2


def test_cli_check_and_convert(scenes, tmp_path, capsys):
    rgb = rewrite_masks(scenes, tmp_path / "rgb", ENCODINGS["rgb"][0])
    assert cli.main(["data", "check", str(rgb), "--out", str(tmp_path / "report")]) == 1  # not clean: exit 1
    out = capsys.readouterr().out
    assert "mask kinds" in out and "rgb x3" in out and "upernet data convert" in out and "not clean" in out
    assert (tmp_path / "report" / "report.json").is_file() and (tmp_path / "report" / "class_frequencies.png").is_file()
    assert cli.main(["data", "convert", str(rgb), str(tmp_path / "out"), "--copy"]) == 0
    assert "upernet train" in capsys.readouterr().out
    assert cli.main(["data", "check", str(tmp_path / "out")]) == 0
    assert "clean: ready to train" in capsys.readouterr().out


def test_voc_layout_lists_its_ids_and_reports_missing_files(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    for key in ("a", "b"):
        Image.new("RGB", (32, 32)).save(voc / "JPEGImages" / f"{key}.jpg")
        as_palette(np.where(np.eye(32, dtype=bool), 255, 15)).save(voc / "SegmentationClass" / f"{key}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nc\n")
    report = check_dataset(tmp_path)
    assert report.layout == "voc" and report.protocol.num_classes == 21
    assert report.stats["train"].mask_kinds == {"palette": 2}
    assert len(report.problems) == 1 and "c.jpg (listed in" in report.problems[0] and "val.txt" in report.problems[0]
