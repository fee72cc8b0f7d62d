"""Write upernet/assets/broden_plus.json, the Broden+ label sets, from the CSV files of the authors'
repository (CSAILVision/unifiedparsing, `meta_file/joint_dataset/*.csv`). Run once:

    python tools/broden_plus_labels.py path/to/unifiedparsing/meta_file/joint_dataset

Class names are kept in label order (label = index). `parts` keeps the object -> parts hierarchy in
the order of `object_part_hierarchy.csv`, which is the order of the part channels of their network;
each object's list starts with part 0 ("-", not a part of that object).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "upernet" / "assets" / "broden_plus.json"


def names(folder: Path, task: str) -> list[str]:
    rows = list(csv.DictReader(open(folder / f"{task}.csv", newline="")))
    labels = [int(r["label"]) for r in rows]
    assert labels == list(range(len(rows))), f"{task}.csv: labels are not 0..{len(rows) - 1}"
    return [r["name"] for r in rows]


def main(folder: Path) -> None:
    out = {task + "s": names(folder, task) for task in ("object", "part", "scene", "material", "texture")}
    hierarchy = []
    for row in csv.DictReader(open(folder / "object_part_hierarchy.csv", newline="")):
        labels = [int(i) for i in row["part_labels"].split(";")]
        assert labels[0] == 0 and row["object_name"] == out["objects"][int(row["object_label"])]
        assert row["part_names"].split(";") == [out["parts"][i] for i in labels]
        hierarchy.append({"object": int(row["object_label"]), "parts": labels})
    out["hierarchy"] = hierarchy
    out["source"] = "CSAILVision/unifiedparsing meta_file/joint_dataset (object, part, scene, material, texture, object_part_hierarchy).csv"
    OUT.write_text(json.dumps(out, indent=0, ensure_ascii=False) + "\n")
    print(f"{OUT}: " + ", ".join(f"{len(v)} {k}" for k, v in out.items() if isinstance(v, list)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
