"""Prediction files of the multi-task model: one label map and overlay per pixel task (parts drawn
inside their objects), and the image-level labels (scene, texture) with their top-5 in a JSON file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..io import write_json
from .segmenter import MultiTaskSegmentation, overlay_image, save_label_png, save_npy, save_png

OBJECT_ALPHA = 0.25  # the objects behind the parts, faint
PART_ALPHA = 0.6


def part_overlay(result: MultiTaskSegmentation, legend: bool = True) -> Image.Image:
    """The image with its objects faintly coloured and the parts over them in their own colours, so
    that each part is seen inside its object; the legend names the largest part labels."""
    parts = result.tasks["part"]
    picture = parts.image.astype(np.float32)
    if "object" in result.tasks:
        objects = result.tasks["object"]
        colours = np.asarray(objects.palette, dtype=np.float32)[objects.labels]
        picture = (1 - OBJECT_ALPHA) * picture + OBJECT_ALPHA * colours
    inside = (parts.labels > 0)[..., None]
    colours = np.asarray(parts.palette, dtype=np.float32)[parts.labels]
    picture = np.where(inside, (1 - PART_ALPHA) * picture + PART_ALPHA * colours, picture)
    picture = picture.round().clip(0, 255).astype(np.uint8)
    if not legend:
        return Image.fromarray(picture)
    return overlay_image(picture, parts.labels, parts.palette, parts.class_names, alpha=0.0)  # legend only


def write_multitask(result: MultiTaskSegmentation, stem: Path, legend: bool = True) -> list[Path]:
    """`<stem>_<task>.png` (palette PNG) and `<stem>_<task>_overlay.png` per pixel task (object, part,
    material; the part overlay shows the parts inside their objects), `<stem>_<task>_probs.npy` where
    the result has probabilities, and in `<stem>_labels.json` the scene/texture label of each
    image-level task and `<task>_top5`: [[class, probability], ...] best first; returns the files written."""
    written = []
    for task, seg in result.tasks.items():
        labels, overlay = stem.with_name(f"{stem.name}_{task}.png"), stem.with_name(f"{stem.name}_{task}_overlay.png")
        save_label_png(seg.labels, seg.palette, labels)
        save_png(part_overlay(result, legend) if task == "part" else seg.overlay(legend=legend), overlay)
        written += [labels, overlay]
        if seg.probs is not None:
            written.append(stem.with_name(f"{stem.name}_{task}_probs.npy"))
            save_npy(seg.probs.astype("float16"), written[-1])
    image_labels = {**result.image_labels,
                    **{f"{task}_top5": [[name, round(p, 6)] for name, p in top] for task, top in result.image_top5.items()}}
    written.append(write_json(stem.with_name(f"{stem.name}_labels.json"), image_labels))
    return written
