"""Peak memory of tiled prediction on huge GeoTIFFs (issue #18): 2k, 8k and 20k pixel squares.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/huge_image.py --sizes 2000 8000 20000

Each size: a 3-band uint8 GeoTIFF is written block by block (deflate, tiled) into a temp folder,
then a fresh process segments it with `inference.tiles.predict_file` (512 px tiles, 128 px
overlap, labels to a GeoTIFF by windows) and reports its peak resident set (ru_maxrss) and the
resident set before predicting (Python, torch and the model). The model is a tiny UPerNet
(ResNet with 4-32 channels, 6 classes, as aerial label sets have; `--classes 150` for ADE20K's
count): the benchmark measures the tiling, not a backbone; a real model adds its activations for
`window_batch` windows, a constant. The bound column is `buffer_bound`: what the blend holds of
probabilities at most.

`--trace FILE` also samples the resident set and its peak (VmRSS, VmHWM from /proc) every second
into FILE_<width>x<height> (JSON lines), and with glibc the size of its main heap and the free
bytes in it (mallinfo2): a peak that creeps up while the bytes in use stay the same is the heap
fragmenting (2026-12-03-huge-image-150-classes.md).
`--window-batch N` sets the windows per forward pass.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mb() -> dict:
    """glibc's heap (arena: bytes from brk/sbrk), the free bytes in it and the bytes in mmapped chunks, in
    MB; {} without glibc's mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {"heap_mb": info.arena >> 20, "heap_free_mb": info.fordblks >> 20, "mmapped_mb": info.hblkhd >> 20}


def trace_memory(path: Path, seconds: float = 1.0) -> threading.Event:
    """Append {"t", "rss_mb", "peak_mb", heap_mb()} to `path` every `seconds` until the returned event is set."""
    stop, start = threading.Event(), time.perf_counter()

    def sample() -> None:
        with open(path, "a") as f:
            while not stop.wait(seconds):
                f.write(json.dumps({"t": round(time.perf_counter() - start, 1), "rss_mb": round(rss_mb()),
                                    "peak_mb": round(rss_mb("VmHWM")), **heap_mb()}) + "\n")
                f.flush()

    threading.Thread(target=sample, daemon=True).start()
    return stop


def write_scene(path: Path, size: int, height: int | None = None) -> None:
    """A smooth 3-band scene `size` wide and `height` (default `size`) tall, written 512 rows at a time."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    height = height or size
    profile = {"driver": "GTiff", "height": height, "width": size, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "crs": CRS.from_epsg(32632),
               "transform": from_origin(600000.0, 5200000.0, 0.3, 0.3), "BIGTIFF": "IF_SAFER"}
    xs = np.arange(size)
    with rasterio.open(path, "w", **profile) as ds:
        for top in range(0, height, 512):
            ys = np.arange(top, min(top + 512, height))[:, None]
            block = np.stack([(127 + 100 * np.sin(xs / 700.0 + ys / 900.0)),
                              (127 + 100 * np.cos(xs / 500.0 - ys / 400.0)),
                              ((xs * 7 + ys * 13) % 256)]).astype(np.uint8)
            ds.write(block, window=Window(0, top, size, len(ys)))


def run_one(path: Path, tile: int, overlap: int, classes: int, window_batch: int = 4,
            trace: Path | None = None) -> dict:
    """In this (fresh) process: segment `path`, return timings and resident sets."""
    import torch

    import upernet
    from upernet.inference.segmenter import Segmenter
    from upernet.inference.tiles import TiledModel, predict_file

    torch.manual_seed(0)
    model = upernet.build_model("upernet_r50", num_classes=classes, channels=16, aux_channels=8,
                                backbone_args={"layers": (1, 1, 1, 1), "channels": (4, 8, 16, 32), "stem_width": 8})
    segmenter = Segmenter(model, device="cpu", precision="fp32", size="none")
    before = rss_mb()
    stop_trace = trace_memory(trace) if trace else threading.Event()
    start = time.perf_counter()
    out = predict_file(TiledModel.from_segmenter(segmenter), path, path.with_suffix(""), segmenter.meta["palette"],
                       tile, overlap, window_batch=window_batch)
    seconds = time.perf_counter() - start
    stop_trace.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.unlink()
    return {"rss_before_mb": round(before), "peak_rss_mb": round(peak), "seconds": round(seconds, 1)}


def trace_file(trace: Path, size: int, height: int | None) -> Path:
    """`--trace` FILE for one image: its size goes into the name (scene.jsonl -> scene_20000x2000.jsonl)."""
    return trace.resolve().with_name(f"{trace.stem}_{size}x{height or size}{trace.suffix or '.jsonl'}")


def buffer_bound(classes: int, tile: int, overlap: int, width: int, window_batch: int = 4) -> int:
    """Bytes of probabilities tiled prediction holds at most (`inference.tiles`): the carried overlap
    rows over the width, the outputs of one forward pass, one weighted window, the open blocks."""
    return 4 * classes * (overlap * width + (window_batch + 4) * tile * tile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 8000, 20000])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--height", type=int, help="image height (default: square); memory should not depend on it")
    parser.add_argument("--window-batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--trace", type=Path, help="sample the resident set every second into this JSON-lines file")
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.tile, args.overlap, args.classes, args.window_batch, args.trace)))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        for size in args.sizes:
            path = Path(folder) / f"scene_{size}.tif"
            write_scene(path, size, args.height)
            child = subprocess.run([sys.executable, __file__, "--run", str(path), "--tile", str(args.tile),
                                    "--overlap", str(args.overlap), "--classes", str(args.classes),
                                    "--window-batch", str(args.window_batch),
                                    *(["--trace", str(trace_file(args.trace, size, args.height))] if args.trace
                                      else [])],
                                   check=True, capture_output=True, text=True)
            height = args.height or size
            row = {"size": size, "height": height, "megapixels": round(size * height / 1e6),
                   **json.loads(child.stdout.splitlines()[-1])}
            row["buffer_bound_mb"] = round(buffer_bound(args.classes, args.tile, args.overlap, size,
                                                        args.window_batch) / 2 ** 20)
            rows.append(row)
            print(row, flush=True)
            path.unlink()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nCPU: {cpu}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; tile {args.tile}, "
          f"overlap {args.overlap}, {args.classes} classes, {args.window_batch} windows per forward pass\n")
    print("| image | megapixels | RSS before predict (MB) | peak RSS (MB) | probability buffer bound (MB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} x {r['height']} | {r['megapixels']} | {r['rss_before_mb']} | {r['peak_rss_mb']} | "
              f"{r['buffer_bound_mb']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
