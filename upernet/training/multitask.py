"""Training and evaluation of the multi-task UPerNet (Unified Perceptual Parsing) on several
sources, each annotating only some tasks.

    upernet train upp_builtin      # data.kind "upp_builtin" or "broden" selects this loop

Each iteration draws one source with probability proportional to its size (the same draw on every
process: it depends only on the seed and the iteration), takes a batch from it and puts a loss
only on the tasks that source annotates. The texture head is trained after the rest, for
`data.options.texture_iters` iterations on texture crops, with the backbone's gradient stopped.

Metrics as in the paper: object and material mIoU and pixel accuracy; part mIoU (background
counted) averaged within each object, then across objects; scene and texture top-1 accuracy.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.multitask import BrodenFolder, SourceSampler, builtin_meta, builtin_sources, part_layout, read_broden_meta
from ..models import build_model
from ..models.upp import upp_loss
from ..models.weights import load_state_dict_strict
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from ..config import Config, to_dict
from ..evaluation.metrics import confusion_matrix, reduce, summarize
from .optim import PolySchedule, build_optimizer
from .loop import (InfiniteSampler, MetricsLog, SeededSamples, _amp, _finite_state, checked_step, set_train_mode,
                    start_run)

MULTITASK_KINDS = ("upp_builtin", "broden")
PIXEL_TASKS = ("object", "material")


# ---- data ---------------------------------------------------------------------------------------
def build_sources(config: Config, split: str) -> tuple[list[Dataset], dict]:
    """The sources of a split and the class lists (meta) of the data."""
    d = config.data
    if d.kind == "upp_builtin":
        size = int(d.options.get("image_size", 96))
        count = d.options.get("val_samples") if split == d.val_split else None
        return builtin_sources(split, image_size=size, seed=config.train.seed, num_samples=count), builtin_meta()
    if d.kind == "broden":
        meta = read_broden_meta(d.root)
        names = d.options.get("sources") or list(meta["sources"])
        return [BrodenFolder(d.root, name, split) for name in names], meta
    raise ValueError(f"data.kind {d.kind!r} is not a multi-task kind ({', '.join(MULTITASK_KINDS)})")


def tasks_of(meta: dict) -> dict:
    tasks = {"object": len(meta["objects"]), "material": len(meta["materials"]), "scene": len(meta["scenes"]),
             "texture": len(meta["textures"])}
    if meta.get("parts"):
        tasks["part"] = part_layout(meta["objects"], meta["parts"])
    return {k: v for k, v in tasks.items() if v}


def collate(items: list[dict]) -> dict:
    tasks = items[0]["targets"].keys()
    return {"image": torch.stack([it["image"] for it in items]),
            "targets": {t: torch.stack([it["targets"][t] for it in items]) for t in tasks},
            "source": items[0]["source"]}


# ---- metrics ------------------------------------------------------------------------------------
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


# ---- training -----------------------------------------------------------------------------------
def train_multitask(config: Config, run_dir: str | Path, resume: str | Path | None = None,
                    stop_at: int | None = None, progress: bool = True, info=None) -> dict:
    """Train the multi-task model of `config` into `run_dir` (same run-folder layout as `train`);
    `stop_at` stops after that iteration with a checkpoint, which `resume` continues from."""
    from tqdm import tqdm

    from ..distributed import all_gather_objects, cleanup, init_distributed, prepare_model

    own_dist = info is None
    info = info or init_distributed(config.train.device)
    try:
        cfg, device, run_dir = config, info.device, Path(run_dir)
        resume_file, checkpoint = start_run(cfg, run_dir, resume, info)

        train_sources, meta = build_sources(cfg, cfg.data.train_split)
        val_sources, _ = build_sources(cfg, cfg.data.val_split)
        tasks = tasks_of(meta)
        model = build_model(cfg.model.name, tasks=tasks, **cfg.model.args).to(device)
        model.meta = {"tasks_meta": meta, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
        optimizer = build_optimizer(model, cfg.optim)
        schedule = PolySchedule(optimizer, cfg.schedule)
        amp_dtype, use_scaler = _amp(cfg.train.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        weights = dict(cfg.data.options.get("loss_weights", {}))
        texture_iters = int(cfg.data.options.get("texture_iters", 0))

        # Phase 1 draws among the non-texture sources; phase 2 (texture_iters) trains on textures.
        main = [i for i, s in enumerate(train_sources) if tuple(s.tasks) != ("texture",)]
        texture = [i for i, s in enumerate(train_sources) if tuple(s.tasks) == ("texture",)]
        pick_main = SourceSampler([len(train_sources[i]) for i in main], cfg.train.seed)
        total_iters = cfg.schedule.iters + (texture_iters if texture else 0)

        start, consumed = 0, [0] * len(train_sources)
        torch.manual_seed(cfg.train.seed + info.rank)  # dropout differs between processes
        if checkpoint is not None:
            load_state_dict_strict(model, checkpoint["model"], str(resume_file))
            optimizer.load_state_dict(checkpoint["optimizer"])
            schedule.load_state_dict(checkpoint["schedule"])
            scaler.load_state_dict(checkpoint["scaler"])
            start, consumed = checkpoint["iteration"], list(checkpoint["data"]["consumed"])
            if len(checkpoint["rng"]) == info.world_size:
                set_rng_state(checkpoint["rng"][info.rank])

        def stream(i: int):
            sampler = InfiniteSampler(len(train_sources[i]), cfg.train.seed + i, info.rank, info.world_size,
                                      start=consumed[i])
            # An own generator: creating the iterator must not draw from the global RNG (exact resume).
            return iter(DataLoader(SeededSamples(train_sources[i]), batch_size=cfg.data.batch_size,
                                   sampler=sampler, collate_fn=collate,
                                   generator=torch.Generator().manual_seed(cfg.train.seed + i)))

        streams = {i: stream(i) for i in range(len(train_sources))}
        ddp = prepare_model(model, info, cfg.model.sync_bn, find_unused=True)
        log = MetricsLog(run_dir, info.is_main, start)
        bar = tqdm(total=total_iters, initial=start, disable=not (progress and info.is_main), desc="train", unit="it")
        result: dict = {"iteration": start, "loss": None, "val": None, "best_mIoU": float("nan"),
                        "run_dir": str(run_dir)}
        end = min(total_iters, stop_at) if stop_at else total_iters
        last_saved = resume_file

        def state(iteration: int) -> dict:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                    "best_mIoU": 0.0, "rng": all_gather_objects(rng_state(), info),
                    "data": {"consumed": consumed}, "config": to_dict(cfg), "model_config": model.config,
                    "meta": model.meta}

        set_train_mode(ddp, cfg.model.norm_eval)
        for iteration in range(start + 1, end + 1):
            in_texture_phase = iteration > cfg.schedule.iters
            source = texture[0] if in_texture_phase else main[pick_main(iteration)]
            if info.distributed and len(set(all_gather_objects(source, info))) != 1:
                raise RuntimeError(f"iteration {iteration}: processes drew different sources")  # never by design
            if in_texture_phase:
                # The rest is trained: it stays fixed (BatchNorm statistics too), only the texture head
                # learns, its lr decaying linearly from the base lr over the texture iterations.
                model.eval()
                model.heads["texture"].train()
                left = 1 - (iteration - cfg.schedule.iters - 1) / texture_iters
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * left
            batch = next(streams[source])
            consumed[source] += cfg.data.batch_size
            targets = {t: v.to(device) for t, v in batch["targets"].items()}
            wanted = list(targets) + (["object"] if "part" in targets else [])
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = ddp(batch["image"].to(device), tasks=list(dict.fromkeys(wanted)))
            losses = upp_loss(model, outputs, targets, weights)
            scaler.scale(losses["total"]).backward()
            loss_value = checked_step(losses["total"].detach(), iteration, last_saved, model, optimizer, scaler, cfg,
                                      info, context=f" (source {batch['source']})")
            if not in_texture_phase:
                schedule.step()
            result.update(iteration=iteration, loss=loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", src=batch["source"][:10], refresh=False)
            if iteration % cfg.train.log_interval == 0:
                log.write({"kind": "train", "iter": iteration, "loss": loss_value, "source": batch["source"],
                           "lr": optimizer.param_groups[-1]["lr"],
                           **{f"loss/{k}": float(v.detach()) for k, v in losses.items() if k != "total"}})
            if (cfg.val.interval and iteration % cfg.val.interval == 0) or iteration == total_iters:
                summary = evaluate_multitask(model, val_sources, tasks, meta, distributed=info.distributed)
                set_train_mode(ddp, cfg.model.norm_eval)
                result["val"] = summary
                result["best_mIoU"] = summary.get("object/mIoU", float("nan"))
                log.write({"kind": "val", "iter": iteration, **summary})
                if info.is_main:
                    bar.write(f"iter {iteration}: " + "  ".join(f"{k} {v:.1f}" for k, v in summary.items()))
            if iteration % cfg.train.checkpoint_interval == 0 or iteration == end:
                ckpt = _finite_state(state(iteration), iteration, last_saved)
                if info.is_main:
                    save_checkpoint(ckpt, run_dir, iteration, cfg.train.keep_last)
                last_saved = run_dir / "checkpoints" / f"iter_{iteration:07d}.pt"
        bar.close()
        log.close()
        if info.is_main and result["iteration"] == total_iters:
            model.save(run_dir / "model")
        return result
    finally:
        if own_dist:
            cleanup()


# ---- prediction ---------------------------------------------------------------------------------
def part_map(part_logits: torch.Tensor, objects: torch.Tensor, layout: dict) -> torch.Tensor:
    """Global part ids (1 + offset in the part list; 0 = no part) from each pixel's predicted object."""
    out = torch.zeros_like(objects)
    start = 0
    for obj, n in zip(layout["objects"], layout["num_parts"]):
        inside = objects == obj
        best = part_logits[:, start:start + n].argmax(1)
        out[inside & (best > 0)] = (start + best)[inside & (best > 0)] + 1  # part 0 = that object's background
        start += n
    return out


@torch.no_grad()
def predict_multitask(model: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path,
                      size: str = "none", progress: bool = True):
    """Per image: `<stem>_object.png`, `_part.png`, `_material.png` (palette PNGs + `_overlay` pictures
    of each) and the scene/texture labels in `<stem>_labels.json`; prints the scene label."""
    import json

    from tqdm import tqdm

    from ..data.classes import default_palette
    from ..inference.modes import find_images, parse_size
    from ..inference.predict import PredictResult, _ImageFiles, _output_stems, overlay_image, save_label_png

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
