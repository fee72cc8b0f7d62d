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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


def run_one(path: Path, tile: int, overlap: int, classes: int) -> dict:
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
    start = time.perf_counter()
    out = predict_file(TiledModel.from_segmenter(segmenter), path, path.with_suffix(""), segmenter.meta["palette"],
                       tile, overlap)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.unlink()
    return {"rss_before_mb": round(before), "peak_rss_mb": round(peak), "seconds": round(seconds, 1)}


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
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.tile, args.overlap, args.classes)))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        for size in args.sizes:
            path = Path(folder) / f"scene_{size}.tif"
            write_scene(path, size, args.height)
            child = subprocess.run([sys.executable, __file__, "--run", str(path), "--tile", str(args.tile),
                                    "--overlap", str(args.overlap), "--classes", str(args.classes)],
                                   check=True, capture_output=True, text=True)
            height = args.height or size
            row = {"size": size, "height": height, "megapixels": round(size * height / 1e6),
                   **json.loads(child.stdout.splitlines()[-1])}
            row["buffer_bound_mb"] = round(buffer_bound(args.classes, args.tile, args.overlap, size) / 2 ** 20)
            rows.append(row)
            print(row, flush=True)
            path.unlink()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nCPU: {cpu}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; tile {args.tile}, "
          f"overlap {args.overlap}, {args.classes} classes\n")
    print("| image | megapixels | RSS before predict (MB) | peak RSS (MB) | probability buffer bound (MB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} x {r['height']} | {r['megapixels']} | {r['rss_before_mb']} | {r['peak_rss_mb']} | "
              f"{r['buffer_bound_mb']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
