"""Label sets shipped with the package, readable from every layer (models and data both use them).

Broden+ (Xiao et al. 2018, "Unified Perceptual Parsing"): 336 objects (0 = "-"), 153 parts (0 = "-"),
365 scenes, 26 materials (0 = "-"), 47 textures, and the object -> parts hierarchy of the 77 objects
with parts, in the order of the part channels of the authors' network. `assets/broden_plus.json` is
written by `tools/broden_plus_labels.py` from the authors' CSV files.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


@functools.lru_cache(maxsize=1)
def _broden_plus() -> dict:
    return json.loads((ASSETS / "broden_plus.json").read_text(encoding="utf-8"))


def broden_plus_labels() -> dict:
    """The Broden+ label sets: "objects", "parts", "scenes", "materials", "textures" (names, index = label)
    and "hierarchy", a list of {"object": label, "parts": [global part labels, 0 first]}."""
    return copy.deepcopy(_broden_plus())


def broden_plus_tasks(texture: bool = True) -> dict:
    """Class counts per task of Broden+, the `tasks` argument of `upernet_multitask_*` (the shape of
    `upernet.data.multitask.builtin_tasks()`); part channels follow the hierarchy's order.

    Args:
        texture: include the texture task (the authors' released network has no texture head).
    """
    labels = _broden_plus()
    tasks = {"object": len(labels["objects"]), "material": len(labels["materials"]), "scene": len(labels["scenes"]),
             "part": {"objects": [h["object"] for h in labels["hierarchy"]],
                      "num_parts": [len(h["parts"]) for h in labels["hierarchy"]]}}
    if texture:
        tasks["texture"] = len(labels["textures"])
    return tasks


def broden_plus_meta() -> dict:
    """The `tasks_meta` of a Broden+ model: class names per task, and per object with parts its part
    names ("parts") and global part labels ("part_labels"), each list starting with part 0 "-"."""
    labels = _broden_plus()
    objects, parts = labels["objects"], labels["parts"]
    return {"objects": list(objects), "materials": list(labels["materials"]), "scenes": list(labels["scenes"]),
            "textures": list(labels["textures"]),
            "parts": {objects[h["object"]]: [parts[p] for p in h["parts"]] for h in labels["hierarchy"]},
            "part_labels": {objects[h["object"]]: list(h["parts"]) for h in labels["hierarchy"]}}
