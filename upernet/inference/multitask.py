"""Prediction files of the multi-task model: one label map and overlay per pixel task, and the
image-level labels (scene, texture) in a JSON file."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..models.upp import part_map


@torch.no_grad()
def predict_multitask(model: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path,
                      size: str = "none", progress: bool = True):
    """Per image: `<stem>_object.png`, `_part.png`, `_material.png` (palette PNGs + `_overlay` pictures
    of each) and the scene/texture labels in `<stem>_labels.json`; prints the scene label."""
    import json

    from tqdm import tqdm

    from ..data.classes import default_palette
    from .modes import find_images, parse_size
    from .predict import PredictResult, _ImageFiles, _output_stems, overlay_image, save_label_png

    meta = model.meta.get("tasks_meta", {})
    mean, std = model.meta.get("mean", (123.675, 116.28, 103.53)), model.meta.get("std", (58.395, 57.12, 57.375))
    files = find_images(inputs)
    out_dir = Path(out_dir)
    result = PredictResult(out_dir)
    stems = _output_stems(files, out_dir)
    layout = model.tasks.get("part")
    part_names = ["(none)"] + [f"{obj}:{p}" for obj, parts in meta.get("parts", {}).items() for p in parts]
    names = {"object": meta.get("objects"), "material": meta.get("materials"), "part": part_names}
    dataset = _ImageFiles([f for f, _ in files], parse_size(size))
    model.eval()
    for item in tqdm(dataset, desc="predict", unit="img", disable=not progress):
        if item["error"]:
            result.failures.append((files[item["index"]][0], item["error"]))
            continue
        image = item["image"].float()
        x = ((image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]
        outputs = model(x)
        stem = stems[item["index"]]
        stem.parent.mkdir(parents=True, exist_ok=True)
        maps = {t: outputs[t].argmax(1) for t in ("object", "material") if t in outputs}
        if "part" in outputs:
            maps["part"] = part_map(outputs["part"], maps["object"], layout)
        picture = image.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        for task, labels in maps.items():
            task_names = names.get(task) or [str(i) for i in range(int(outputs[task].shape[1]) + 1)]
            palette = default_palette(max(len(task_names), int(labels.max()) + 1))
            save_label_png(labels[0].numpy(), palette, stem.with_name(f"{stem.name}_{task}.png"))
            overlay_image(picture, labels[0].numpy(), palette, task_names).save(
                stem.with_name(f"{stem.name}_{task}_overlay.png"))
        labels = {}
        for task, key in (("scene", "scenes"), ("texture", "textures")):
            if task in outputs:
                k = int(outputs[task].argmax(1))
                labels[task] = meta.get(key, [])[k] if k < len(meta.get(key, [])) else k
        stem.with_name(f"{stem.name}_labels.json").write_text(json.dumps(labels))
        if progress and labels:
            print(f"{files[item['index']][0]}: " + ", ".join(f"{t} = {v}" for t, v in labels.items()))
        result.written.append(stem)
    return result
