"""Load test of `upernet serve` on loopback: N concurrent clients for a fixed time, bounded.

    .venv/bin/python benchmarks/serve_load.py                          # ConvNeXt-T, 1, 4, 1, 4 clients, 20 s each
    .venv/bin/python benchmarks/serve_load.py --model runs/demo/model --clients 1 8 --seconds 30 -- --size 512

Starts `upernet serve` in a child process on 127.0.0.1 (a free port), sends the built-in sample image
(or --image) from client threads as fast as the answers come back, each phase for --seconds or
--max-requests, whichever ends first, and reports per phase p50/p95 latency, throughput and errors,
with the server's resident memory (RSS) before, between and after the phases. Writes
benchmarks/results/<date>-serve-load.md and prints it. Not a test: nothing is asserted on times.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from upernet.inference.predict import SAMPLE_IMAGE
from upernet.io import write_text

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"  # loopback only: this script never sends to another machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "upernet.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
               *extra]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"upernet serve exited with {server.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.kill()
    raise RuntimeError("upernet serve did not answer /health within 300 s")


def run_phase(url: str, image: bytes, kind: str, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads posting `image` back to back until the time or the request budget is spent."""
    latencies, failures = [], []
    lock = threading.Lock()
    budget = [max_requests]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if budget[0] == 0:
                        return
                    budget[0] -= 1
                start = time.perf_counter()
                try:
                    response = http.post("/predict", content=image, headers={"Content-Type": kind})
                    ok = response.status_code == 200 and isinstance(response.json(), list)
                    problem = None if ok else f"{response.status_code}: {response.text[:120]}"
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    (failures.append(problem) if problem else latencies.append(elapsed))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    times = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"clients": clients, "requests": len(latencies) + len(failures), "errors": len(failures),
            "first_error": failures[0] if failures else "", "wall_s": wall,
            "p50_s": float(np.percentile(times, 50)), "p95_s": float(np.percentile(times, 95)),
            "throughput": len(latencies) / wall}


def report(args: argparse.Namespace, image_size: tuple[int, int], phases: list[dict], rss: list[tuple[str, float]],
           passes: dict[str, int], load: tuple[float, float]) -> str:
    import torch

    lines = [f"# `upernet serve` load test ({datetime.date.today().isoformat()})", "",
             f"- CPU: {cpu_name()}; torch {torch.__version__}, server threads: {args.threads or 'torch default'}",
             f"- model: `{args.model}`; image: {args.image.name} ({image_size[0]}x{image_size[1]}), resized by the "
             f"model's test-time rule; JSON answer (Hugging Face format)",
             f"- loopback ({HOST}), each phase {args.seconds:g} s or {args.max_requests} requests at most; "
             f"server options: {' '.join(args.server_args) or '(defaults)'}",
             f"- command: `python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`",
             f"- machine load average (1 min) at the start and end: {load[0]:.1f}, {load[1]:.1f} "
             f"(other processes share these CPUs: compare phases of one run, repeat a phase to see the noise)", "",
             "| clients | requests | errors | p50 latency (s) | p95 latency (s) | throughput (images/s) |",
             "|---|---|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p['clients']} | {p['requests']} | {p['errors']} | {p['p50_s']:.3f} | {p['p95_s']:.3f} | "
                     f"{p['throughput']:.2f} |")
    lines += ["", "Server resident memory (RSS):", "", "| when | RSS (MB) |", "|---|---|"]
    lines += [f"| {when} | {mb:.0f} |" for when, mb in rss]
    lines += ["", "Forward passes by images per pass (all phases, warm-up included): "
              + ", ".join(f"{count} x {size}" for size, count in passes.items())]
    errors = [p for p in phases if p["errors"]]
    lines += ["", "First errors: " + "; ".join(p["first_error"] for p in errors) if errors else "", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="upernet_convnext_tiny", help="any model `upernet serve` takes")
    parser.add_argument("--image", type=Path, default=SAMPLE_IMAGE, help="the image every request sends")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 1, 4],
                        help="concurrent clients, one phase each (repeat phases to see the machine's noise)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--max-requests", type=int, default=400, help="requests per phase at most")
    parser.add_argument("--threads", type=int, help="torch threads of the server")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{datetime.date.today().isoformat()}-serve-load.md")
    parser.add_argument("server_args", nargs="*", help="more `upernet serve` options, after --")
    args = parser.parse_args()
    image = args.image.read_bytes()
    kind = "image/png" if args.image.suffix.lower() == ".png" else "application/octet-stream"
    from PIL import Image

    with Image.open(args.image) as img:
        image_size = img.size
    load_start = os.getloadavg()[0]
    port = free_port()
    extra = [*(["--threads", str(args.threads)] if args.threads else []), *args.server_args]
    server = start_server(args.model, port, extra)
    url = f"http://{HOST}:{port}"
    try:
        run_phase(url, image, kind, 1, 60, 3)  # warm-up: first-call allocations, lazy initialisation
        rss = [("after warm-up", rss_mb(server.pid))]
        phases = []
        for number, clients in enumerate(args.clients, 1):
            phases.append(run_phase(url, image, kind, clients, args.seconds, args.max_requests))
            rss.append((f"after phase {number} ({clients} client(s))", rss_mb(server.pid)))
            print(f"{clients} client(s): {phases[-1]['requests']} requests, p50 {phases[-1]['p50_s']:.3f} s, "
                  f"{phases[-1]['throughput']:.2f} images/s, {phases[-1]['errors']} errors", file=sys.stderr)
        health = httpx.get(f"{url}/health").json()
        passes = health["forward_passes"]
    finally:
        server.terminate()
        server.wait(30)
    text = report(args, image_size, phases, rss, passes, (load_start, os.getloadavg()[0]))
    os.makedirs(args.out.parent, exist_ok=True)
    write_text(args.out, text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
