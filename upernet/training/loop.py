"""The training loop: iteration-based, resumable, the same on one CPU or many GPUs.

    upernet train                                   # the built-in synthetic recipe (builtin)
    upernet train upernet_r50_ade20k_512x512_160k data.root=data/ade optim.lr=0.02 --out runs/r50
    upernet train --resume --out runs/r50           # continue from the newest checkpoint of the run
    torchrun --nproc_per_node 2 -m upernet.cli train builtin

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl` (train loss/lr, validation
metrics), `checkpoints/iter_<N>.pt` + `checkpoints/best.pt`, and at the end `model/` in our weight
format (`upernet.load_model`).

Data order and augmentations are a pure function of (seed, sample position): the sampler hands out
(index, seed) pairs and each sample is transformed under its own seed. A resumed run therefore
continues with exactly the batches the uninterrupted run would have seen, whatever the number of
DataLoader workers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..models import build_model
from ..models.weights import load_state_dict_strict
from .checkpoint import (atomic_save, find_resume, load_checkpoint, non_finite, rng_state, save_checkpoint,
                         set_rng_state)
from ..config import Config, config_from_dict, save_config, to_dict
from ..distributed import (DistInfo, all_gather_objects, all_reduce_mean, barrier, cleanup, init_distributed,
                          prepare_model)
from .optim import PolySchedule, build_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the iteration and the last good checkpoint."""


# ---- data order ---------------------------------------------------------------------------------
class InfiniteSampler(Sampler):
    """An endless stream of (index, sample seed), sharded over processes, starting at any position.

    Epoch `e` is a permutation drawn from `seed + e`; process `r` of `W` takes the permutation's
    positions r, r + W, ... (wrapping like DistributedSampler when the size is not a multiple of W).
    `start` counts the samples this process has already consumed.

    Args:
        size: number of samples in the dataset.
        seed: seed of the permutations and of the per-sample augmentation seeds.
        rank: this process's rank.
        world_size: number of processes.
        start: samples already consumed by this process (the recorded data position).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("the training dataset is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_epoch = math.ceil(size / world_size)

    def position(self, consumed: int) -> dict:
        """The data position after `consumed` samples of this process: epoch and index within it."""
        epoch, index = divmod(consumed, self.per_epoch)
        return {"samples_per_rank": consumed, "epoch": epoch, "index": index, "world_size": self.world_size}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        consumed, epoch, order = self.start, -1, None
        while True:
            e, i = divmod(consumed, self.per_epoch)
            if e != epoch:
                epoch, order = e, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + e))
            slot = i * self.world_size + self.rank  # position in the epoch's global order
            sample_seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + slot
            yield int(order[slot % self.size]), sample_seed % (2**63)
            consumed += 1


class SeededSamples(Dataset):
    """`dataset[index]` computed under the RNG seed handed out with the index; the caller's RNG states
    (torch, Python, NumPy) are left as they were."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_datasets(config: Config):
    """The training and validation datasets of the config, with their transforms."""
    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform, build_train_transform

    d = config.data
    train_tf = build_train_transform(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.flip_prob,
                                     d.photometric, d.mean, d.std)
    train_set = build_dataset(d.kind, d.root or None, d.train_split, train_tf, **d.options)
    val_set = build_dataset(d.kind, d.root or None, d.val_split, build_eval_transform(d.scale, d.mean, d.std),
                            **d.options)
    return train_set, val_set


# ---- model --------------------------------------------------------------------------------------
def build_training_model(config: Config, train_set, pretrained: bool = True) -> nn.Module:
    """The configured variant with `num_classes` and the meta (classes, palette, mean/std) of the data.

    With `pretrained`, the backbone starts from `model.backbone_checkpoint` if one is set.
    """
    args = dict(config.model.args)
    num_classes = len(train_set.classes)
    if args.setdefault("num_classes", num_classes) != num_classes:
        raise ValueError(f"model.args.num_classes={args['num_classes']} but the dataset has {num_classes} classes")
    model = build_model(config.model.name, **args)
    if pretrained and config.model.backbone_checkpoint:
        load_backbone_checkpoint(model.backbone, config.model.backbone_checkpoint)
    model.meta = {"class_names": list(train_set.classes), "palette": [list(c) for c in train_set.palette],
                  "mean": list(config.data.mean), "std": list(config.data.std),
                  "ignore_index": int(train_set.ignore_index)}
    return model


def load_backbone_checkpoint(backbone: nn.Module, path: str) -> None:
    """Backbone weights from `path`: InternImage's ImageNet layout for InternImage, else a state dict
    of the backbone (optionally under "state_dict"/"model" and with a "backbone." prefix). Read with
    weights_only=True; a layout that does not fit is an error naming the file and the keys."""
    from ..io import load_torch_file
    from ..models.backbones.internimage import InternImage, load_classification_checkpoint

    if isinstance(backbone, InternImage):
        load_classification_checkpoint(backbone, path)
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (model.backbone_checkpoint)")
    state = load_torch_file(path)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict of the backbone (model.backbone_checkpoint)")
    load_state_dict_strict(backbone, {k.removeprefix("backbone."): v for k, v in state.items()}, path)


def set_train_mode(model: nn.Module, norm_eval: bool) -> None:
    """`model.train()`, with BatchNorm layers left in eval mode when `norm_eval` is set."""
    model.train()
    if norm_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a GradScaler) for the configured precision on this device."""
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA; use train.precision=bf16 on CPU")
        return torch.float16, True
    return torch.bfloat16, False


# ---- logging ------------------------------------------------------------------------------------
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


# ---- the loop -----------------------------------------------------------------------------------
def train(config: Config, run_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Train `config` into `run_dir`; returns {"iteration", "loss", "best_mIoU", "val": last metrics}.

    Args:
        config: the resolved recipe.
        run_dir: the run folder (created).
        resume: a checkpoint file or a run folder whose newest checkpoint to continue from.
        stop_at: stop after this iteration with a checkpoint (for job time limits); `--resume` continues.
        progress: show the progress bar (main process only).
    """
    info = init_distributed(config.train.device)
    try:
        if config.data.kind in ("upp_builtin", "broden"):  # heterogeneous multi-task data: its own loop
            from .multitask import train_multitask

            return train_multitask(config, Path(run_dir), resume, stop_at, progress, info)
        return _train(config, Path(run_dir), resume, stop_at, progress, info)
    finally:
        cleanup()


def checked_step(loss: torch.Tensor, iteration: int, last_saved: Path | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler, cfg: Config, info: DistInfo, context: str = "") -> float:
    """The optimiser step after backward: a NaN/Inf loss on any process stops every process before
    the weights are touched; else clip (when configured) and step. Returns the mean loss."""
    loss_value = float(all_reduce_mean(loss, info))
    if not math.isfinite(loss_value):
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
        raise TrainingDiverged(f"the training loss is {loss_value} at iteration {iteration}{context}; stopped "
                               f"({where}). Lower optim.lr, enable optim.grad_clip, or use train.precision=fp32.")
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss_value


def start_run(cfg: Config, run_dir: Path, resume, info: DistInfo) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (file, content), the run folder with its config.yaml, and every
    RNG seeded with `train.seed`, so that all processes build the same initial weights."""
    resume_file = find_resume(resume) if resume is not None else None
    checkpoint = load_checkpoint(resume_file) if resume_file is not None else None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    return resume_file, checkpoint


def _train(config: Config, run_dir: Path, resume, stop_at: int | None, progress: bool, info: DistInfo) -> dict:
    from tqdm import tqdm

    from ..evaluation.evaluate import evaluate

    cfg, device = config, info.device
    resume_file, checkpoint = start_run(cfg, run_dir, resume, info)
    # Data, model, optimiser, schedule (seeded by start_run: the same initial weights on every process).
    train_set, val_set = build_datasets(cfg)
    model = build_training_model(cfg, train_set, pretrained=checkpoint is None).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = PolySchedule(optimizer, cfg.schedule)
    amp_dtype, use_scaler = _amp(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    torch.manual_seed(cfg.train.seed + info.rank)  # dropout / drop path differ between processes

    start, consumed, best_miou = 0, 0, float("-inf")
    if checkpoint is not None:
        load_state_dict_strict(model, checkpoint["model"], str(resume_file))
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        scaler.load_state_dict(checkpoint["scaler"])
        start, best_miou = checkpoint["iteration"], checkpoint["best_mIoU"]
        data = checkpoint["data"]  # the same global sample count, whatever the new number of processes
        consumed = data["samples_per_rank"] * data["world_size"] // info.world_size
        states = checkpoint["rng"]
        if len(states) == info.world_size:
            set_rng_state(states[info.rank])
    per_step = cfg.data.batch_size * cfg.optim.accumulate

    sampler = InfiniteSampler(len(train_set), cfg.train.seed, info.rank, info.world_size, start=consumed)
    loader = DataLoader(SeededSamples(train_set), batch_size=cfg.data.batch_size, sampler=sampler,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.data.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed))  # not the global RNG: resume
    batches = iter(loader)
    ddp = prepare_model(model, info, cfg.model.sync_bn)
    model = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
    if cfg.val.max_images:
        val_set = torch.utils.data.Subset(val_set, range(min(cfg.val.max_images, len(val_set))))

    log = MetricsLog(run_dir, info.is_main, start)
    end = min(cfg.schedule.iters, stop_at) if stop_at else cfg.schedule.iters
    bar = tqdm(total=cfg.schedule.iters, initial=start, disable=not (progress and info.is_main),
               desc="train", unit="it", dynamic_ncols=True)
    last_saved = resume_file
    result = {"iteration": start, "loss": None, "best_mIoU": best_miou, "val": None, "run_dir": str(run_dir)}

    def state(iteration: int) -> dict:
        """Everything `--resume` needs, as plain tensors and containers (torch.load(weights_only=True))."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "best_mIoU": best_miou,
                "rng": all_gather_objects(rng_state(), info), "data": sampler.position(consumed),
                "config": to_dict(cfg)}

    set_train_mode(ddp, cfg.model.norm_eval)
    for iteration in range(start + 1, end + 1):
        lr = max(g["lr"] for g in optimizer.param_groups)  # the head's lr (scale 1 under layer decay)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.optim.accumulate):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            last = micro == cfg.optim.accumulate - 1
            sync = contextlib.nullcontext() if last or not info.distributed else ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # the loss inside forward: no logits at image size are kept (UPerNet.forward)
                    loss = ddp(images, labels=labels, ignore_index=train_set.ignore_index,
                               average=cfg.train.loss_average)["loss"]
                scaler.scale(loss / cfg.optim.accumulate).backward()
            loss_sum += loss.detach()
        consumed += per_step

        loss_value = checked_step(loss_sum / cfg.optim.accumulate, iteration, last_saved, model, optimizer, scaler,
                                  cfg, info)
        schedule.step()
        result.update(iteration=iteration, loss=loss_value)

        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if iteration % cfg.train.log_interval == 0 or iteration == end:
            log.write({"kind": "train", "iter": iteration, "loss": loss_value, "lr": lr,
                       "epoch": sampler.position(consumed)["epoch"], "time": time.time()})

        if (cfg.val.interval and iteration % cfg.val.interval == 0) or iteration == cfg.schedule.iters:
            metrics = evaluate(model, val_set, mode=cfg.val.mode, crop_size=cfg.val.crop_size, stride=cfg.val.stride,
                               distributed=info.distributed, autocast_dtype=amp_dtype, progress=False)
            set_train_mode(ddp, cfg.model.norm_eval)
            summary = {k: float(metrics[k]) for k in ("aAcc", "mIoU", "mAcc")}
            result["val"] = summary
            log.write({"kind": "val", "iter": iteration, **summary})
            if info.is_main:
                bar.write(f"iter {iteration}: " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
            if summary["mIoU"] > best_miou:
                best_miou = result["best_mIoU"] = summary["mIoU"]
                ckpt = _finite_state(state(iteration), iteration, last_saved)
                if info.is_main:
                    atomic_save(ckpt, run_dir / "checkpoints" / "best.pt")

        if iteration % cfg.train.checkpoint_interval == 0 or iteration == end:
            ckpt = _finite_state(state(iteration), iteration, last_saved)
            if info.is_main:
                save_checkpoint(ckpt, run_dir, iteration, cfg.train.keep_last)
            last_saved = run_dir / "checkpoints" / f"iter_{iteration:07d}.pt"
            barrier(info)
    bar.close()
    log.close()

    if result["iteration"] == cfg.schedule.iters and info.is_main:
        model.save(run_dir / "model")
    return result


def _finite_state(ckpt: dict, iteration: int, last_saved: Path | None) -> dict:
    """`ckpt` unchanged, or TrainingDiverged when a weight is NaN/Inf (checked on every process, so
    all of them stop together and no NaN checkpoint is ever written)."""
    bad = non_finite(ckpt["model"])
    if bad:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite weights after iteration {iteration} ({', '.join(bad[:5])}); not saving "
                               f"them; stopped ({where})")
    return ckpt


def train_from_cli(config_path: str | None, overrides: list[str], out: str | None, resume: str | None,
                   resume_flag: bool, stop_at: int | None) -> dict:
    """`upernet train`: resolve the config (a resumed run starts from its checkpoint's config)."""
    from ..config import load_config

    run_dir = Path(out) if out else None
    if resume_flag:
        source = Path(resume) if resume else run_dir
        if source is None:
            raise ValueError("--resume needs a checkpoint path or --out RUN_DIR")
        resume_file = find_resume(source)
        if config_path is None:
            config = config_from_dict(load_checkpoint(resume_file)["config"], overrides, source=str(resume_file))
        else:
            config = load_config(config_path, overrides)
        if run_dir is None:
            run_dir = resume_file.parent.parent if resume_file.parent.name == "checkpoints" else resume_file.parent
        return train(config, run_dir, resume=resume_file, stop_at=stop_at)
    config = load_config(config_path, overrides)
    if run_dir is None:
        run_dir = Path("runs") / (Path(config_path).stem if config_path else "builtin")
    if any((run_dir / "checkpoints").glob("iter_*.pt")):
        raise ValueError(f"{run_dir} already holds checkpoints; continue it with --resume, or pick another "
                         f"folder with --out")
    return train(config, run_dir, stop_at=stop_at)
