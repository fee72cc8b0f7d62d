"""The one evaluation loop of every model kind; what differs (the targets, the scores) is the accumulator.

Distributed evaluation gives exactly the numbers of one process: rank r takes samples
r, r + world_size, ... (no padded duplicates, unlike `DistributedSampler`), and the counts are
summed before any ratio is taken.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..inference.modes import infer_outputs
from ..inference.prepare import prepare_for_inference


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP: its forward broadcasts buffers, a collective that would hang when
    ranks evaluate different numbers of samples."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def device_of(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any, e.g. ONNX)."""
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def prepared_for_evaluation(model: nn.Module, autocast_dtype: torch.dtype | None = None
                            ) -> tuple[nn.Module, torch.dtype | None]:
    """The model an evaluation during or after training runs, and the autocast dtype left to apply.

    The plain model (DDP unwrapped) prepared for inference (folded BatchNorms, Winograd head convs);
    bf16 autocast becomes real bf16 weights, other autocast dtypes stay autocast.
    """
    dtype = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"
    return prepare_for_inference(unwrap_model(model), dtype), (None if dtype == "bf16" else autocast_dtype)


def evaluate_dataset(model, dataset, metrics, distributed: bool = False, progress: bool = True, **infer_options):
    """The one evaluation loop: every sample of `dataset` through `infer_outputs`, into `metrics`.

    Args:
        model: the model run (a DDP wrapper is unwrapped).
        dataset: indexable; its items are what `metrics` scores (a normalised "image" and the targets).
        metrics: the accumulator of the model kind (`SegmentationMetrics`, `multitask.MultiTaskMetrics`):
            `target_size(sample)`, `add(probs, sample)`, `reduce()`; the sample it gets also holds
            "index", its position in `dataset` (the same whatever the number of processes).
        distributed: rank r takes samples r, r + world_size, ... (no padded duplicates); the counts are
            summed over the processes before any ratio is taken.
        progress: show a progress bar (on rank 0 only).
        **infer_options: keyword arguments of `inference.modes.infer_outputs` (mode, crop_size, stride,
            scales, flip, autocast_dtype).

    Returns:
        `metrics`, reduced over the processes.
    """
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise UserError("distributed evaluation needs torch.distributed to be initialised (run under torchrun)")
    if len(dataset) == 0:
        raise UserError("the evaluation dataset is empty")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = unwrap_model(model)
    device = device_of(model)
    indices = range(rank, len(dataset), world)
    if progress and rank == 0:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img", dynamic_ncols=True)
    with torch.no_grad():
        for index in indices:
            sample = {**dataset[index], "index": index}
            probs = infer_outputs(model, sample["image"].to(device), out_size=metrics.target_size(sample),
                                  **infer_options)
            metrics.add(probs, sample)
    if distributed:
        metrics.reduce()
    return metrics
