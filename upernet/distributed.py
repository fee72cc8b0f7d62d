"""Process-group helpers: the same training command runs alone or under `torchrun`.

    torchrun --nproc_per_node 2 -m upernet.cli train builtin

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs in one process.
CPU processes talk through gloo, CUDA ones through NCCL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass
class DistInfo:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use train.device=cpu or auto)")
    return torch.device(device)


def elastic_job() -> str | None:
    """The rendezvous id (`--rdzv-id`) of the torchrun job of this process; None outside torchrun or
    for torchrun's default id, which does not tell one job from another."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def restarts_reuse_the_rendezvous_store() -> bool:
    """torchrun may restart the workers (`--max-restarts`) while they meet in the rendezvous store its
    agents keep for the whole job. Restarted workers then find the dead workers' addresses still in
    that store, try them, and fail again or hang (pytorch/pytorch#135712);
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every restart a new store."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that `torchrun` describes in the environment (if any)."""
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model: nn.Module, info: DistInfo, sync_bn: bool, find_unused: bool = False) -> nn.Module:
    """Move to the device; with several processes wrap in DDP (SyncBatchNorm on CUDA only: gloo
    cannot run it, so CPU processes keep per-process BatchNorm statistics). `find_unused` for models
    whose steps use only some parameters (the multi-task model trains only the annotated heads)."""
    model.to(info.device)
    if not info.distributed:
        return model
    if sync_bn and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over processes (itself when alone)."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every process's `obj`, in rank order (a one-element list when alone)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
