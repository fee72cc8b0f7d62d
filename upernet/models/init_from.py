"""Start a model from another one's weights: keep every tensor whose name and shape fit.

Fine-tuning a published UPerNet on new classes changes the class count, so the two 1x1 classifiers
(decode head and auxiliary head) no longer fit; they keep their fresh initialisation and are
listed. Every other tensor must fit: a missing or differently shaped tensor means the architectures
differ, which is an error naming the tensors rather than a silently half-loaded model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .weights import adapt_input_channels

# The tensors a different class count changes: the classifiers of the decode and auxiliary heads.
CLASSIFIER = re.compile(r"(decode_head|aux_head)\.classifier\.(weight|bias)")
LISTED = 8  # tensor names quoted in an error before "..."


@dataclass
class FittedWeights:
    """What `copy_fitting_weights` did.

    Attributes:
        copied: names of the tensors taken from the source.
        reinitialised: classifier tensors left at their fresh initialisation (another class count).
        dropped: source tensors the model has no place for (only an auxiliary head the model leaves out).
        adapted: RGB input convs fitted to the model's `in_channels` (`weights.adapt_input_channels`).
    """

    copied: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def listing(names: list[str]) -> str:
    return ", ".join(names[:LISTED]) + (f" ... ({len(names)} in all)" if len(names) > LISTED else "")


def copy_fitting_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> FittedWeights:
    """Load into `model` every tensor of `state` whose name and shape fit; the classifiers of another
    class count keep their initialisation. Anything else that does not fit raises `UserError`.

    Args:
        model: the model to fine-tune (built with the new class count).
        state: the source model's state dict.
        source: what `state` comes from, for messages.
    """
    own = model.state_dict()
    result, fitted, mismatched = FittedWeights(), {}, []
    state = dict(state)  # the input conv is adapted in this copy, never in the source's tensors
    result.adapted = adapt_input_channels(state, model)
    for key, tensor in own.items():
        theirs = state.get(key)
        if theirs is None:
            continue
        if theirs.shape == tensor.shape:
            fitted[key] = theirs
        elif CLASSIFIER.fullmatch(key) and theirs.shape[1:] == tensor.shape[1:]:
            result.reinitialised.append(key)
        else:
            mismatched.append(f"{key} (source {tuple(theirs.shape)}, model {tuple(tensor.shape)})")
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    result.dropped = unused if all(k.startswith("aux_head.") for k in unused) else []
    problems = [f"shapes differ: {listing(mismatched)}" if mismatched else "",
                f"missing from the source: {listing(missing)}" if missing else "",
                f"not in the model: {listing(unused)}" if unused and not result.dropped else ""]
    problems = [p for p in problems if p]
    if problems:
        raise UserError(f"{source}: model.init_from does not fit the model beyond its classifiers; "
                        + "; ".join(problems) + " (start from a checkpoint of the same architecture)")
    model.load_state_dict(fitted, strict=False)
    result.copied = list(fitted)
    return result
