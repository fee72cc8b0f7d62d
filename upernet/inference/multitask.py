"""Prediction files of the multi-task model: one label map and overlay per pixel task, and the
image-level labels (scene, texture) in a JSON file."""
from __future__ import annotations

from pathlib import Path

from ..io import write_json
from .segmenter import MultiTaskSegmentation, save_label_png, save_npy, save_png


def write_multitask(result: MultiTaskSegmentation, stem: Path, legend: bool = True) -> list[Path]:
    """`<stem>_<task>.png` (palette PNG) and `<stem>_<task>_overlay.png` per pixel task (object, part,
    material), `<stem>_<task>_probs.npy` where the result has probabilities, and the scene/texture
    labels in `<stem>_labels.json`; returns the files written."""
    written = []
    for task, seg in result.tasks.items():
        labels, overlay = stem.with_name(f"{stem.name}_{task}.png"), stem.with_name(f"{stem.name}_{task}_overlay.png")
        save_label_png(seg.labels, seg.palette, labels)
        save_png(seg.overlay(legend=legend), overlay)
        written += [labels, overlay]
        if seg.probs is not None:
            written.append(stem.with_name(f"{stem.name}_{task}_probs.npy"))
            save_npy(seg.probs.astype("float16"), written[-1])
    written.append(write_json(stem.with_name(f"{stem.name}_labels.json"), result.image_labels))
    return written
