"""The training loop: iteration-based, resumable, the same on one CPU or many GPUs, for every task.

    upernet train                                   # the built-in synthetic recipe (builtin)
    upernet train upernet_r50_ade20k_512x512_160k data.kind=ade20k data.root=data/ade optim.lr=0.02 --out runs/r50
    upernet train multitask_builtin                 # Unified Perceptual Parsing on the built-in sources
    upernet train --resume --out runs/r50           # continue from the newest checkpoint of the run
    torchrun --nproc_per_node 2 -m upernet.cli train builtin

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl` (train loss/lr, validation
metrics, config changes on resume), `checkpoints/iter_<N>.pt` + `checkpoints/best.pt`, and at the
end `model/` in our weight format (`upernet.load_model`). Every checkpoint rebuilds its model
(`model_config`, `meta`) and the model's meta carries the test-time protocol (`test_size`, `inference`).

What differs between segmentation and multi-task parsing (model, batches, loss, metrics, the metric
of `best.pt`) is a task object (`tasks.py`); the flow below is the same for both. Data order and
augmentation are a pure function of (seed, sample position) (`sampling.py`), so a resumed run
continues with exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..config import (Config, ROOTLESS_KINDS, config_from_dict, dump_config, load_config, note, parse_override,
                      to_dict)
from ..distributed import (DistInfo, all_gather_objects, all_reduce_mean, barrier, cleanup, elastic_job,
                           init_distributed, prepare_model)
from ..io import write_text
from ..models.weights import load_state_dict_strict, save_model
from .checkpoint import (atomic_save, find_resume, load_checkpoint, non_finite, remove_stale_temp_files, rng_state,
                         save_checkpoint, set_rng_state)
from .optim import PolySchedule, build_optimizer
from .sampling import InfiniteSampler, SeededSamples  # noqa: F401  (the data-order API, re-exported)
from .tasks import SegmentationTask, build_task, dataset_options


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the iteration and the last good checkpoint."""


# ---- helpers beside the loop --------------------------------------------------------------------
def set_train_mode(model: nn.Module, norm_eval: bool) -> None:
    """`model.train()`, with BatchNorm layers left in eval mode when `norm_eval` is set."""
    model.train()
    if norm_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a GradScaler) for the configured precision on this device."""
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("train.precision=fp16 needs CUDA; use train.precision=bf16 on CPU")
        return torch.float16, True
    return torch.bfloat16, False


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Every process takes rank 0's buffers (BatchNorm running statistics): the ones that are saved.
    Without it each process would validate with its own statistics of its last batches."""
    if info.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) on the main process, plus TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool, resume_from: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a crashed run wrote after the checkpoint we resume from
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("iter", 0) <= resume_from]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("iter", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["iter"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def diverged_message(what: str, iteration: int, last_saved: Path | None, precision: str) -> str:
    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
    fixes = "Lower optim.lr, enable optim.grad_clip" + (", or use train.precision=fp32" if precision != "fp32" else "")
    return f"{what} at iteration {iteration}; stopped ({where}). {fixes}."


def checked_step(loss: torch.Tensor, iteration: int, last_saved: Path | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler, cfg: Config, info: DistInfo, context: str = "") -> float:
    """The optimiser step after backward: a NaN/Inf loss on any process stops every process before
    the weights are touched; else clip (when configured) and step. Returns the mean loss."""
    loss_value = float(all_reduce_mean(loss, info))
    if not math.isfinite(loss_value):
        raise TrainingDiverged(diverged_message(f"the training loss is {loss_value}{context}", iteration, last_saved,
                                                cfg.train.precision))
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss_value


def finite_state(ckpt: dict, iteration: int, last_saved: Path | None) -> dict:
    """`ckpt` unchanged, or TrainingDiverged when a weight is NaN/Inf (checked on every process, so
    all of them stop together and no NaN checkpoint is ever written)."""
    bad = non_finite(ckpt["model"])
    if bad:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite weights after iteration {iteration} ({', '.join(bad[:5])}); not saving "
                               f"them; stopped ({where})")
    return ckpt


def build_datasets(config: Config) -> tuple:
    """The training and validation datasets of a segmentation recipe, with their transforms."""
    task = SegmentationTask(config)
    task.build_data()
    return task.train_set, task.val_set


def build_training_model(config: Config, train_set, pretrained: bool = True) -> nn.Module:
    """The segmentation model of `config` for `train_set` (classes, meta); with `pretrained`, the
    backbone starts from `model.backbone_checkpoint` if one is set."""
    task = SegmentationTask(config)
    task.use_train_set(train_set)
    return task.build_model(pretrained)


# ---- the config of a run ------------------------------------------------------------------------
def flat(data: dict, prefix: str = "") -> dict:
    """Nested dicts as {dotted key: leaf value} (lists are leaves)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Config, new: Config) -> dict[str, list]:
    """{dotted key: [old value, new value]} for every key whose value differs."""
    a, b = flat(to_dict(old)), flat(to_dict(new))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def stored_config(content: dict, source: str) -> Config:
    """The config a checkpoint was trained with (old keys read as their new names, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_from_dict(content["config"], source=source)


def drop_foreign_options(config: Config) -> list[str]:
    """Remove `data.options` entries that belong to another dataset kind than `data.kind` (e.g. the
    built-in recipe's synthetic `image_size` after `data.kind=folder`), each with a `ConfigNote`;
    returns the dropped keys. Options no kind knows stay, so that the dataset names them as errors."""
    from ..data.build import DATASETS

    kinds = list(DATASETS) + ["multitask_synthetic", "broden"]
    own = dataset_options(config.data.kind)
    elsewhere = set().union(*(dataset_options(k) for k in kinds if k != config.data.kind))
    dropped = sorted(k for k in config.data.options if k not in own and k in elsewhere)
    for key in dropped:
        del config.data.options[key]
    if dropped:
        note(f"data.options {', '.join(dropped)}: not options of data.kind={config.data.kind}; dropped")
    return dropped


def check_training_config(config: Config) -> None:
    """Mistakes the types do not catch and that would otherwise be silently ignored."""
    if config.data.root and config.data.kind in ROOTLESS_KINDS:
        other = "broden" if config.train.task == "multitask" else "folder"
        raise UserError(f"data.root={config.data.root} is not read by data.kind={config.data.kind} (generated data); "
                        f"set the kind of your data too, e.g. data.kind={other}")


ELASTIC_RUN_FILE = "elastic_run_id"  # the rendezvous id of the torchrun job that writes the run folder


def restarted_by_torchrun(run_dir: Path) -> bool:
    """torchrun restarted this job's workers: a failure it counted, or a node leaving or joining, which
    it does not count in TORCHELASTIC_RESTART_COUNT; the job id recorded in the run folder tells that
    restart from a new job."""
    marker = run_dir / ELASTIC_RUN_FILE
    job = elastic_job()
    counted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return counted or (job is not None and marker.is_file() and marker.read_text().strip() == job)


def check_same_checkpoint(checkpoint: dict | None, resume_file: Path | None, info: DistInfo) -> None:
    """Every process must resume from the same iteration: the checkpoint folder is the only state
    the processes share, so it must be one folder (a shared filesystem) for every node."""
    iterations = all_gather_objects(checkpoint["iteration"] if checkpoint is not None else 0, info)
    if len(set(iterations)) > 1:
        raise UserError(f"the processes resume from different iterations {iterations} (this one: "
                        f"{resume_file}); put the run folder on a filesystem every node shares")


def resolve_run(config_path: str | None, overrides: list[str] | tuple[str, ...] = (), out: str | None = None,
                resume: str | None = None, resume_flag: bool = False,
                allow_changes: bool = False) -> tuple[Config, Path, Path | None]:
    """The config, run folder and checkpoint to resume from of `upernet train`; prints nothing.

    A new run: the recipe (default `builtin`) with the overrides, into `out` (default
    `runs/<recipe name>`), refused when that folder already holds checkpoints, unless torchrun
    restarted the workers (`--max-restarts`): then the run resumes from them. A resumed run
    (`resume_flag`; from `resume`, a file or run folder, else from `out`) keeps the config stored in
    its checkpoint; the `key=value` overrides change it (`train` logs the changes). A recipe given
    with `--resume` must agree with the stored config on every key the overrides do not set, unless
    `allow_changes`.

    Args:
        config_path: recipe file or built-in recipe name (None: builtin, or the stored config on resume).
        overrides: dotted `key=value` overrides.
        out: run folder.
        resume: checkpoint file or run folder to continue from (None: `out`).
        resume_flag: continue a run instead of starting one.
        allow_changes: with `resume_flag`, let a recipe that differs from the stored config replace it.

    Returns:
        (config, run folder, checkpoint file to resume from or None).
    """
    run_dir = Path(out) if out else None
    if not resume_flag:
        config = load_config(config_path, overrides)
        check_training_config(config)
        if run_dir is None:
            run_dir = Path("runs") / (Path(config_path).stem if config_path else "builtin")
        if any((run_dir / "checkpoints").glob("iter_*.pt")):
            if restarted_by_torchrun(run_dir):  # torchrun restarted the workers: continue the run
                return resolve_run(config_path, overrides, str(run_dir), None, True, allow_changes)
            raise UserError(f"{run_dir} already holds checkpoints; continue it with --resume, or pick another "
                            f"folder with --out")
        return config, run_dir, None

    source = Path(resume) if resume else run_dir
    if source is None:
        raise UserError("--resume needs a checkpoint path or --out RUN_DIR")
    resume_file = find_resume(source)
    stored = stored_config(load_checkpoint(resume_file), str(resume_file))
    base = stored
    if config_path is not None:
        recipe = load_config(config_path, overrides)
        keys = [parse_override(text)[0] for text in overrides]
        differing = [k for k in config_changes(stored, recipe)
                     if not any(k == key or k.startswith(key + ".") for key in keys)]
        if differing and not allow_changes:
            raise UserError(f"{config_path} differs from the config of the run being resumed ({resume_file}) in "
                            f"{', '.join(differing)}; resume without the recipe (the run keeps its config), set "
                            f"these keys as key=value overrides, or allow the recipe to replace the config")
        if allow_changes:
            base = load_config(config_path)
    config = config_from_dict(to_dict(base), overrides, source=str(resume_file))
    check_training_config(config)
    if run_dir is None:
        run_dir = resume_file.parent.parent if resume_file.parent.name == "checkpoints" else resume_file.parent
    return config, run_dir, resume_file


# ---- the loop -----------------------------------------------------------------------------------
def train(config: Config, run_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Train `config` into `run_dir`.

    Args:
        config: the resolved recipe (`train.task` says which task).
        run_dir: the run folder (created once the model and data are built).
        resume: a checkpoint file or a run folder whose newest checkpoint to continue from.
        stop_at: stop after this iteration with a checkpoint (for job time limits); `resume` continues.
        progress: show the progress bar (main process only).

    Returns:
        {"iteration", "loss", "best_mIoU" (best value of the task's best-checkpoint metric), "val"
        (last validation metrics), "run_dir", "is_main" (this process is rank 0: the one that prints),
        "config_changes" ({key: [old, new]} against the resumed checkpoint's config)}.
    """
    info = init_distributed(config.train.device)
    try:
        return train_run(config, Path(run_dir), resume, stop_at, progress, info)
    finally:
        cleanup()


def train_run(cfg: Config, run_dir: Path, resume, stop_at: int | None, progress: bool, info: DistInfo) -> dict:
    """The loop of `train` in an initialised process group."""
    from tqdm import tqdm

    device = info.device
    check_training_config(cfg)
    drop_foreign_options(cfg)
    task = build_task(cfg)
    resume_file = find_resume(resume) if resume is not None else None
    checkpoint = load_checkpoint(resume_file) if resume_file is not None else None
    check_same_checkpoint(checkpoint, resume_file, info)
    # Every RNG seeded with train.seed: all processes build the same initial weights.
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    task.build_data()
    model = task.build_model(pretrained=checkpoint is None).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = PolySchedule(optimizer, cfg.schedule)
    amp_dtype, use_scaler = amp_settings(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    torch.manual_seed(cfg.train.seed + info.rank)  # dropout / drop path differ between processes

    start, best, position, changes = 0, float("-inf"), None, {}
    if checkpoint is not None:
        load_state_dict_strict(model, checkpoint["model"], str(resume_file))
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        scaler.load_state_dict(checkpoint["scaler"])
        start, best, position = checkpoint["iteration"], checkpoint.get("best_mIoU", best), checkpoint["data"]
        if len(checkpoint["rng"]) == info.world_size:
            set_rng_state(checkpoint["rng"][info.rank])
        changes = config_changes(stored_config(checkpoint, str(resume_file)), cfg)

    # The model and data are built: now the run folder.
    created = not run_dir.exists()
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir / "checkpoints")
        write_text(run_dir / "config.yaml", dump_config(cfg))
        job = elastic_job()
        if job is not None:
            write_text(run_dir / ELASTIC_RUN_FILE, job + "\n")
    log = MetricsLog(run_dir, info.is_main, start)
    if changes:
        log.write({"kind": "config", "iter": start, "changes": changes})

    batches = task.batches(position, info.rank, info.world_size, pin_memory=device.type == "cuda")
    ddp = prepare_model(model, info, cfg.model.sync_bn, find_unused=task.find_unused)
    end = min(task.total_iters, stop_at) if stop_at else task.total_iters
    bar = tqdm(total=task.total_iters, initial=start, disable=not (progress and info.is_main),
               desc="train", unit="it", dynamic_ncols=True)
    last_saved = resume_file
    result = {"iteration": start, "loss": None, "best_mIoU": best, "val": None, "run_dir": str(run_dir),
              "is_main": info.is_main, "config_changes": changes}

    def state(iteration: int) -> dict:
        """Everything `resume` and `load_model` need, as plain tensors and containers (weights_only)."""
        return finite_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                             "iteration": iteration, "best_mIoU": best, "best_metric": task.best_metric,
                             "rng": all_gather_objects(rng_state(), info), "data": batches.position(),
                             "config": to_dict(cfg), "model_config": model.config, "meta": model.meta},
                            iteration, last_saved)

    try:
        set_train_mode(ddp, cfg.model.norm_eval)
        for iteration in range(start + 1, end + 1):
            steps_schedule = task.begin_iteration(iteration, model, optimizer)
            lr = max(g["lr"] for g in optimizer.param_groups)  # the head's lr (scale 1 under layer decay)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.optim.accumulate):
                batch = batches.next(iteration)
                last = micro == cfg.optim.accumulate - 1
                sync = contextlib.nullcontext() if last or not info.distributed else ddp.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, extra = task.loss(ddp, batch, device)
                    scaler.scale(loss / cfg.optim.accumulate).backward()
                loss_sum += loss.detach()
            context = f" (source {extra['source']})" if "source" in extra else ""
            loss_value = checked_step(loss_sum / cfg.optim.accumulate, iteration, last_saved, model, optimizer,
                                      scaler, cfg, info, context)
            if steps_schedule:
                schedule.step()
            created = False  # a run that trained an iteration keeps its folder, whatever comes next
            result.update(iteration=iteration, loss=loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if iteration % cfg.train.log_interval == 0 or iteration == end:
                log.write({"kind": "train", "iter": iteration, "loss": loss_value, "lr": lr, **batches.log(),
                           **extra, "time": time.time()})

            if (cfg.val.interval and iteration % cfg.val.interval == 0) or iteration == task.total_iters:
                sync_buffers(model, info)  # validate the weights that are saved
                summary = task.validate(model, info.distributed, amp_dtype)
                set_train_mode(ddp, cfg.model.norm_eval)
                result["val"] = summary
                log.write({"kind": "val", "iter": iteration, **summary})
                if info.is_main:
                    bar.write(f"iter {iteration}: " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
                value = summary.get(task.best_metric, float("nan"))
                if value > best:
                    best = result["best_mIoU"] = value
                    ckpt = state(iteration)
                    if info.is_main:
                        atomic_save(ckpt, run_dir / "checkpoints" / "best.pt")
                    barrier(info)

            if iteration % cfg.train.checkpoint_interval == 0 or iteration == end:
                ckpt = state(iteration)
                if info.is_main:
                    save_checkpoint(ckpt, run_dir, iteration, cfg.train.keep_last)
                last_saved = run_dir / "checkpoints" / f"iter_{iteration:07d}.pt"
                barrier(info)
    except BaseException:
        if created and info.is_main:  # failed before its first iteration: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
        log.close()

    if result["iteration"] == task.total_iters and info.is_main:  # the model card quotes recipe and last metrics
        save_model(model, run_dir / "model", recipe=to_dict(cfg), metrics=result["val"])
    barrier(info)
    return result
