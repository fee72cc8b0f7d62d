"""Broden+ as its authors lay it out (CSAILVision/unifiedparsing): a tiny copy written here, read with
their label encodings and rules, and scored by the rules of their eval_multipro.py."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upernet.data.multitask import IGNORE_INDEX, BrodenPlusSource, broden_plus_sources, decode_class_mask
from upernet.data.pascal_part import part_codes, read_part2ind
from upernet.errors import MissingFile, UserError
from upernet.evaluation.multitask import MultiTaskMetrics

# Broden+ classes of the tiny copy (their csv files) and the raw labels of each dataset mapped to them.
OBJECTS = ["-", "wall", "sky", "person", "car"]
PARTS = ["-", "head", "leg", "wheel", "window"]
SCENES = ["airfield", "beach", "street"]
MATERIALS = ["-", "wood", "metal", "glass"]
HIERARCHY = {3: [0, 1, 2], 4: [0, 3, 4]}  # person: head, leg; car: wheel, window
ADE_OBJECT = {1: 0, 5: 1, 7: 2, 300: 3, 9: 4}  # raw 300 needs the R channel: R // 10 * 256 + G
ADE_PART = {2: 1, 4: 2, 6: 3, 8: 4}
ADE_SCENE = {1: 1, 2: 2}  # their ADE scene list: "-" (misc), beach, street
OS_MATERIAL = {10: 1, 20: 2, 30: 3}
ADE_SCENES = ["beach", "street", "misc", "street"]
H, W = 40, 48

# Pascal: a part2ind.m in their syntax (objects 1-4 here), with each kind of statement their parser reads.
PART2IND = """function pimap = part2ind()
% Define the part index of each objects.
pimap = cell(4, 1);
for ii = 1:4
    pimap{ii} = containers.Map('KeyType','char','ValueType','int32');
end

% [person]
pimap{1}('head')       = 1;
pimap{1}('llleg')      = 19;               	% left lower leg
pimap{1}('ruleg')      = 23;               	% right upper leg

% [boat]
% only has silhouette mask 

% [car]
pimap{3}('fwheel')      = 1;                % front wheel
pimap{3}('frontside')   = 2;
for ii = 1:3
    pimap{3}(sprintf('window_%d',ii)) = 40 + ii;    % multiple windows
end

% [bus]
keySet = keys(pimap{3});
valueSet = values(pimap{3});
pimap{4} = containers.Map(keySet, valueSet);         % bus has the parts of car
remove(pimap{4}, {'fwheel'});
"""
# Their part codes of PART2IND, worked out by hand from pascalseg.py: sorted (object, short name) keys,
# readable names (comment, else short name, spelled out), "left/right/front/.." dropped, equal names one code.
PASCAL_PART_KEY = {(1, "head"): 1, (1, "llleg"): 2, (1, "ruleg"): 2,  # head; "left lower leg" -> leg
                   (2, "silhouette"): 3,  # boat: the object after person, silhouette only
                   (3, "frontside"): 4, (3, "fwheel"): 5,  # "front side" -> "", "front wheel" -> wheel
                   (3, "window_1"): 6, (3, "window_2"): 6, (3, "window_3"): 6,  # "multiple" comments ignored
                   # bus copies car; their parser ignores remove(), so fwheel stays
                   (4, "frontside"): 4, (4, "fwheel"): 5, (4, "window_1"): 6, (4, "window_2"): 6, (4, "window_3"): 6}
PASCAL_PART = {1: 1, 2: 2, 4: 0, 5: 3, 6: 4}  # code 3 (silhouette) unlisted, read as "-"
PASCAL_OBJECT = {259: 3, 59: 4, 65: 4, 355: 2, 431: 0}  # person, car, bus -> car, sky, unknown; raw 0 unlisted
PASCAL_NAMES = ["2008_000002", "2008_000010", "2009_000123"]  # sorted: their file_index order


def ade_raw(index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw ADE20K object and part labels of image `index` (no parts file for image 3)."""
    objects = np.full((H, W), 7)  # sky
    objects[16:, :20] = 300  # person
    objects[16:, 24:] = 9  # car
    objects[16:, 20:24] = 5  # wall
    objects[36:, :] = 1  # "-"
    objects[36:, 40:] = 0  # raw 0: not in label_assignment, read as "-"
    parts = np.zeros((H, W), dtype=np.int64)
    parts[16:26, :20] = 2  # head
    parts[26:36, :20] = 4  # leg
    parts[30:36, 8:12] = 6  # a wheel inside the person: not a person part -> 0
    if index == 0:
        parts[16:36, 24:] = 6  # the whole car is wheel: {0, wheel} -> it counts
    if index == 1:
        parts[16:20, 24:] = 8  # car window
        parts[20:36, 24:] = 6
        objects[16:20, :20] = 7
    if index == 2:
        parts[16:36, :20] = 0  # person without parts: does not count
    return objects, (None if index == 3 else parts)


def encode(raw: np.ndarray, seed: int) -> np.ndarray:
    """ADE20K's RGB encoding of class labels (instance ids in B; R keeps a remainder below 10)."""
    rng = np.random.default_rng(seed)
    rgb = np.zeros((*raw.shape, 3), dtype=np.uint8)
    rgb[..., 0] = raw // 256 * 10 + rng.integers(0, 10, raw.shape)
    rgb[..., 1] = raw % 256
    rgb[..., 2] = rng.integers(0, 256, raw.shape)
    return rgb


def os_raw(index: int) -> np.ndarray:
    material = np.zeros((H, W), dtype=np.int64)
    material[:, :16] = 10
    material[:, 16:32] = 20
    material[5:20, 32:] = 30
    material[0, 0] = 40 + index  # written as raw 50, listed as "-" in label_assignment.csv
    return material


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def pascal_raw(index: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]]:
    """The Pascal-Context object labels of image `index` and its Pascal-Part instances (class_ind, mask,
    [(part name, mask)])."""
    def box(top, bottom, left, right):
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[top:bottom, left:right] = 1
        return mask

    context = np.full((H, W), 355)  # sky
    context[30:, 40:] = 0
    if index == 0:
        context[10:, :20] = 259  # person
        context[36:, :4] = 431  # "unknown" inside the person's box: its leg there is outside the object
        context[20:, 24:] = 59  # car
        instances = [(1, box(10, 40, 0, 20), [("head", box(10, 18, 0, 20)), ("llleg", box(30, 40, 0, 10)),
                                               ("ruleg", box(30, 40, 10, 20))]),
                     (3, box(20, 40, 24, 48), [("fwheel", box(34, 40, 24, 32)), ("window_2", box(20, 26, 24, 48)),
                                               ("frontside", box(26, 34, 24, 48))]),
                     (2, box(0, 8, 30, 40), []),  # boat: silhouette only
                     (1, box(28, 40, 12, 22), [("head", box(28, 34, 12, 22))])]  # overlaps: a later instance wins
    elif index == 1:
        context[5:, 30:] = 65  # bus
        context[20:, :10] = 259  # person without part annotation: its parts do not count
        instances = [(4, box(5, 40, 30, 48), [("fwheel", box(30, 40, 30, 48)), ("window_3", box(5, 12, 30, 48))]),
                     (1, box(0, 4, 0, 4), [("head", box(0, 4, 0, 4))])]  # a head on the sky: no person there
    else:
        context[:, :24] = 259
        instances = []  # an annotation with no object: no parts
    return context, instances


def write_pascal_part(path: Path, instances) -> None:
    """An Annotations_Part .mat in Pascal-Part's structure: anno.objects(i).{class, class_ind, mask, parts(j)}."""
    from scipy.io import savemat

    part_type = [("part_name", "O"), ("mask", "O")]
    objects = np.zeros((1, len(instances)) if instances else (0, 0),
                       dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (class_ind, mask, parts) in enumerate(instances):
        table = np.zeros((1, len(parts)) if parts else (0, 0), dtype=part_type)
        for j, (name, part_mask) in enumerate(parts):
            table[0, j] = (name, part_mask)
        objects[0, i] = (f"class{class_ind}", class_ind, mask, table)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (path.stem, objects)
    savemat(path, {"anno": anno})


def write_csv(path: Path, header: list[str], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_records(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_broden_plus(root: Path) -> Path:
    """Their repository after download_Broden+.sh, in miniature: meta_file/ and broden_dataset/."""
    from scipy.io import savemat

    joint = root / "meta_file" / "joint_dataset"
    for name, names in (("object", OBJECTS), ("part", PARTS), ("scene", SCENES), ("material", MATERIALS),
                        ("texture", ["banded"])):
        write_csv(joint / f"{name}.csv", ["label", "name"], list(enumerate(names)))
    write_csv(joint / "object_part_hierarchy.csv", ["object_label", "object_name", "part_labels", "part_names"],
              [[o, OBJECTS[o], ";".join(map(str, p)), ";".join(PARTS[i] for i in p)] for o, p in HIERARCHY.items()])
    rows = [["ade20k", "object", raw, "x", b, OBJECTS[b]] for raw, b in ADE_OBJECT.items()]
    rows += [["ade20k", "part", raw, "x", b, PARTS[b]] for raw, b in ADE_PART.items()]
    rows += [["ade20k", "scene", raw, "x", b, SCENES[b]] for raw, b in ADE_SCENE.items()]
    rows += [["os", "material", raw, "x", b, MATERIALS[b]] for raw, b in OS_MATERIAL.items()]
    rows += [["os", "material", 50, "x", 0, "-"]]
    rows += [["pascal", "object", raw, "x", b, OBJECTS[b]] for raw, b in PASCAL_OBJECT.items()]
    rows += [["pascal", "part", raw, "x", b, PARTS[b]] for raw, b in PASCAL_PART.items()]
    write_csv(joint / "label_assignment.csv", ["dataset", "category", "raw_label", "raw_name", "broden_label",
                                               "broden_name"], rows)
    ade = [{"height": H, "width": W, "file_index": i, "nr_part": 1, "dataset": "ade20k"} for i in range(4)]
    opensurfaces = [{"file_index": i, "dataset": "os", "width": W, "height": H} for i in range(3)]
    pascal = [{"height": H, "width": W, "file_index": i, "nr_part": 1, "dataset": "pascal"} for i in range(3)]
    write_records(joint / "broden_ade20k_pascal_train.json", [ade[0], pascal[0], ade[1], ade[2], pascal[1]])
    write_records(joint / "broden_ade20k_pascal_val.json", ade[1:] + pascal[1:])
    write_records(joint / "broden_os_train.json", opensurfaces[:2])
    write_records(joint / "broden_os_val.json", opensurfaces[2:])
    # ADE20K: their index (meta_file/ade20k/index_ade20k.mat), scenes, images and *_seg.png / *_parts_1.png
    folder = "ADE20K_2016_07_26/images/training/b/beach"
    names = [f"ADE_train_{i:08d}.jpg" for i in range(4)]
    (root / "meta_file" / "ade20k").mkdir(parents=True)
    savemat(root / "meta_file" / "ade20k" / "index_ade20k.mat",
            {"index": {"filename": np.array(names, dtype=object), "folder": np.array([folder] * 4, dtype=object),
                       "objectnames": np.array(["-", "wall"], dtype=object)}})
    (root / "meta_file" / "ade20k" / "scene_categories.txt").write_text(
        "".join(f"{n[:-4]} {s}\n" for n, s in zip(names, ADE_SCENES)))
    images = root / "broden_dataset" / "ade20k" / folder
    images.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(picture(i)).save(images / name, quality=95)
        objects, parts = ade_raw(i)
        Image.fromarray(encode(objects, i)).save(images / name.replace(".jpg", "_seg.png"))
        if parts is not None:
            Image.fromarray(encode(parts, 10 + i)).save(images / name.replace(".jpg", "_parts_1.png"))
    # OpenSurfaces: photos.csv, photos/<id>.jpg, photos-labels/<id>.png (material in R)
    ids = [101, 205, 307]
    write_csv(root / "meta_file" / "opensurfaces" / "photos.csv", ["photo_id", "scene_category_name"],
              [[i, "kitchen"] for i in ids])
    photos = root / "broden_dataset" / "opensurfaces"
    (photos / "photos").mkdir(parents=True)
    (photos / "photos-labels").mkdir()
    for i, photo in enumerate(ids):
        Image.fromarray(picture(20 + i)).save(photos / "photos" / f"{photo}.jpg", quality=95)
        labels = np.zeros((H, W, 3), dtype=np.uint8)
        labels[..., 0] = np.where(os_raw(i) >= 40, 50, os_raw(i))
        labels[..., 1] = 77
        Image.fromarray(labels).save(photos / "photos-labels" / f"{photo}.png")
    # Pascal: meta_file/pascal/part2ind.m; VOC2010/JPEGImages, part/Annotations_Part, context/trainval
    (root / "meta_file" / "pascal").mkdir(parents=True)
    (root / "meta_file" / "pascal" / "part2ind.m").write_text(PART2IND)
    pascal_dir = root / "broden_dataset" / "pascal"
    for folder in ("VOC2010/JPEGImages", "part/Annotations_Part", "context/trainval"):
        (pascal_dir / folder).mkdir(parents=True)
    for i, name in enumerate(PASCAL_NAMES):
        Image.fromarray(picture(30 + i)).save(pascal_dir / "VOC2010" / "JPEGImages" / f"{name}.jpg", quality=95)
        context, instances = pascal_raw(i)
        savemat(pascal_dir / "context" / "trainval" / f"{name}.mat", {"LabelMap": context.astype(np.uint16)})
        write_pascal_part(pascal_dir / "part" / "Annotations_Part" / f"{name}.mat", instances)
    return root


@pytest.fixture
def broden(tmp_path):
    return write_broden_plus(tmp_path / "unifiedparsing")


def their_part_map(objects: np.ndarray, parts: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """Their resolve_record's part decoding, step by step, then summed over objects (their ValDataset)."""
    batch = np.zeros((len(HIERARCHY), *objects.shape), dtype=np.uint8)
    valid = [False] * len(HIERARCHY)
    for k, (obj, labels) in enumerate(HIERARCHY.items()):
        mask = objects == obj
        present = np.intersect1d(labels, np.unique(parts * mask))
        if len(present) <= 1:
            continue
        valid[k] = True
        for label in present:
            batch[k] += ((parts == label) * mask * labels.index(label)).astype(np.uint8)
    return batch.sum(0), valid


def test_their_rgb_encoding_is_decoded():
    raw = np.array([[0, 1, 255, 256, 300, 3000]])
    assert decode_class_mask(encode(raw, 0)).tolist() == raw.tolist()


def test_ade20k_records_read_as_their_code_resolves_them(broden):
    source = BrodenPlusSource(broden, "ade20k", "train")
    assert len(source) == 3 and source.tasks == ("object", "part", "scene")
    for i in range(3):
        item = source[i]
        raw_objects, raw_parts = ade_raw(i)
        objects = np.vectorize(lambda r: ADE_OBJECT.get(r, 0))(raw_objects)
        assert item["targets"]["object"].tolist() == np.where(objects == 0, IGNORE_INDEX, objects).tolist()
        their_parts, valid = their_part_map(objects, np.vectorize(lambda r: ADE_PART.get(r, 0))(raw_parts))
        ours = item["targets"]["part"].numpy()
        for k, obj in enumerate(HIERARCHY):
            inside = objects == obj
            if valid[k]:  # their valid objects: their indices inside the object
                assert (ours[inside] == their_parts[inside]).all()
            else:  # the others: not scored, not trained
                assert (ours[inside] == IGNORE_INDEX).all()
        assert (ours[~np.isin(objects, list(HIERARCHY))] == IGNORE_INDEX).all()
        scene = ["-", "beach", "street"].index(ADE_SCENES[i].replace("misc", "-"))
        assert int(item["targets"]["scene"]) == ADE_SCENE.get(scene, 0)
        assert item["image"].shape == (3, H, W) and item["source"] == "ade20k"
    assert source[0]["targets"]["part"][20, 30] == 1  # the car, all wheel, counts (0 occurs outside it)
    assert (source[2]["targets"]["part"][20, :20] == IGNORE_INDEX).all()  # person without parts
    val = BrodenPlusSource(broden, "ade20k", "val")
    assert (val[2]["targets"]["part"] == IGNORE_INDEX).all()  # no _parts_1.png


def test_opensurfaces_records_give_materials(broden):
    source = BrodenPlusSource(broden, "os", "train")
    assert source.tasks == ("material",)
    for i in range(2):
        expected = np.vectorize(lambda r: OS_MATERIAL.get(r, 0))(np.where(os_raw(i) >= 40, 50, os_raw(i)))
        assert source[i]["targets"]["material"].tolist() == np.where(expected == 0, IGNORE_INDEX, expected).tolist()
    sources, meta = broden_plus_sources(broden, "val")
    assert [s.name for s in sources] == ["ade20k", "pascal", "os"] and [len(s) for s in sources] == [3, 2, 1]
    assert meta["objects"] == OBJECTS and meta["parts"] == {"person": ["-", "head", "leg"], "car": ["-", "wheel", "window"]}
    assert meta["scenes"] == SCENES and meta["materials"] == MATERIALS and meta["textures"] == []


def their_pascal_parts(instances) -> np.ndarray:
    """Their load_parts_segmentation: each instance in turn paints its parts with their part_key codes."""
    parts = np.zeros((H, W), dtype=np.int16)
    for class_ind, _, instance_parts in instances:
        for name, mask in instance_parts:
            parts[mask.astype(bool)] = PASCAL_PART_KEY[class_ind, name]
    return parts


def test_part2ind_gives_their_part_codes(tmp_path):
    path = tmp_path / "part2ind.m"
    path.write_text(PART2IND)
    codes, names = part_codes(read_part2ind(path))
    assert codes == PASCAL_PART_KEY
    assert names == ["-", "head", "leg", "silhouette", "", "wheel", "window"]
    path.write_text(PART2IND + "pimap{5}['tail'] = 1;\n")
    with pytest.raises(UserError, match=r"part2ind.m:\d+: unrecognised line"):
        read_part2ind(path)


def test_pascal_records_read_as_their_code_resolves_them(broden):
    for split, indices in (("train", [0, 1]), ("val", [1, 2])):
        source = BrodenPlusSource(broden, "pascal", split)
        assert len(source) == 2 and source.tasks == ("object", "part")
        for position, i in enumerate(indices):
            item = source[position]
            context, instances = pascal_raw(i)
            objects = np.vectorize(lambda r: PASCAL_OBJECT.get(r, 0))(context)
            assert item["targets"]["object"].tolist() == np.where(objects == 0, IGNORE_INDEX, objects).tolist()
            assert set(item["targets"]) == {"object", "part"}  # no scene for pascal in their resolve_record
            assert item["image"].shape == (3, H, W) and item["source"] == "pascal"
            ours = item["targets"]["part"].numpy()
            if not instances:  # no object annotated: no parts (their reader fails on such a file)
                assert (ours == IGNORE_INDEX).all()
                continue
            parts = np.vectorize(lambda r: PASCAL_PART.get(r, 0))(their_pascal_parts(instances))
            their_parts, valid = their_part_map(objects, parts)
            for k, obj in enumerate(HIERARCHY):
                inside = objects == obj
                if valid[k]:
                    assert (ours[inside] == their_parts[inside]).all()
                else:
                    assert (ours[inside] == IGNORE_INDEX).all()
            assert (ours[~np.isin(objects, list(HIERARCHY))] == IGNORE_INDEX).all()
    first, second = BrodenPlusSource(broden, "pascal", "train")
    person, car = first["targets"]["part"], second["targets"]["part"]
    assert person[12, 5] == 1 and person[35, 5] == 2 and person[35, 15] == 2  # head; left lower, right upper leg
    assert person[31, 15] == 1  # the later person's head paints over the leg
    assert person[38, 2] == IGNORE_INDEX  # "unknown" in Pascal-Context: not an object
    assert person[22, 30] == 2 and person[36, 26] == 1 and person[28, 30] == 0  # car: window, wheel, "front side"
    assert car[35, 35] == 1 and car[8, 35] == 2  # bus: car's parts, fwheel kept (their parser ignores remove)
    assert (car[20:, :10] == IGNORE_INDEX).all()  # a person without parts does not count


def test_pascal_errors_name_the_file_and_the_fix(broden):
    from scipy.io import savemat

    pascal = broden / "broden_dataset" / "pascal"
    context = pascal / "context" / "trainval" / f"{PASCAL_NAMES[1]}.mat"
    context.rename(context.with_suffix(".bak"))
    with pytest.raises(MissingFile, match=f"{PASCAL_NAMES[1]}.mat: missing.*object files.*download_Broden"):
        BrodenPlusSource(broden, "pascal", "train")
    context.with_suffix(".bak").rename(context)
    source = BrodenPlusSource(broden, "pascal", "train")
    annotation = source.files[0]["part"]
    annotation.write_bytes(b"not a mat file" * 20)
    with pytest.raises(UserError, match=f"{annotation.name}: not a readable .mat file.*download_Broden"):
        source[0]
    write_pascal_part(annotation, [(1, np.ones((H, W), np.uint8), [("tail", np.ones((H, W), np.uint8))])])
    with pytest.raises(UserError, match=f"{annotation.name}: part 'tail' of object 1 is not in part2ind.m"):
        source[0]
    labels = pascal / "context" / "trainval" / f"{PASCAL_NAMES[0]}.mat"
    savemat(labels, {"LabelMap": np.zeros((H // 2, W), np.uint16)})
    with pytest.raises(UserError, match=f"{labels.name}: annotation .* VOC2010"):
        source[0]
    (broden / "meta_file" / "pascal" / "part2ind.m").unlink()
    with pytest.raises(MissingFile, match="part2ind.m: missing"):
        BrodenPlusSource(broden, "pascal", "train")
    (pascal / "part" / "Annotations_Part").rename(pascal / "part" / "moved")
    with pytest.raises(MissingFile, match="Annotations_Part: missing"):
        BrodenPlusSource(broden, "pascal", "train")


def test_early_errors_name_the_file_and_the_fix(broden):
    with pytest.raises(UserError, match="no source 'dtd'"):
        BrodenPlusSource(broden, "dtd", "train")
    with pytest.raises(UserError, match="splits train and val"):
        BrodenPlusSource(broden, "os", "test")
    photo = broden / "broden_dataset" / "opensurfaces" / "photos" / "205.jpg"
    photo.rename(photo.with_suffix(".bak"))
    with pytest.raises(MissingFile, match="205.jpg: missing.*download_Broden"):
        BrodenPlusSource(broden, "os", "train")
    photo.with_suffix(".bak").rename(photo)
    (broden / "meta_file" / "joint_dataset" / "label_assignment.csv").unlink()
    with pytest.raises(MissingFile, match="label_assignment.csv: missing"):
        BrodenPlusSource(broden, "os", "train")


def test_raw_label_outside_their_table_names_the_file(broden):
    source = BrodenPlusSource(broden, "ade20k", "train")
    seg = source.files[0]["object"]
    rgb = np.array(Image.open(seg))
    rgb[0, 0] = (30, 0, 0)  # raw 768
    Image.fromarray(rgb).save(seg)
    with pytest.raises(UserError, match=f"{seg.name}: raw object label 768"):
        source[0]


def test_annotation_of_another_size_names_the_file(broden):
    source = BrodenPlusSource(broden, "os", "train")
    labels = source.files[0]["material"]
    Image.fromarray(np.zeros((H // 2, W // 2, 3), dtype=np.uint8)).save(labels)
    with pytest.raises(UserError, match=f"{labels.name}: annotation .* resize_images.py"):
        source[0]


# ---- their eval_multipro.py, re-derived on small arrays ----------------------------------------
def their_iou(pred, gt, num_class):
    """utils.intersectionAndUnion"""
    pred = pred * (gt > 0)
    inter = np.histogram(pred * (pred == gt), bins=num_class, range=(1, num_class))[0]
    area_pred = np.histogram(pred, bins=num_class, range=(1, num_class))[0]
    area_lab = np.histogram(gt, bins=num_class, range=(1, num_class))[0]
    return inter, area_pred + area_lab - inter


def their_part_iou(pred, gt, nr):
    """utils.intersection_union_part"""
    inter = np.histogram(pred * (gt == pred), bins=nr - 1, range=(1, nr - 1))[0]
    area_pred = np.histogram(pred, bins=nr - 1, range=(1, nr - 1))[0]
    area_lab = np.histogram(gt, bins=nr - 1, range=(1, nr - 1))[0]
    return inter, area_pred + area_lab - inter


def their_benchmark(items):
    """get_metrics per image + get_benchmark_result, for object, part, material and scene."""
    out = {}
    for task, n in (("object", len(OBJECTS)), ("material", len(MATERIALS))):
        scored = [it for it in items if task in it["gt"]]
        acc = sum(((it["gt"][task] == it["pred"][task]) * (it["gt"][task] > 0)).sum() for it in scored)
        pixel = sum((it["gt"][task] > 0).sum() for it in scored)
        ious = [their_iou(it["pred"][task], it["gt"][task], n - 1) for it in scored]
        out[f"{task}/pixel_acc"] = acc / (pixel + 1e-8)
        out[f"{task}/mIoU"] = (sum(i for i, _ in ious) / (sum(u for _, u in ious) + 1e-8)).mean()
    miou, pacc = [], []
    for k, (obj, labels) in enumerate(HIERARCHY.items()):
        inter = uni = acc = pixel = 0
        for it in items:
            if "object" not in it["gt"] or not it["gt"]["valid_part"][k]:
                continue
            gt = it["gt"]["seg_part"] * (it["gt"]["object"] == obj)
            pred = it["pred"]["part"][k] * (it["pred"]["object"] == obj)
            acc += ((gt == pred) * (gt > 0)).sum()
            pixel += (gt > 0).sum()
            i, u = their_part_iou(pred, gt, len(labels))
            inter, uni = inter + i, uni + u
        if pixel == 0:
            continue
        miou.append((inter / (uni + 1e-8)).mean())
        pacc.append(acc / (float(pixel) + 1e-8))
    out["part/mIoU"], out["part/pixel_acc"] = np.mean(miou), np.mean(pacc)
    out["scene/top1"] = np.mean([it["pred"]["scene"] == it["gt"]["scene"] for it in items if "scene" in it["gt"]])
    return {k: round(100 * float(v), 2) for k, v in out.items()}


def test_metrics_follow_their_eval_multipro():
    rng = np.random.default_rng(0)
    tasks = {"object": len(OBJECTS), "material": len(MATERIALS), "scene": len(SCENES),
             "part": {"objects": list(HIERARCHY), "num_parts": [len(p) for p in HIERARCHY.values()]}}
    metrics = MultiTaskMetrics(tasks, {"scoring": "unifiedparsing"})
    items = []
    for i in range(6):
        logits = {"object": torch.randn(1, len(OBJECTS), 12, 10), "material": torch.randn(1, len(MATERIALS), 12, 10),
                  "part": torch.randn(1, 6, 12, 10), "scene": torch.randn(1, len(SCENES))}
        logits["object"][:, 2] = -100  # class 2: in neither truth nor prediction, counts 0 in their mean
        pred = {"object": logits["object"].argmax(1)[0].numpy(), "material": logits["material"].argmax(1)[0].numpy(),
                "part": [logits["part"][0, :3].argmax(0).numpy(), logits["part"][0, 3:].argmax(0).numpy()],
                "scene": int(logits["scene"].argmax(1))}
        if i % 3 == 2:  # an OpenSurfaces image: material only ("-" = 0 and some never-used class 3)
            gt = {"material": rng.integers(0, 3, (12, 10))}
            targets = {"material": torch.as_tensor(np.where(gt["material"] == 0, IGNORE_INDEX, gt["material"]))}
        else:  # an ADE20K image: objects (0 = "-", class 2 never in the truth), parts, scene on some
            objects = rng.choice([0, 1, 3, 4], (12, 10))
            raw_parts = rng.choice([0, 1, 2, 3, 4], (12, 10)) * (rng.random((12, 10)) < 0.8)
            seg_part, valid = their_part_map(objects, raw_parts)
            if i == 3:  # a person whose parts do not count
                seg_part[objects == 3], valid[0] = 0, False
            gt = {"object": objects, "seg_part": seg_part, "valid_part": valid}
            ours = np.full(objects.shape, IGNORE_INDEX)
            for k, obj in enumerate(HIERARCHY):
                if valid[k]:
                    ours[objects == obj] = seg_part[objects == obj]
            targets = {"object": torch.as_tensor(np.where(objects == 0, IGNORE_INDEX, objects)),
                       "part": torch.as_tensor(ours)}
            if i != 1:
                gt["scene"] = int(rng.integers(0, 3))
                targets["scene"] = torch.tensor(gt["scene"])
        items.append({"gt": gt, "pred": pred})
        metrics.update({k: v for k, v in logits.items()}, {k: v[None] for k, v in targets.items()})
    ours = metrics.summary()
    theirs = their_benchmark(items)
    assert ours == pytest.approx(theirs, abs=0.011), (ours, theirs)
    assert set(ours) == set(theirs)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_training_steps_on_pascal_records(broden, tmp_path):
    from upernet.cli import main

    run = tmp_path / "run"
    assert main(["train", "multitask_builtin", "data.kind=broden", f"data.root={broden}", "multitask.sources=[pascal]",
                 "schedule.iters=2", "schedule.warmup_iters=0", "multitask.texture_iters=1", "data.batch_size=2",
                 "val.interval=0", "train.checkpoint_interval=10", "model.args.channels=8",
                 "model.args.base_args.model_name=resnet10t", "--out", str(run)]) == 0
    assert (run / "model").is_dir()
