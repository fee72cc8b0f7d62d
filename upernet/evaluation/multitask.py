"""Scoring the multi-task model as in the paper: object and material mIoU and pixel accuracy; part
mIoU (background counted) averaged within each object, then across objects; scene and texture top-1.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..data.multitask import MULTITASK_KINDS, PIXEL_TASKS, build_sources, collate
from .metrics import confusion_matrix, reduce, summarize


class MultiTaskMetrics:
    """Accumulates every task's counts; `summary()` gives the paper's numbers in percent."""

    def __init__(self, tasks: dict, meta: dict):
        self.tasks, self.meta = tasks, meta
        self.confusion = {t: torch.zeros(tasks[t], tasks[t], dtype=torch.int64) for t in PIXEL_TASKS if t in tasks}
        layout = tasks.get("part")
        self.part_confusion = ([torch.zeros(n, n, dtype=torch.int64) for n in layout["num_parts"]] if layout else [])
        self.top1 = {t: torch.zeros(2, dtype=torch.int64) for t in ("scene", "texture") if t in tasks}

    def update(self, outputs: dict, targets: dict) -> None:
        for task, conf in self.confusion.items():
            if task in targets:
                conf += confusion_matrix(outputs[task].argmax(1).cpu(), targets[task].cpu(), self.tasks[task])
        for task, counts in self.top1.items():
            if task in targets:
                counts += torch.tensor([int((outputs[task].argmax(1).cpu() == targets[task].cpu()).sum()),
                                        targets[task].numel()])
        if self.part_confusion and "part" in targets:
            layout = self.tasks["part"]
            start = 0
            for k, (obj, n) in enumerate(zip(layout["objects"], layout["num_parts"])):
                pred = outputs["part"][:, start:start + n].argmax(1).cpu()
                label = targets["part"].cpu().clone()
                label[targets["object"].cpu() != obj] = 255  # parts are scored inside their object only
                self.part_confusion[k] += confusion_matrix(pred, label, n)
                start += n

    def reduce(self) -> None:
        for task in self.confusion:
            self.confusion[task] = reduce(self.confusion[task])
        self.part_confusion = [reduce(c) for c in self.part_confusion]
        for task in self.top1:
            self.top1[task] = reduce(self.top1[task])

    def summary(self) -> dict:
        out: dict[str, float] = {}
        for task, conf in self.confusion.items():
            if conf.sum() > 0:
                s = summarize(conf)
                out[f"{task}/mIoU"], out[f"{task}/pixel_acc"] = s["mIoU"], s["aAcc"]
        per_object = [summarize(c)["mIoU"] for c in self.part_confusion if c.sum() > 0]
        per_object = [v for v in per_object if not math.isnan(v)]
        if per_object:
            out["part/mIoU"] = round(sum(per_object) / len(per_object), 2)
        for task, (correct, total) in self.top1.items():
            if total > 0:
                out[f"{task}/top1"] = round(100.0 * int(correct) / int(total), 2)
        return out


@torch.no_grad()
def evaluate_multitask(model: nn.Module, sources: Sequence[Dataset], tasks: dict, meta: dict,
                       distributed: bool = False, batch_size: int = 8) -> dict:
    """Every source of the split, each scored on the tasks it annotates; reduced across processes."""
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    metrics = MultiTaskMetrics(tasks, meta)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for source in sources:
        shard = torch.utils.data.Subset(source, range(rank, len(source), world))  # no padded duplicates
        for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collate):
            wanted = list(batch["targets"]) + (["object"] if "part" in batch["targets"] else [])
            outputs = model(batch["image"].to(device), tasks=[t for t in dict.fromkeys(wanted) if t in tasks])
            metrics.update(outputs, batch["targets"])
    metrics.reduce()
    model.train(was_training)
    return metrics.summary()


def format_multitask(results: dict) -> str:
    width = max(len(k) for k in results) if results else 0
    return "\n".join(f"{k:<{width}}  {v:6.2f}" for k, v in results.items())


def evaluate_multitask_from_cli(model: nn.Module, config: Config, checkpoint: str, out: str | None,
                                device: str = "auto") -> dict:
    """`upernet eval` of a multi-task model: the per-task table, saved as metrics.json."""
    import json

    from ..distributed import cleanup, init_distributed

    if config.data.kind not in MULTITASK_KINDS:
        raise ValueError(f"{checkpoint} is a multi-task model; evaluate it with a multi-task config "
                         f"(data.kind {' or '.join(MULTITASK_KINDS)}), e.g. upp_builtin")
    sources, meta = build_sources(config, config.data.val_split)
    info = init_distributed(device)
    try:
        results = evaluate_multitask(model.to(info.device), sources, model.tasks, meta, distributed=info.distributed)
        if info.is_main:
            print(format_multitask(results))
            folder = Path(out) if out else Path(checkpoint).resolve().parent / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.json").write_text(json.dumps(results, indent=2))
            print(f"wrote {folder / 'metrics.json'}")
    finally:
        cleanup()
    return results
