"""`upernet bench`: latency, throughput, achieved GFLOP/s and peak memory, ours beside a peer.

The peers and how to run them are in `peers.py`; this module only measures.

Every implementation runs in this one process on the same weights; after one warm-up call each,
the runs are interleaved (ours, peer, ours, peer, ...) so that load from other processes hits all
of them alike, and each row reports the median. FLOPs are `count_macs` x 2 of our model (the
published convention: convolutions and matmuls only), the same number for every row.

Peak memory: the growth of the process's resident set (Linux `VmHWM`, reset through
/proc/self/clear_refs before the measured call, after glibc's `malloc_trim` has returned freed
memory) above what was resident when the call began: the activations, workspaces and, for a
training step, the gradients. It is None where the kernel does not offer the reset.
"""
from __future__ import annotations

import copy
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..ops.scratch import release_freed_memory
from ..models.stats import count_macs
from ..models.upernet import UPerNet
from .peers import peer_logits, peer_loss
from .prepare import cpu_flags, native_bf16, prepare_for_inference


# ---- machine ---------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, visible cores, torch threads and versions: what a number needs beside it."""
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    flags = cpu_flags()
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}), "load_avg": os.getloadavg()[0]}


def measure_peak(dtype: torch.dtype, runs: int = 3) -> float:
    """GFLOP/s of a 256->256 3x3 conv on a 128x128 channels_last map: this machine's practical peak."""
    x = torch.randn(1, 256, 128, 128).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * 128 * 128 * 256 * 256 * 9
    best = float("inf")
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=1)
        for _ in range(runs):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


# ---- measuring -------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak resident-memory growth (MB) during `fn()`; None where the peak cannot be reset."""
    try:
        release_freed_memory()  # reuse of earlier calls' memory is not free
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _rss_kib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Median wall and process-CPU seconds of each function, the runs interleaved across functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: {"latency_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k]), "runs": wall[k]}
            for k in fns}


# ---- inference ---------------------------------------------------------------------------------
def bench_inference(
    model: UPerNet,
    shape: tuple[int, int] = (512, 512),
    batch: int = 1,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    peer: nn.Module | None = None,
    peer_name: str = "transformers",
    runs: int = 5,
    onnx: bool = False,
    compile: bool = False,
) -> dict:
    """Time our fast path in each dtype (and the peer's fp32 / bf16 variants, onnxruntime) at `shape`.

    Args:
        model: our model (float32, eval mode).
        shape: input (H, W).
        batch: images per call.
        dtypes: our dtypes to run ("fp32", "bf16").
        peer: the peer model on the same weights, or None.
        peer_name: how the peer is named in the rows.
        runs: timed runs per row after one warm-up.
        onnx: also export our fp32 model to ONNX and time it in onnxruntime.
        compile: also time `torch.compile` of our model in the first dtype (and report compile time).

    Returns:
        {"machine", "model_gflop", "peak_gflops", "rows": [...], "ratios": {...}}.
    """
    model = model.eval()
    images = torch.randn(batch, 3, *shape)
    flops = 2 * count_macs(model, shape, batch)
    fns: dict[str, Callable[[], object]] = {}
    meta: dict[str, dict] = {}
    for dtype in dtypes:
        fast = prepare_for_inference(model, dtype)
        fns[f"upernet {dtype}"] = lambda fast=fast: fast(images)
        meta[f"upernet {dtype}"] = {"impl": "upernet", "dtype": dtype}
    if compile:
        compiled = prepare_for_inference(model, dtypes[0], compile=True)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(images)
        name = f"upernet {dtypes[0]} compiled"
        fns[name] = lambda: compiled(images)
        meta[name] = {"impl": "upernet", "dtype": dtypes[0], "compile_s": time.perf_counter() - start}
    if peer is not None:
        peer = peer.eval()
        fns[f"{peer_name} fp32"] = lambda: peer_logits(peer, images)
        meta[f"{peer_name} fp32"] = {"impl": peer_name, "dtype": "fp32"}
        if "bf16" in dtypes:
            def autocast():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return peer_logits(peer, images)
            fns[f"{peer_name} bf16 autocast"] = autocast
            meta[f"{peer_name} bf16 autocast"] = {"impl": peer_name, "dtype": "bf16"}
            peer_bf16 = copy.deepcopy(peer).to(torch.bfloat16).to(memory_format=torch.channels_last)
            images_bf16 = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            fns[f"{peer_name} bf16 channels_last"] = lambda: peer_logits(peer_bf16, images_bf16)
            meta[f"{peer_name} bf16 channels_last"] = {"impl": peer_name, "dtype": "bf16"}
    if onnx:
        from .export import export_onnx, onnx_session

        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, Path(folder) / "model.onnx", shape=shape, dynamic=True)
            session = onnx_session(path)
        feed = {session.get_inputs()[0].name: images.numpy()}
        fns["onnxruntime fp32"] = lambda: session.run(None, feed)
        meta["onnxruntime fp32"] = {"impl": "onnxruntime", "dtype": "fp32"}

    with torch.inference_mode():
        timings = interleaved(fns, runs)
        memory = {name: peak_memory_mb(fn) for name, fn in fns.items()}
    if "onnxruntime fp32" in memory:  # its arena keeps what the warm-up allocated: RSS growth says nothing
        memory["onnxruntime fp32"] = None
    peaks = {d: measure_peak(torch.bfloat16 if d == "bf16" else torch.float32) for d in {m["dtype"] for m in meta.values()}}
    rows = []
    for name, t in timings.items():
        gflops = flops / t["latency_s"] / 1e9
        rows.append({"name": name, **meta[name], "latency_s": t["latency_s"], "cpu_s": t["cpu_s"],
                     "images_per_s": batch / t["latency_s"], "gflops": gflops,
                     "peak_fraction": gflops / peaks[meta[name]["dtype"]], "memory_mb": memory[name],
                     "runs_s": t["runs"]})
    return {"machine": machine_info(), "shape": list(shape), "batch": batch, "model_gflop": flops / 1e9,
            "peak_gflops": peaks, "rows": rows, "ratios": _ratios(rows, peer_name)}


def _ratios(rows: list[dict], peer_name: str) -> dict[str, float]:
    """ours / peer latency for the comparisons the targets name (wall-clock and CPU-time medians)."""
    by = {r["name"]: r for r in rows}
    peer_bf16 = [by[n] for n in (f"{peer_name} bf16 autocast", f"{peer_name} bf16 channels_last") if n in by]
    pairs = {}
    if f"{peer_name} fp32" in by:
        for ours in ("fp32", "bf16"):
            if f"upernet {ours}" in by:
                pairs[f"upernet {ours} / {peer_name} fp32"] = (by[f"upernet {ours}"], by[f"{peer_name} fp32"])
    if peer_bf16 and "upernet bf16" in by:
        best = min(peer_bf16, key=lambda r: r["latency_s"])
        pairs[f"upernet bf16 / {peer_name} best bf16"] = (by["upernet bf16"], best)
    if "onnxruntime fp32" in by and f"{peer_name} fp32" in by:
        pairs[f"onnxruntime fp32 / {peer_name} fp32"] = (by["onnxruntime fp32"], by[f"{peer_name} fp32"])
    ratios = {}
    for key, (a, b) in pairs.items():
        ratios[key] = a["latency_s"] / b["latency_s"]
        ratios[key + " (cpu time)"] = a["cpu_s"] / b["cpu_s"]
        if a["memory_mb"] and b["memory_mb"]:
            ratios[key + " (memory)"] = a["memory_mb"] / b["memory_mb"]
    return ratios


# ---- training ----------------------------------------------------------------------------------
def bench_train(
    model: UPerNet,
    shape: tuple[int, int] = (512, 512),
    batch: int = 2,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    peer: nn.Module | None = None,
    peer_name: str = "transformers",
    runs: int = 3,
    checkpointing: bool = False,
) -> dict:
    """Time one optimiser step (forward, loss, backward, AdamW) of ours and the peer, per dtype.

    bf16 is autocast (weights and optimiser in float32), the usual mixed precision on CPUs and GPUs.

    Args:
        model: our model (its weights are updated).
        shape: crop (H, W).
        batch: images per step.
        dtypes: "fp32" and/or "bf16".
        peer: the peer model on the same weights, or None.
        peer_name: how the peer is named in the rows.
        runs: timed steps per row after one warm-up step.
        checkpointing: also time ours with activation checkpointing of the backbone stages.

    Returns:
        {"machine", "model_gflop", "rows": [...], "ratios": {...}}.
    """
    images = torch.randn(batch, 3, *shape)
    labels = torch.randint(0, model.num_classes, (batch, *shape))
    flops = 3 * 2 * count_macs(model, shape, batch)  # backward ~ 2x forward

    def step_fn(module: nn.Module, loss_of: Callable[[], torch.Tensor], dtype: str) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    fns, meta = {}, {}
    variants = [(model, False)]
    if checkpointing:
        variants.append((copy.deepcopy(model), True))
    for dtype in dtypes:
        for ours, ckpt in variants:
            ours.train()
            ours.set_grad_checkpointing(ckpt)
            name = f"upernet {dtype}" + (" checkpointing" if ckpt else "")
            fns[name] = step_fn(ours, lambda ours=ours: ours(images, labels=labels)["loss"], dtype)  # as train runs
            meta[name] = {"impl": "upernet", "dtype": dtype}
        if peer is not None:
            peer.train()
            name = f"{peer_name} {dtype}"
            fns[name] = step_fn(peer, lambda: peer_loss(peer, images, labels), dtype)
            meta[name] = {"impl": peer_name, "dtype": dtype}
    timings = interleaved(fns, runs)
    memory = {name: peak_memory_mb(fn) for name, fn in fns.items()}
    rows = [{"name": n, **meta[n], "latency_s": t["latency_s"], "cpu_s": t["cpu_s"],
             "images_per_s": batch / t["latency_s"], "gflops": flops / t["latency_s"] / 1e9,
             "memory_mb": memory[n], "runs_s": t["runs"]} for n, t in timings.items()]
    ratios = {}
    by = {r["name"]: r for r in rows}
    for name, row in by.items():
        other = by.get(f"{peer_name} {row['dtype']}")
        if row["impl"] == "upernet" and other:
            ratios[f"{name} / {other['name']}"] = row["latency_s"] / other["latency_s"]
            if row["memory_mb"] and other["memory_mb"]:
                ratios[f"{name} / {other['name']} (memory)"] = row["memory_mb"] / other["memory_mb"]
    return {"machine": machine_info(), "shape": list(shape), "batch": batch, "train_step_gflop": flops / 1e9,
            "rows": rows, "ratios": ratios}


# ---- report ------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """A plain-text table of the rows and the ratios."""
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
             f"bf16 flags {m['bf16_flags'] or 'none'}, load average {m['load_avg']:.1f}",
             f"input: batch {result['batch']} x {result['shape'][0]}x{result['shape'][1]}"]
    if "model_gflop" in result:
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_gflops"].items())
        lines.append(f"model: {result['model_gflop']:.1f} GFLOP per call; measured 3x3-conv peak GFLOP/s: {peaks}")
    else:
        lines.append(f"train step: ~{result['train_step_gflop']:.0f} GFLOP (forward x 3)")
    header = f"{'':34s} {'latency s':>10s} {'cpu s':>8s} {'img/s':>7s} {'GFLOP/s':>8s} {'of peak':>8s} {'peak MB':>8s}"
    lines.append(header)
    for r in result["rows"]:
        frac = f"{r['peak_fraction']:.0%}" if "peak_fraction" in r else "-"
        mem = f"{r['memory_mb']:.0f}" if r["memory_mb"] is not None else "-"
        extra = f"  (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
        lines.append(f"{r['name']:34s} {r['latency_s']:10.3f} {r['cpu_s']:8.3f} {r['images_per_s']:7.2f} "
                     f"{r['gflops']:8.0f} {frac:>8s} {mem:>8s}{extra}")
    for k, v in result["ratios"].items():
        lines.append(f"ratio {k}: {v:.2f}")
    return "\n".join(lines)


def default_dtypes() -> tuple[str, ...]:
    """fp32, plus bf16 where the hardware runs it natively."""
    return ("fp32", "bf16") if native_bf16() else ("fp32",)
