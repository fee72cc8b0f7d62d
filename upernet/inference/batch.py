"""Batch prediction on Ray Data: many images, several processes or machines, resumable.

    upernet predict images/ --model runs/r50 --out preds --engine ray --actors 4 --batch-size 8
    upernet predict list.txt --model runs/r50 --out preds --engine ray --address ray://head:10001

The pipeline is Ray's, not ours: a dataset of (source, output stem) rows, decoded and pre-processed
in CPU tasks (`map`), segmented by a pool of actors that each load the model once (`map_batches`
with a callable class, `num_gpus` per actor when the cluster has GPUs), each image written by the
same per-image writer as single-process `predict` (`predict.write_prediction`), so the files are
the same bytes. Ray must see `out_dir` at the same path on every node (a shared filesystem).

Resumable and idempotent: every output is written atomically, and `out_dir/manifest.jsonl` gets
one row per image after all its outputs exist: {"source", "stem", "outputs", "height", "width",
"classes", "error", "finished" (Unix time)}. A rerun skips the images whose last row has no error and whose outputs all
exist; a bad image gets a row with its error and does not stop the job (a rerun tries it again).
A full disk does stop it (a UserError), with no partial file left under an output's name.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MissingFile, UserError
from .modes import IMAGE_SUFFIXES, find_images
from .predict import output_stems, write_prediction
from .segmenter import Preprocessor, Segmenter, load_source

MANIFEST = "manifest.jsonl"
DISK_FULL = "disk full"


@dataclass
class BatchResult:
    """What a Ray batch prediction did: rows written now, images skipped as already done, failures."""

    out_dir: Path
    manifest: Path
    written: list[str] = field(default_factory=list)  # sources segmented by this run
    skipped: list[str] = field(default_factory=list)  # sources a previous run had completed
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, error)


# ---- inputs -------------------------------------------------------------------------------------
def is_uri(text: str) -> bool:
    return "://" in text


def list_sources(inputs: Sequence[str | os.PathLike], out_dir: Path) -> list[tuple[str, Path]]:
    """(source, output stem) per image of `inputs`: image files, folders (recursive), list files
    (`.txt`/`.lst`, one path or URI a line) and URIs pyarrow's filesystems read (s3://, gs://, file://).
    Local files keep `predict`'s output names (sub-folders mirrored); a URI's output is its file stem."""
    local: list[str | Path] = []
    uris: list[str] = []
    for item in map(str, inputs):
        if is_uri(item):
            uris.append(item)
        elif item.endswith((".txt", ".lst")) and Path(item).suffix.lower() not in IMAGE_SUFFIXES:
            path = Path(item)
            if not path.is_file():
                raise MissingFile(f"{path}: no such list file")
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    (uris if is_uri(line) else local).append(line)
        else:
            local.append(item)
    files = find_images(local) if local else []
    sources = [(str(f), stem) for (f, _), stem in zip(files, output_stems(files, out_dir))]
    taken = {stem for _, stem in sources}
    for uri in uris:
        stem, n = out_dir / Path(uri.split("://", 1)[1]).stem, 1
        candidate = stem
        while candidate in taken:
            n += 1
            candidate = stem.with_name(f"{stem.name}-{n}")
        taken.add(candidate)
        sources.append((uri, candidate))
    return sources


def read_source(source: str) -> str | bytes:
    """What `Preprocessor` decodes: a local path as it is, a URI's bytes read through pyarrow (decoded
    by `data.datasets.read_image` like a file: any band count, TIFFs, EXIF orientation)."""
    if not is_uri(source):
        return source
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(source)
    with filesystem.open_input_file(path) as f:
        return f.read()


# ---- the manifest -------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, dict]:
    """The last row per source; a line cut short by a killed run is ignored."""
    rows: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "source" in row:
                rows[row["source"]] = row
    return rows


def is_complete(row: dict | None) -> bool:
    """A manifest row of an image done: no error and every output file still there."""
    return bool(row) and not row.get("error") and all(Path(p).is_file() for p in row.get("outputs", []))


class Manifest:
    """Appends rows to manifest.jsonl, one flushed and fsynced line each (after the outputs exist)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a+b")
        self.file.seek(0, os.SEEK_END)
        if self.file.tell():  # a run killed mid-line left no newline: start a fresh line
            self.file.seek(-1, os.SEEK_END)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")

    def write(self, row: dict) -> None:
        self.file.write((json.dumps(row) + "\n").encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ---- the Ray stages -----------------------------------------------------------------------------
def decode_row(row: dict, preprocessor: Preprocessor) -> dict:
    """CPU task: decode and pre-process one image; a read error becomes the row's `error`."""
    out = {"source": row["source"], "stem": row["stem"], "error": "", "original": b"", "original_shape": [0, 0, 0],
           "image": b"", "image_shape": [0, 0, 0, 0]}
    try:
        original, image = preprocessor(read_source(row["source"]))
    except (OSError, ValueError) as e:  # UserError is a ValueError; a missing file an OSError
        out["error"] = str(e)
        return out
    out.update(original=original.numpy().tobytes(), original_shape=list(original.shape),
               image=image.numpy().tobytes(), image_shape=list(image.shape))
    return out


class SegmentActor:
    """Ray actor: loads the model once, then segments and writes each batch of decoded images."""

    def __init__(self, model: Any, options: dict, save_probs: bool, legend: bool):
        import ray

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        options = dict(options)
        torch.set_num_threads(int(options.pop("threads", 0)) or torch.get_num_threads())
        self.segmenter = Segmenter(model, **options)
        self.save_probs, self.legend = save_probs, legend

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for i in range(len(batch["source"])):
            row = {"source": str(batch["source"][i]), "stem": str(batch["stem"][i]), "outputs": [], "height": None,
                   "width": None, "classes": None, "error": str(batch["error"][i]) or None}
            if row["error"] is None:
                shape = [int(n) for n in batch["original_shape"][i]]
                original = torch.frombuffer(bytearray(batch["original"][i]), dtype=torch.uint8).view(shape)
                image = torch.frombuffer(bytearray(batch["image"][i]), dtype=torch.float32).view(
                    [int(n) for n in batch["image_shape"][i]])
                row["height"], row["width"] = shape[1], shape[2]
                try:
                    written, classes = write_prediction(self.segmenter, original, image, Path(row["stem"]),
                                                        self.save_probs, self.legend)
                    row["outputs"], row["classes"] = [str(p) for p in written], classes
                except OSError as e:
                    full = e.errno in (errno.ENOSPC, errno.EDQUOT)  # the driver stops the job on this one
                    row["error"] = f"{DISK_FULL}: {e}" if full else f"{type(e).__name__}: {e}"
                except (RuntimeError, ValueError) as e:  # out of memory, a model error: this image only
                    row["error"] = f"{type(e).__name__}: {e}"
            rows.append(json.dumps(row))
        return {"row": rows}


def reachable(address: str, timeout: float = 10.0) -> None:
    """UserError unless a TCP connection to `address` (HOST:PORT or ray://HOST:PORT) opens."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({e.strerror or e}); start one "
                        f"with `ray start --head`, or leave --address out for a local one") from None


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: the one this process already joined, else a new local
    one); returns whether we started Ray here (and so shut it down). Unreachable: a UserError."""
    import ray

    if ray.is_initialized():
        return False
    if address and address != "auto":  # Ray itself retries an unreachable head for minutes
        reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False,
                 logging_level="ERROR")
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({first}); start one with "
                        f"`ray start --head` or leave --address out for a local one") from None
    return True


def record_rows(rows: Iterable[str], manifest: Manifest, result: BatchResult) -> None:
    """The driver's side of the job: each actor row (JSON) into the manifest as it arrives, then into
    `result`. A full disk stops the job with one line (every later image would fail the same way);
    its image stays incomplete in the manifest, so the rerun the line asks for redoes it."""
    for text in rows:
        row = {**json.loads(text), "finished": round(time.time(), 3)}
        try:
            manifest.write(row)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"{manifest.path}: cannot record {row['source']}, the disk is full; free some space "
                            f"and run the same command again (done images are skipped)") from None
        if row["error"]:
            result.failures.append((row["source"], row["error"]))
            if row["error"].startswith(DISK_FULL):
                raise UserError(f"{row['stem']}: cannot write the outputs, the disk is full; free some "
                                f"space and run the same command again (done images are skipped)")
        else:
            result.written.append(row["source"])


def predict_ray(
    model: str | os.PathLike | nn.Module,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    address: str | None = None,
    actors: int = 1,
    batch_size: int = 1,
    save_probs: bool = False,
    legend: bool = True,
    gpus_per_actor: float | None = None,
    threads_per_actor: int = 1,
    progress: bool = True,
    **segmenter_options: Any,
) -> BatchResult:
    """Segment `inputs` on a Ray cluster into `out_dir`, with the files of single-process `predict`.

    Args:
        model: a path or registered name (each actor loads it) or a module (shipped to the actors).
        inputs: image files, folders, list files (one path or URI a line) and URIs.
        out_dir: output folder, on a filesystem every node sees; holds `manifest.jsonl`.
        address: the Ray cluster ("auto", "HOST:PORT", "ray://HOST:10001"); None: the one this
            process already joined, else a new local one.
        actors: model actors (each loads the model once).
        batch_size: images per actor call.
        save_probs: also write `<stem>_probs.npy`.
        legend: draw the class legend beside the overlays.
        gpus_per_actor: GPUs each actor takes; None: 1 when the cluster has GPUs, else 0.
        threads_per_actor: torch threads in each actor (and the CPUs it reserves; a cluster needs
            `actors * threads_per_actor` CPUs plus some for the decoding tasks).
        progress: show Ray's progress bars.
        **segmenter_options: `Segmenter` options (device, precision, mode, size, crop_size, stride,
            scales, flip, max_full_size).
    """
    import ray

    if actors < 1 or batch_size < 1:
        raise UserError(f"--actors {actors} --batch-size {batch_size}: both must be at least 1")
    out_dir = Path(out_dir).resolve()
    sources = list_sources(inputs, out_dir)
    manifest_path = out_dir / MANIFEST
    done = read_manifest(manifest_path)
    result = BatchResult(out_dir, manifest_path)
    pending = []
    for source, stem in sources:
        if is_complete(done.get(source)):
            result.skipped.append(source)
        else:
            pending.append({"source": source, "stem": str(stem)})
    if not pending:
        return result

    # The driver reads the model once: its test-time protocol (resize rule, normalisation) for the
    # decoders, and the weights the actors get through Ray's object store (no node reads the file again).
    options = {k: v for k, v in segmenter_options.items() if v is not None}
    model_source = model
    model = load_source(model)
    preprocessor = Segmenter(model, **{**options, "device": "cpu", "precision": "fp32"}).preprocessor
    started = connect(address)
    manifest = Manifest(manifest_path)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < actors * threads_per_actor + 0.5:  # else Ray waits for resources that never come
            raise UserError(f"--actors {actors}: the Ray cluster has {cpus:g} CPUs, and {actors} actor(s) of "
                            f"{threads_per_actor} CPU plus the decoding tasks need at least "
                            f"{actors * threads_per_actor + 0.5:g}; use fewer actors or a larger cluster")
        if gpus_per_actor is None:
            gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        model_arg = ray.put(model) if isinstance(model, nn.Module) else str(model_source)  # ONNX: by path
        data = ray.data.from_items(pending, override_num_blocks=min(len(pending), 4 * actors * batch_size))
        # Half a CPU per decoding task (a different resource request from the actors' also keeps Ray
        # from fusing decoding into the model actors): decoding overlaps the forward passes.
        decoded = data.map(decode_row, fn_kwargs={"preprocessor": preprocessor}, num_cpus=0.5)
        segmented = decoded.map_batches(
            SegmentActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor, num_cpus=threads_per_actor,
            fn_constructor_kwargs={"model": model_arg, "options": {**options, "threads": threads_per_actor},
                                   "save_probs": save_probs, "legend": legend})
        batches = segmented.iter_batches(batch_size=None, batch_format="numpy")
        record_rows((text for batch in batches for text in batch["row"]), manifest, result)
    finally:
        manifest.close()
        if started:
            ray.shutdown()
    return result
