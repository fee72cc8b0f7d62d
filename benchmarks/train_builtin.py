"""Time the built-in recipe (`upernet train` with no arguments) and report the validation mIoU it reaches.

    .venv/bin/python benchmarks/train_builtin.py [--out runs/bench_builtin] [key=value ...]

Prints wall-clock time, process CPU time (this process and its DataLoader workers), the machine's
load average, and the validation aAcc / mIoU / mAcc of every validation round.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from upernet.config import load_config
from upernet.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. schedule.iters=200")
    parser.add_argument("--out", default="runs/bench_builtin", help="run folder (replaced)")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(None, args.overrides)
    start_wall, start_load = time.perf_counter(), os.getloadavg()
    result = train(config, out, progress=False)
    wall = time.perf_counter() - start_wall
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)

    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    print(f"recipe:        builtin {' '.join(args.overrides)}".rstrip())
    print(f"model:         {config.model.name} {config.model.args}")
    print(f"iterations:    {result['iteration']} x batch {config.data.batch_size} "
          f"({config.data.crop_size[0]}x{config.data.crop_size[1]} crops), torch threads {torch.get_num_threads()}")
    print(f"wall time:     {wall / 60:.1f} min   (CPU time {cpu / 60:.1f} min; load average at start "
          f"{start_load[0]:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for r in val:
        print(f"val @ {r['iter']:>5}:   aAcc {r['aAcc']:.2f}  mIoU {r['mIoU']:.2f}  mAcc {r['mAcc']:.2f}")
    print(f"final mIoU:    {result['val']['mIoU']:.2f} (best {result['best_mIoU']:.2f})")
    print(f"model:         {out / 'model'}")


if __name__ == "__main__":
    main()
