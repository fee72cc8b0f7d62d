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

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.multitask import SourceSampler, build_sources, collate, tasks_of
from ..evaluation.multitask import evaluate_multitask
from ..models import build_model
from ..models.upp import upp_loss
from ..models.weights import load_state_dict_strict
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from ..config import Config, to_dict
from .optim import PolySchedule, build_optimizer
from .loop import (InfiniteSampler, MetricsLog, SeededSamples, _amp, _finite_state, checked_step, set_train_mode,
                    start_run)

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


