"""The label protocol a model was trained with, applied to the data it is evaluated on.

A trained model keeps its class names, palette and `reduce_zero_label` in `model.meta` (saved in
our folder's config.json and in training checkpoints). Evaluating it on a folder dataset then needs
no repetition of them, and a recipe that reads the masks the other way is refused rather than
scored as a silent 0 mIoU. Models saved before `reduce_zero_label` was stored keep today's defaults.
"""
from __future__ import annotations

import inspect

from ..errors import UserError
from .build import DATASETS

PROTOCOL_OPTIONS = ("classes", "palette", "reduce_zero_label")


def protocol_options(kind: str, options: dict, meta: dict | None) -> dict:
    """`options` of a `kind` dataset with the model's protocol filling what they leave out.

    Args:
        kind: the dataset kind (only kinds that take the options, such as `folder`, are changed).
        options: the recipe's `data.options`.
        meta: the model's meta (`class_names`, `palette`, `reduce_zero_label`).
    """
    meta = meta or {}
    taken = set(inspect.signature(DATASETS[kind]).parameters) if kind in DATASETS else set()
    stored = {"classes": meta.get("class_names"), "palette": meta.get("palette"),
              "reduce_zero_label": meta.get("reduce_zero_label")}
    out = dict(options)
    for key in PROTOCOL_OPTIONS:
        if key not in taken or stored[key] is None:
            continue
        if key not in out:
            out[key] = stored[key]
        elif key == "reduce_zero_label" and bool(out[key]) != bool(stored[key]):
            raise UserError(f"data.options.reduce_zero_label={str(out[key]).lower()} but the model was trained with "
                            f"reduce_zero_label={str(stored[key]).lower()}; drop the option (the model's is used) or "
                            f"evaluate a model trained on masks read that way")
    return out
