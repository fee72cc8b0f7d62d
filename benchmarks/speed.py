"""Inference and training speed of UPerNet ConvNeXt-T vs transformers on the same weights.

    .venv/bin/python benchmarks/speed.py              # inference (+ onnxruntime) and training tables
    .venv/bin/python benchmarks/speed.py --skip-train

Runs `upernet bench` in-process and writes benchmarks/results/speed_{inference,train}.json plus
the Markdown tables of the README's speed section to stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from upernet.inference import bench, peers

RESULTS = Path(__file__).parent / "results"


def markdown(result: dict) -> str:
    """The README table: one row per implementation, then the ratios."""
    rows = ["| run | latency (s, median) | CPU time (s) | images/s | GFLOP/s | of conv peak | peak memory (MB) |",
            "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        frac = f"{r['peak_fraction']:.0%}" if "peak_fraction" in r else "-"
        mem = f"{r['memory_mb']:.0f}" if r["memory_mb"] is not None else "-"
        rows.append(f"| {r['name']} | {r['latency_s']:.2f} | {r['cpu_s']:.2f} | {r['images_per_s']:.2f} | "
                    f"{r['gflops']:.0f} | {frac} | {mem} |")
    rows += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="upernet_convnext_tiny")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    ours, peer = peers.transformers_pair(args.model)
    inference = bench.bench_inference(ours, (512, 512), 1, bench.default_dtypes(), peer, runs=args.runs, onnx=True)
    (RESULTS / "speed_inference.json").write_text(json.dumps(inference, indent=2))
    print(bench.format_table(inference), "\n\n" + markdown(inference) + "\n")
    if not args.skip_train:
        train = bench.bench_train(ours, (512, 512), 2, bench.default_dtypes(), peer, runs=max(args.runs // 2, 2),
                                  checkpointing=True)
        (RESULTS / "speed_train.json").write_text(json.dumps(train, indent=2))
        print(bench.format_table(train), "\n\n" + markdown(train))


if __name__ == "__main__":
    main()
