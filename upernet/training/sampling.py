"""Data order: which sample each process trains on, under which seed, and batches that fail like
the dataset does.

Data order and augmentations are a pure function of (seed, sample position): the sampler hands out
(index, seed) pairs and each sample is transformed under its own seed. A resumed run therefore
continues with exactly the batches the uninterrupted run would have seen, whatever the number of
DataLoader workers.
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError


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
            raise UserError("the training dataset is empty")
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


def seeded_loader(dataset: Dataset, sampler: InfiniteSampler, batch_size: int, workers: int, seed: int,
                  pin_memory: bool = False, collate_fn: Callable | None = None) -> Iterator[dict]:
    """Batches of `dataset` in the sampler's order, each sample under its own seed; a dataset error
    raised in a worker process reads as it does without workers (`worker_errors_as_raised`)."""
    loader = DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
                        collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(seed))  # not the global RNG: exact resume
    return worker_errors_as_raised(iter(loader))


def worker_errors_as_raised(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, but an exception re-raised by DataLoader from a worker ("Caught ValueError in
    DataLoader worker process 0. Original Traceback ...") becomes the exception the dataset raised:
    same type, its own message, no worker traceback."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            original = original_message(e)
            if original is None:
                raise
            try:
                replacement = type(e)(original)
            except Exception:  # an exception type that does not take one message
                raise e from None
            raise replacement from None
        yield batch


def original_message(error: BaseException) -> str | None:
    """The message of the exception a DataLoader worker raised, read from the re-raised one's text
    (None when `error` does not come from a worker)."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    name = type(error).__name__
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = re.match(rf"(?:[\w.]+\.)?{re.escape(name)}: ?(.*)", lines[i])
        if match:
            return "\n".join([match.group(1), *lines[i + 1:]]).strip()
    return None
