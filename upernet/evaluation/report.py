"""What `upernet eval` writes beside the numbers, to show where a model fails.

- `confusion_matrix.csv` (pixel counts) and `confusion_matrix_normalized.csv` (each ground-truth
  row divided by its pixels), rows ground truth, columns prediction, headed by the class names;
- `confusion_matrix.png`, the row-normalised matrix as a heat map labelled with the class names
  (above `MAX_HEATMAP_CLASSES` classes: the largest classes by ground-truth pixels, first);
- `worst/NN_<name>.png` for the k images of lowest per-image mIoU: image | prediction overlay |
  ground-truth overlay. The k are kept while the evaluation runs (`WorstImages`, no second pass)
  and gathered over the processes, so torchrun finds the same images as one process.

Every file is written atomically.
"""
from __future__ import annotations

import csv
import heapq
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..inference.segmenter import overlay_image, save_png
from ..io import atomic_write
from .metrics import gather

MAX_HEATMAP_CLASSES = 40
IGNORED_COLOUR = [0, 0, 0]  # ground-truth pixels of the ignore index in the overlays


@dataclass
class WorstImage:
    """One image of the worst list: its per-image mIoU (percent) and the pictures of its panel."""

    index: int  # position in the evaluated split
    path: str
    miou: float  # percent, not rounded (the order is that of the exact values)
    image: np.ndarray  # uint8 (H, W, 3) at the label's size
    prediction: np.ndarray  # (H, W) class indices
    label: np.ndarray  # (H, W) class indices, the ignore index where unlabelled


class WorstImages:
    """The k images of lowest per-image mIoU seen so far (ties: the earlier index), kept during one pass."""

    def __init__(self, k: int):
        self.k = k
        self.heap: list[tuple[float, int, WorstImage]] = []  # (-mIoU, -index): the best kept one on top

    def wants(self, miou: float, index: int) -> bool:
        """Whether an image with this mIoU would enter the list (NaN: nothing to score, never)."""
        if self.k <= 0 or math.isnan(miou):
            return False
        return len(self.heap) < self.k or (miou, index) < (-self.heap[0][0], -self.heap[0][1])

    def offer(self, miou: float, index: int, make: Callable[[], WorstImage]) -> None:
        """Keep the image if it is among the k worst; `make` builds its record only then."""
        if self.wants(miou, index):
            heapq.heappush(self.heap, (-miou, -index, make()))
            if len(self.heap) > self.k:
                heapq.heappop(self.heap)

    def gather(self) -> None:
        """Merge every process's list (under torch.distributed) into the k worst of the whole split."""
        merged = gather([record for _, _, record in self.heap])
        self.heap = []
        for record in merged:
            self.offer(record.miou, record.index, lambda: record)

    def sorted(self) -> list[WorstImage]:
        """Worst first."""
        return sorted((record for _, _, record in self.heap), key=lambda r: (r.miou, r.index))


def image_at_label_size(image: torch.Tensor, size: Sequence[int], mean: Sequence[float],
                        std: Sequence[float]) -> np.ndarray:
    """The normalised network input back as uint8 (H, W, 3) RGB at `size` (grey repeated, extra bands dropped)."""
    image = image.detach().float().cpu()
    channels = image.shape[0]
    mean_t = torch.tensor(list(mean)[:channels], dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std)[:channels], dtype=torch.float32).view(-1, 1, 1)
    pixels = image * std_t + mean_t
    pixels = pixels[:3] if channels >= 3 else pixels[:1].expand(3, -1, -1)
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = torch.nn.functional.interpolate(pixels[None], size=tuple(size), mode="bilinear",
                                                 align_corners=False)[0]
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ---- confusion matrix files ---------------------------------------------------------------------
def normalized_rows(confusion: torch.Tensor) -> np.ndarray:
    """Each row divided by its sum (the ground-truth pixels of the class); NaN rows for classes never labelled."""
    counts = confusion.detach().cpu().to(torch.float64).numpy()
    totals = counts.sum(axis=1, keepdims=True)
    out = np.full_like(counts, np.nan)
    np.divide(counts, totals, out=out, where=totals > 0)
    return out


def write_confusion_csv(matrix: np.ndarray | torch.Tensor, class_names: Sequence[str],
                        path: str | os.PathLike) -> Path:
    """A square matrix as CSV: a header row of prediction names, then one row per ground-truth class."""
    values = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label \\ prediction", *class_names])
            for name, row in zip(class_names, values):
                writer.writerow([name, *(int(v) if values.dtype.kind in "iu" else f"{v:.6f}" for v in row)])

    return atomic_write(path, write)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heatmap_classes(confusion: torch.Tensor, max_classes: int = MAX_HEATMAP_CLASSES) -> list[int]:
    """The classes the heat map shows: all in index order, or above `max_classes` the largest by ground-truth pixels."""
    num_classes = confusion.shape[0]
    if num_classes <= max_classes:
        return list(range(num_classes))
    pixels = confusion.detach().cpu().sum(dim=1).numpy()
    return [int(c) for c in np.argsort(-pixels, kind="stable")[:max_classes]]


def confusion_heatmap(confusion: torch.Tensor, class_names: Sequence[str],
                      max_classes: int = MAX_HEATMAP_CLASSES) -> Image.Image:
    """The row-normalised matrix as a white-to-blue heat map, class names on both axes.

    Above `max_classes` classes only the `max_classes` largest by ground-truth pixels are drawn,
    largest first, and the title says so.
    """
    shown = heatmap_classes(confusion, max_classes)
    rows = normalized_rows(confusion)[np.ix_(shown, shown)]
    names = [str(class_names[c]) for c in shown]
    n = len(shown)
    cell = 28 if n <= 12 else 18
    font, title_font = _font(11), _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_width = int(max(measure.textlength(name, font=font) for name in names)) + 8
    title = "confusion matrix, rows normalised (rows: ground truth, columns: prediction)"
    if n < confusion.shape[0]:
        title += f"; the {n} largest of {confusion.shape[0]} classes by ground-truth pixels, largest first"
    scale = "white 0 % to blue 100 % of the row's ground-truth pixels; grey: class never labelled"
    title_width = int(max(measure.textlength(title, font=title_font), measure.textlength(scale, font=font))) + 16
    top = 28 + name_width
    width = max(name_width + n * cell + 16, title_width)
    picture = Image.new("RGB", (width, top + n * cell + 44), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.text((8, 6), title, fill=(0, 0, 0), font=title_font)
    left = name_width
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    for i in range(n):
        draw.text((4, top + i * cell + (cell - 12) // 2), names[i], fill=(0, 0, 0), font=font)
        label = Image.new("RGB", (name_width, cell), (255, 255, 255))  # column names, turned upright
        ImageDraw.Draw(label).text((4, (cell - 12) // 2), names[i], fill=(0, 0, 0), font=font)
        picture.paste(label.rotate(90, expand=True), (left + i * cell, 28))
        for j in range(n):
            value = rows[i, j]
            colour = (220, 220, 220) if math.isnan(value) else tuple(int(v) for v in low + (high - low) * value)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            if cell >= 28 and not math.isnan(value):
                text = f"{100 * value:.0f}"
                draw.text((box[0] + 3, box[1] + 8), text, fill=(255, 255, 255) if value > 0.5 else (0, 0, 0),
                          font=font)
    bar_top = top + n * cell + 12  # the colour scale: 0 % to 100 % of the row's pixels
    for x in range(n * cell):
        value = x / max(n * cell - 1, 1)
        draw.line((left + x, bar_top, left + x, bar_top + 8), fill=tuple(int(v) for v in low + (high - low) * value))
    draw.text((8, bar_top + 12), scale, fill=(0, 0, 0), font=font)
    return picture


# ---- worst images -------------------------------------------------------------------------------
def worst_panel(record: WorstImage, class_names: Sequence[str], palette: Sequence[Sequence[int]],
                ignore_index: int, rank: int) -> Image.Image:
    """image | prediction overlay | ground-truth overlay side by side, each with a caption (and legend)."""
    names = [*map(str, class_names), "(ignored)"]
    colours = [*palette, IGNORED_COLOUR]
    ignored = len(class_names)
    label = np.where(record.label == ignore_index, ignored, record.label)
    panels = [("image", Image.fromarray(record.image)),
              ("prediction", overlay_image(record.image, record.prediction, colours, names)),
              ("ground truth", overlay_image(record.image, label, colours, names))]
    font = _font(12)
    caption = 20
    width = sum(p.width for _, p in panels) + 8 * (len(panels) - 1)
    out = Image.new("RGB", (width, caption * 2 + max(p.height for _, p in panels)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((4, 3), f"#{rank}  {record.path}  mIoU {record.miou:.2f}", fill=(0, 0, 0), font=font)
    x = 0
    for title, panel in panels:
        draw.text((x + 4, caption + 3), title, fill=(0, 0, 0), font=font)
        out.paste(panel, (x, caption * 2))
        x += panel.width + 8
    return out


def worst_name(rank: int, record: WorstImage) -> str:
    """`NN_<stem>.png`: the rank keeps the files in order, the stem names the image."""
    stem = Path(record.path).stem if record.path else f"image{record.index}"
    return f"{rank:02d}_{stem}.png"


@dataclass
class EvalReport:
    """What `write_report` needs: the summed confusion matrix, the class names and colours, the worst images."""

    confusion: torch.Tensor
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    worst: list[WorstImage]

    def worst_summary(self) -> list[dict]:
        """The worst list as JSON-able rows (rank, index, path, mIoU, file)."""
        return [{"rank": rank, "index": r.index, "path": r.path, "mIoU": round(r.miou, 2),
                 "file": f"worst/{worst_name(rank, r)}"} for rank, r in enumerate(self.worst, 1)]


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> list[Path]:
    """The confusion CSVs, the heat map and the worst-image panels under `out_dir` (see the module docstring)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_confusion_csv(report.confusion, report.class_names, folder / "confusion_matrix.csv"),
               write_confusion_csv(normalized_rows(report.confusion), report.class_names,
                                   folder / "confusion_matrix_normalized.csv")]
    heatmap = folder / "confusion_matrix.png"
    save_png(confusion_heatmap(report.confusion, report.class_names), heatmap)
    written.append(heatmap)
    if report.worst:
        (folder / "worst").mkdir(exist_ok=True)
    for rank, record in enumerate(report.worst, 1):
        path = folder / "worst" / worst_name(rank, record)
        save_png(worst_panel(record, report.class_names, report.palette, report.ignore_index, rank), path)
        written.append(path)
    for stale in (folder / "worst").glob("[0-9][0-9]_*.png"):  # panels of an earlier evaluation
        if stale not in written:
            stale.unlink()
    return written
