"""`upernet plot RUN_DIR`: PNG curves of the train loss, the learning rate and the validation mIoU.

Drawn with Pillow (already a dependency) from the run's metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import MissingFile, UserError

WIDTH, HEIGHT, MARGIN = 640, 400, 60


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFile(f"{path}: no metrics log (is {run_dir} a run folder of `upernet train`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not a JSON line ({e})") from None
    return records


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside [low, high]: multiples of 1, 2, 2.5 or 5 times a power of ten, about `count` of them."""
    if high <= low:
        return [low]
    rough = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= rough)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    while (first + len(ticks)) * step <= high + step * 1e-9:
        ticks.append(round((first + len(ticks)) * step, 12))
    return ticks


def line_chart(xs: list[float], ys: list[float], title: str, ylabel: str, path: Path, log_y: bool = False) -> Path:
    """One curve with labelled axes, written as a PNG."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    values = [math.log10(y) for y in ys] if log_y else list(ys)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, top, right, bottom = MARGIN + 10, 30, WIDTH - 20, HEIGHT - MARGIN

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for t in nice_ticks(y0, y1):
        _, y = px(x0, t)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left + 1, y, right - 1, y], fill=(230, 230, 230))
        label = f"{10 ** t:.2g}" if log_y else f"{t:g}"
        draw.text((4, y - 6), label, fill="black")
    for t in nice_ticks(x0, x1):
        x, _ = px(t, y0)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 12, bottom + 8), f"{t:g}", fill="black")
    points = [px(x, y) for x, y in zip(xs, values)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for p in points if len(points) <= 50 else points[-1:]:
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(31, 119, 180))
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 20, HEIGHT - 22), "iteration", fill="black")
    draw.text((4, 10), ylabel, fill="black")
    image.save(path)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, lr.png and (when validated) miou.png into `out_dir` (default: `RUN_DIR/plots`)."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train and not val:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: no train or val records to plot")
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        iters = [r["iter"] for r in train]
        written.append(line_chart(iters, [r["loss"] for r in train], "training loss", "loss", out / "loss.png"))
        lrs = [r["lr"] for r in train]
        written.append(line_chart(iters, lrs, "learning rate (head)", "lr", out / "lr.png", log_y=min(lrs) > 0))
    if val:
        written.append(line_chart([r["iter"] for r in val], [r["mIoU"] for r in val], "validation mIoU (%)", "mIoU",
                                  out / "miou.png"))
    return written
