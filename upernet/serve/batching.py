"""One inference thread behind a bounded queue: requests wait their turn, same-size images share a forward.

The web server decodes each upload in its thread pool (PIL or tifffile, no torch) and hands the picture to
`BatchWorker.submit`. The worker takes what is queued (up to `max_batch`), pre-processes it (resize,
normalise: torch work stays in this one thread, since torch calls from several threads at once fight
over the same cores), groups the images whose original and inference sizes agree, and runs one forward pass per group through the segmenter's
prepared model (`Segmenter.runner`, with `Segmenter.options()`), so that a batch gives the same
labels as one image at a time. A full queue refuses at once (`QueueFull`) rather than letting
latency grow without bound.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..inference.modes import infer_outputs
from ..inference.probabilities import predicted_classes
from ..inference.segmenter import Segmentation, Segmenter, display_picture


class QueueFull(RuntimeError):
    """Every place in the queue is taken: the caller should answer 503 and let the client retry."""


@dataclass
class Job:
    """One decoded image, the future its result goes to, and once `BatchWorker.prepare`d its tensors."""

    picture: Image.Image | np.ndarray  # (H, W, C) bands, C = the model's in_channels
    result: Future = field(default_factory=Future)
    original: torch.Tensor | None = None  # uint8 (C, H, W)
    image: torch.Tensor | None = None  # normalised float (1, C, h, w) at the inference size

    @property
    def key(self) -> tuple:
        """Images with the same key can share a forward pass."""
        return tuple(self.original.shape), tuple(self.image.shape)


class BatchWorker:
    """A daemon thread that segments queued images, several of the same size per forward pass.

    Args:
        segmenter: the model and its test-time protocol.
        max_queue: images waiting at most; `submit` raises `QueueFull` beyond.
        max_batch: images per forward pass at most.
    """

    def __init__(self, segmenter: Segmenter, max_queue: int = 16, max_batch: int = 4):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be at least 1, got {max_queue} and {max_batch}")
        self.segmenter = segmenter
        self.max_batch = max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.batch_sizes: Counter[int] = Counter()  # forward passes by images per pass (tests, load benchmark)
        self.thread = threading.Thread(target=self.run, name="upernet-serve-batches", daemon=True)
        self.thread.start()

    def submit(self, picture: Image.Image | np.ndarray) -> Future:
        """Queue one decoded image (the model's in_channels bands); its `Segmentation` (or exception)
        arrives in the future."""
        job = Job(picture)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.jobs.maxsize} images are already waiting") from None
        return job.result

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        self.jobs.put(None)
        self.thread.join(timeout)

    def run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in filter(self.prepare, batch):
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self.run_group(group)
            if stop:
                return

    def prepare(self, job: Job) -> bool:
        """Pre-process a job's picture; False (its future settled) if it was cancelled or failed."""
        if not job.result.set_running_or_notify_cancel():
            return False
        try:
            job.original, job.image = self.segmenter.preprocessor(job.picture)
        except BaseException as e:  # noqa: BLE001 - the error belongs to the request, not to this thread
            job.result.set_exception(e)
            return False
        return True

    def run_group(self, group: list[Job]) -> None:
        """Segment prepared images of one size: one forward pass when the batch fits, else one by one."""
        try:
            results = self.segment_together(group)
        except BaseException as e:  # noqa: BLE001 - the error belongs to the requests, not to this thread
            for job in group:
                job.result.set_exception(e)
            return
        for job, result in zip(group, results):
            job.result.set_result(result)

    @torch.no_grad()
    def segment_together(self, jobs: list[Job]) -> list[Segmentation]:
        seg = self.segmenter
        size = tuple(jobs[0].original.shape[-2:])
        num_classes = 0 if seg.multitask else predicted_classes(seg.model)  # a sigmoid model: 2
        fits = num_classes * size[0] * size[1] * len(jobs) <= seg.max_full_size
        if len(jobs) == 1 or seg.multitask or not fits or not isinstance(seg.model, nn.Module):  # ONNX: as exported
            self.batch_sizes[1] += len(jobs)
            return [seg.segment(job.original, job.image) for job in jobs]
        self.batch_sizes[len(jobs)] += 1
        x = torch.cat([job.image for job in jobs]).to(seg.device)
        probs = infer_outputs(seg.runner, x, out_size=size, **seg.options())["out"]
        labels = probs.argmax(dim=1).cpu().numpy()
        names, palette = list(seg.class_names), [list(c) for c in seg.meta["palette"]]
        return [Segmentation(labels[i], names, palette, display_picture(job.original))
                for i, job in enumerate(jobs)]
