"""Windowed inference streamed in row bands: the one implementation behind slide mode (eval,
`Segmenter`, serve) and the tiled prediction of images too large to hold as logits.

Windows lie on mmsegmentation's slide grid (`window_grid`), all of the crop's size, and are run
row by row, left to right (`window_order`). Every window's outputs are added, times a window
weight, into the open block of its grid row (crop height x the columns the row's later windows may
still reach); the columns left of the row's next window are then final for the row: their rows
above the next grid row are divided by the summed weights and handed out (`blend_blocks`), their
rows the next grid row still adds to go into the carry. The slide grid moves its last row of
windows back to end at the image border, up to crop height - 1 rows into the row above; so the
last two grid rows run interleaved, column by column, and what they share is carried over a few
windows' width only. What the blend holds at most is therefore, in floats:

    classes x (overlap x width  +  (window_batch + 4) x crop area)

the carry (the overlap rows of one grid row over the image width), then the outputs of one forward
pass, one weighted window, the open blocks of at most two grid rows and the pieces carried between
them; whatever the image height. The carry is the only term that grows with the image, with its
width. No single-pass order does better than overlap x the shorter side (whatever order the windows
run in, when half of them have run the partial sums along the border between done and not done
must be kept), and row order is the one that hands whole rows to the label writers. Every pixel
gets the terms a whole-image buffer would get, in the same order: the blend is bit for bit the
whole-image blend. `blend_windows` puts the blocks together into full-width row bands (slide mode,
`Segmenter`, serve: they keep the whole map anyway).

Window weights (`weight=`):

- "uniform": 1 everywhere. The blend is then the plain mean of the windows covering a pixel:
  mmsegmentation's slide (sum of logits / count map), kept for eval so that our numbers equal the
  peers'.
- "cosine": separable w(y, x) = r(y) r(x), where along a window side of n pixels with overlap
  o = crop - stride the ramp is r(i) = sin^2(pi/2 * (i + 0.5) / o) for the first o pixels,
  1 in the middle, and the mirror image over the last o pixels (o is capped at n // 2; o = 0
  gives 1 everywhere). Where two windows overlap by exactly o, their ramps sum to 1 (sin^2 +
  cos^2); any other overlap is normalised by the weight sum. A window's weight falls to almost
  zero at its edges, so the blend has no jump there: no seams, even when the model's output
  depends on where a pixel lies in its window (padding, receptive field).

Tiled prediction (`predict_tiled`) blends softmax probabilities with the cosine weight, reads the
image window by window from an `ImageSource` (a GeoTIFF read by windows: `geotiff.py`; an array),
turns each block into labels at once and writes labels band by band to a `LabelWriter`
(streaming palette PNG here, GeoTIFF in `geotiff.py`), so no array the size of the image exists
except the input when it is decoded whole (PNG/JPEG: 3 bytes per pixel); the labels of one band
(stride x width, 1 byte a pixel up to 256 labels) are the only other width-long buffer.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..io import temp_path
from .probabilities import class_probabilities, predicted_classes

WEIGHTS = ("uniform", "cosine")
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128
IGNORE_LABEL = 255  # label written where the input has no data (nodata / masked pixels)

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2)


# ---- the window grid and weights ----------------------------------------------------------------
def window_grid(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[Window]:
    """The (y1, y2, x1, x2) windows of mmsegmentation's slide inference, row by row.

    `max(H - crop + stride - 1, 0) // stride + 1` rows (and columns likewise); the last window is
    moved back to end at the image border, and a window larger than the image becomes the image.
    """
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise UserError(f"crop size {tuple(crop_size)} and stride {tuple(stride)} must be positive")
    if stride_h > crop_h or stride_w > crop_w:
        raise UserError(f"stride {tuple(stride)} larger than the crop {tuple(crop_size)} would leave pixels "
                        f"that no window covers; use a stride <= the crop size")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride_h + crop_h, height)
            x2 = min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def ramp(size: int, overlap: int) -> torch.Tensor:
    """The 1-D cosine ramp of one window side (see the module docstring)."""
    overlap = min(overlap, size // 2)
    r = torch.ones(size)
    if overlap > 0:
        rise = torch.sin(math.pi / 2 * (torch.arange(overlap) + 0.5) / overlap) ** 2
        r[:overlap] = rise
        r[size - overlap:] = rise.flip(0)
    return r


def window_weight(weight: str, size: Sequence[int], overlap: Sequence[int]) -> torch.Tensor | None:
    """(h, w) weight of a window of `size`; None for "uniform" (every pixel weighs 1)."""
    if weight not in WEIGHTS:
        raise UserError(f"window weight {weight!r}: use one of {', '.join(WEIGHTS)}")
    if weight == "uniform":
        return None
    return ramp(size[0], overlap[0])[:, None] * ramp(size[1], overlap[1])[None, :]


# ---- blending, finished piece by piece ----------------------------------------------------------
@dataclass
class Band:
    """Finished pixels `rows` x `cols` of every pixel output, (N, C, rows, cols) by name. The last
    piece of the image (`last`) also carries the image-level outputs (N, C), averaged over all
    windows, in `images`. `blend_windows` and `tiled_probabilities` give full-width row bands
    (`cols` is every column); `blend_blocks` and `tiled_blocks` give blocks of one grid row."""

    rows: slice
    pixels: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    last: bool = False
    cols: slice = field(default_factory=lambda: slice(None))


def window_order(rows: int, col_lefts: Sequence[int], col_rights: Sequence[int]) -> list[tuple[int, int]]:
    """(grid row, grid column) of every window in the order `blend_blocks` runs them.

    Row by row, left to right, except the last two grid rows, which are interleaved: a window of
    the last row runs as soon as every window of the row above that reaches its columns has run.
    Every pixel still receives its windows in row-by-row order, and the rows the last grid row adds
    to (up to crop height - 1 of them, since the slide grid moves that row back to end at the border)
    are carried over a few windows' width instead of the image width.
    """
    cols = len(col_lefts)
    order = [(r, c) for r in range(max(rows - 2, 0)) for c in range(cols)]
    if rows == 1:
        return order + [(0, c) for c in range(cols)]
    below = 0  # next window of the last row
    for c in range(cols):
        order.append((rows - 2, c))
        while below < cols and (c + 1 == cols or col_lefts[c + 1] >= col_rights[below]):
            order.append((rows - 1, below))
            below += 1
    return order


@dataclass
class OpenRow:
    """The columns `left` ... `right` of one grid row that later windows of the row may still reach:
    the weighted sums of every output, and under the key None the summed weights."""

    left: int = 0
    right: int = 0
    sums: dict[str | None, torch.Tensor] = field(default_factory=dict)


def blend_blocks(
    forward: Callable[[list[Window]], dict[str, torch.Tensor]],
    height: int,
    width: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
    weight: str = "uniform",
    window_batch: int = 4,
) -> Iterator[Band]:
    """Run `forward` on the slide windows of an image and yield the weighted blend block by block.

    Windows run in `window_order`. Within a grid row, the columns left of the row's next window
    are final for that row as soon as the window before it is added: their rows above the next
    grid row are handed out as a block, their rows the next grid row still adds to are carried
    (column by column, dropped once the next grid row has taken them). What is held at most, in
    floats: classes x (overlap x width (the carry) + a few crop areas (the outputs of one forward
    pass, one weighted window, the open blocks of two grid rows)); see the module docstring. Every
    pixel's sum has the terms a whole-image buffer would get, in the same order: the blend is bit
    for bit the whole-image blend, and image-level outputs are summed in row-by-row window order.

    Args:
        forward: called with up to `window_batch` windows; returns outputs by name, pixel outputs
            (k * N, C, h, w) with window i's N images at rows i * N ... (i + 1) * N, image-level
            outputs (k * N, C) likewise.
        height: image height.
        width: image width.
        crop_size: (h, w) of the windows.
        stride: (h, w) step between windows.
        weight: "uniform" (mmsegmentation's mean) or "cosine" (smooth ramp), see the module docstring.
        window_batch: windows per forward pass (all windows have the same size).
    """
    grid = window_grid(height, width, crop_size, stride)
    win_h, win_w = grid[0][1] - grid[0][0], grid[0][3] - grid[0][2]
    w = window_weight(weight, (win_h, win_w), (crop_size[0] - stride[0], crop_size[1] - stride[1]))
    row_tops = sorted({y1 for y1, _, _, _ in grid})
    col_lefts = sorted({x1 for _, _, x1, _ in grid})
    rows, cols = len(row_tops), len(col_lefts)
    # rows of grid row r that are final once it is done; the rest (its overlap with row r + 1) is carried
    final_rows = [b - a for a, b in zip(row_tops, row_tops[1:])] + [win_h]
    order = window_order(rows, col_lefts, [x + win_w for x in col_lefts])
    open_rows: dict[int, OpenRow] = {}
    # grid row -> (first column, last column + 1, sums by name) of what the row above left it to add to
    carry: dict[int, list[tuple[int, int, dict[str | None, torch.Tensor]]]] = {}
    # the carry into every grid row but the last spans the image width: it lives in one buffer per output
    # (overlap rows x width), allocated once and reused from grid row to grid row, instead of a new piece
    # per window. Pieces of a few tens of MB, freed and allocated window after window, fragment the C
    # allocator's heap: its free bytes (resident) grew band after band while the live bytes stayed constant.
    carry_buffers: dict[str | None, torch.Tensor] = {}
    image_parts: dict[int, dict[str, torch.Tensor]] = {}  # window index -> its image-level outputs
    done = 0
    pixel_outputs = False

    def image_means() -> dict[str, torch.Tensor]:
        """Image-level outputs averaged over the windows, summed in row-by-row window order."""
        totals: dict[str, torch.Tensor] = {}
        for index in sorted(image_parts):
            for name, value in image_parts[index].items():
                totals[name] = totals.get(name, 0) + value
        return {name: total / len(grid) for name, total in totals.items()}

    def carried_piece(r: int, name: str | None, rows_left: torch.Tensor, left: int) -> torch.Tensor:
        """The rows of grid row `r` that grid row r + 1 still adds to, at columns `left` onward, kept for it.

        Into the buffer unless r + 1 is the last grid row (its carry spans a few windows: `window_order`).
        Writing there is safe: grid row r has already taken these columns from the buffer (the row above's
        carry), and nothing reads them again.
        """
        if r + 2 == rows:
            return rows_left.clone()
        if name not in carry_buffers:
            carry_buffers[name] = rows_left.new_empty(*rows_left.shape[:3], width)
        piece = carry_buffers[name][:, :, :, left:left + rows_left.shape[3]]
        return piece.copy_(rows_left)

    def open_columns(r: int, row: OpenRow, contributions: dict[str | None, torch.Tensor], stop: int) -> None:
        """Extend the open block of grid row `r` to column `stop`; rows the row above reached start from the carry."""
        carried = win_h - final_rows[r - 1] if r > 0 else 0
        for name, value in contributions.items():
            extra = value.new_zeros(*value.shape[:2], win_h, stop - row.right)
            for first, end, sums in carry.get(r, []):
                lo, hi = max(first, row.right), min(end, stop)
                if lo < hi:
                    extra[:, :, :carried, lo - row.right:hi - row.right] = sums[name][:, :, :, lo - first:hi - first]
            row.sums[name] = torch.cat([row.sums[name], extra], dim=3) if name in row.sums else extra
        carry[r] = [piece for piece in carry.get(r, []) if piece[1] > stop]
        row.right = stop

    def add_windows(chunk: list[tuple[int, int]], outputs: dict[str, torch.Tensor]) -> Iterator[Band]:
        """Add the windows of one forward pass to their open blocks; yield the blocks they finish. Its own
        function so that the pass's outputs and weighted windows are freed before the next pass runs."""
        nonlocal done, pixel_outputs
        for i, (r, c) in enumerate(chunk):
            index = r * cols + c
            y1, _, x1, x2 = grid[index]
            contributions: dict[str | None, torch.Tensor] = {}
            for name, value in outputs.items():
                n = value.shape[0] // len(chunk)
                value = value[i * n:(i + 1) * n]
                if value.dim() != 4:
                    image_parts.setdefault(index, {})[name] = value
                else:
                    contributions[name] = value if w is None else value * w.to(value)
            done += 1
            if not contributions:
                continue
            pixel_outputs = True
            device = next(iter(contributions.values())).device
            window_weights = torch.ones(win_h, win_w, device=device) if w is None else w.to(device)
            contributions[None] = window_weights[None, None]  # summed like the outputs: the divisor
            row = open_rows.setdefault(r, OpenRow())
            if x2 > row.right:
                open_columns(r, row, contributions, x2)
            for name, value in contributions.items():
                row.sums[name][:, :, :, x1 - row.left:x2 - row.left] += value
            finished = col_lefts[c + 1] if c + 1 < cols else width  # no later window of the row starts left of it
            k, f = finished - row.left, final_rows[r]
            weights = row.sums[None][:, :, :f, :k]
            pixels = {name: total[:, :, :f, :k] / weights for name, total in row.sums.items() if name is not None}
            if r + 1 < rows:
                carry.setdefault(r + 1, []).append(
                    (row.left, finished, {name: carried_piece(r, name, total[:, :, f:, :k], row.left)
                                          for name, total in row.sums.items()}))
            row.sums = {name: total[:, :, :, k:] for name, total in row.sums.items()}
            last = done == len(grid)
            yield Band(slice(y1, y1 + f), pixels, image_means() if last else {}, last, slice(row.left, finished))
            row.left = finished
            if c + 1 == cols:
                del open_rows[r]

    for start in range(0, len(order), window_batch):
        chunk = order[start:start + window_batch]
        yield from add_windows(chunk, forward([grid[r * cols + c] for r, c in chunk]))
    if not pixel_outputs:  # a model with image-level outputs only
        yield Band(slice(0, height), {}, image_means(), True, slice(0, width))


def row_bands(blocks: Iterator[Band], width: int) -> Iterator[Band]:
    """Put the blocks of `blend_blocks` together into full-width row bands (classes x band rows x
    width), top to bottom."""
    pieces: dict[int, list[Band]] = {}  # first row of a band -> its blocks so far
    for block in blocks:
        band = pieces.setdefault(block.rows.start, [])
        band.append(block)
        if sum(piece.cols.stop - piece.cols.start for piece in band) == width:
            del pieces[block.rows.start]
            band.sort(key=lambda piece: piece.cols.start)
            pixels = {name: torch.cat([piece.pixels[name] for piece in band], dim=3) for name in block.pixels}
            yield Band(block.rows, pixels, block.images, block.last, slice(0, width))


def blend_windows(
    forward: Callable[[list[Window]], dict[str, torch.Tensor]],
    height: int,
    width: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
    weight: str = "uniform",
    window_batch: int = 4,
) -> Iterator[Band]:
    """`blend_blocks` in full-width row bands, top to bottom (slide mode puts them together).

    Args:
        forward: called with up to `window_batch` windows; returns outputs by name (see `blend_blocks`).
        height: image height.
        width: image width.
        crop_size: (h, w) of the windows.
        stride: (h, w) step between windows.
        weight: "uniform" (mmsegmentation's mean) or "cosine" (smooth ramp), see the module docstring.
        window_batch: windows per forward pass.
    """
    return row_bands(blend_blocks(forward, height, width, crop_size, stride, weight, window_batch), width)


def forward_outputs(model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One forward pass -> float32 outputs by name; a plain tensor is named "out"."""
    context = (torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
    with context:
        out = model(images)
    out = out if isinstance(out, dict) else {"out": out}
    return {name: value.float() for name, value in out.items()}


# ---- huge images: sources, writers, prediction --------------------------------------------------
class ImageSource(Protocol):
    """An image read window by window: `height`, `width`, `bands` and `read`."""

    height: int
    width: int
    bands: int

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels (bands, h, w) of the window, in the stored dtype."""

    def valid(self, rows: slice) -> np.ndarray | None:
        """bool (h, W) of the rows: False where the input has no data; None when every pixel has data."""


@dataclass
class ArraySource:
    """An image held in memory, (H, W, C) or (C, H, W) with `channels_first`."""

    array: np.ndarray
    channels_first: bool = False

    def __post_init__(self) -> None:
        if self.array.ndim == 2:
            self.array = self.array[None] if self.channels_first else self.array[..., None]
        if not self.channels_first:
            self.array = self.array.transpose(2, 0, 1)  # a view: no copy
        self.bands, self.height, self.width = self.array.shape

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self.array[:, rows, cols]

    def valid(self, rows: slice) -> np.ndarray | None:
        return None


class LabelWriter(Protocol):
    """Receives the label map band by band, top to bottom; `close` finishes the file."""

    def write(self, rows: slice, labels: np.ndarray) -> None:
        """Labels (h, W) of `rows`."""

    def close(self) -> None:
        """Finish the output (and make it appear under its final name)."""

    def abort(self) -> None:
        """Remove whatever was written: nothing partial is left under the final name."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class PngLabelWriter:
    """A palette PNG (8-bit indices; 16-bit grey above 256 classes) written row band by row band:
    the same picture as `segmenter.label_image`, but never whole in memory. Written to a temporary
    file beside `path`, renamed on `close`."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, palette: Sequence[Sequence[int]]):
        self.path, self.height, self.width = Path(path), height, width
        self.tmp = temp_path(self.path)
        self.sixteen = len(palette) > 256
        self.rows_written = 0
        self.compressor = zlib.compressobj(6)
        self.file = open(self.tmp, "wb")
        try:
            depth, colour = (16, 0) if self.sixteen else (8, 3)
            self.file.write(b"\x89PNG\r\n\x1a\n")
            self.file.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)))
            if not self.sixteen:
                flat = bytes(int(v) for colour_ in palette for v in colour_)
                self.file.write(_png_chunk(b"PLTE", flat + bytes(768 - len(flat))))
        except BaseException:
            self.abort()
            raise

    def write(self, rows: slice, labels: np.ndarray) -> None:
        if rows.start != self.rows_written:
            raise ValueError(f"bands must come in order: expected row {self.rows_written}, got {rows.start}")
        pixels = labels.astype(">u2" if self.sixteen else np.uint8)
        lines = np.concatenate([np.zeros((len(pixels), 1), np.uint8),  # filter type 0 per line
                                pixels.view(np.uint8).reshape(len(pixels), -1)], axis=1)
        data = self.compressor.compress(lines.tobytes())
        if data:
            self.file.write(_png_chunk(b"IDAT", data))
        self.rows_written = rows.stop

    def close(self) -> None:
        try:
            if self.rows_written != self.height:
                raise ValueError(f"{self.path}: {self.rows_written} of {self.height} rows written")
            self.file.write(_png_chunk(b"IDAT", self.compressor.flush()))
            self.file.write(_png_chunk(b"IEND", b""))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class TiledModel:
    """What tiled prediction needs of a model: the prepared module and its pre-processing."""

    module: nn.Module
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    autocast_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    binary_threshold: float = 0.5  # a one-channel (sigmoid) model's foreground threshold

    @classmethod
    def from_segmenter(cls, segmenter: Any) -> "TiledModel":
        """The runner, classes, normalisation and precision of a `Segmenter`."""
        if segmenter.multitask:
            raise UserError("tiled prediction is for segmentation models; a multi-task model runs without --tile")
        model = segmenter.model
        return cls(segmenter.runner, predicted_classes(model), tuple(segmenter.meta["mean"]),
                   tuple(segmenter.meta["std"]), segmenter.autocast_dtype, segmenter.device,
                   float((getattr(model, "meta", None) or {}).get("binary_threshold", 0.5)))


def tiled_blocks(
    model: TiledModel,
    source: ImageSource,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    window_batch: int = 4,
) -> Iterator[Band]:
    """Softmax probabilities of `source` block by block (`blend_blocks`), windows blended with the
    cosine weight: memory bounded by the tile and the overlap rows, not by the band.

    Args:
        model: the prepared model and its normalisation (`TiledModel.from_segmenter`).
        source: the image, read window by window.
        tile: window side in pixels.
        overlap: pixels shared by neighbouring windows (the stride is `tile - overlap`).
        window_batch: windows per forward pass.
    """
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap {overlap} must be at least 0 and smaller than --tile {tile}")
    if len(model.mean) != source.bands:
        raise UserError(f"the model takes {len(model.mean)} band(s) (its mean/std), the image has {source.bands}; "
                        f"pick bands with --bands")
    mean = torch.tensor(model.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(1, -1, 1, 1)

    def forward(windows: list[Window]) -> dict[str, torch.Tensor]:
        crops = torch.stack([torch.from_numpy(np.ascontiguousarray(source.read(slice(y1, y2), slice(x1, x2))))
                             for y1, y2, x1, x2 in windows]).float()
        x = ((crops - mean) / std).to(model.device)
        return {"out": class_probabilities(forward_outputs(model.module, x, model.autocast_dtype)["out"],
                                          model.binary_threshold).cpu()}

    module = model.module if isinstance(model.module, nn.Module) else None  # an ONNX runner has no modes
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield from blend_blocks(forward, source.height, source.width, (tile, tile),
                                    (tile - overlap, tile - overlap), "cosine", window_batch)
    finally:
        if module is not None:
            module.train(was_training)


def tiled_probabilities(
    model: TiledModel,
    source: ImageSource,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    window_batch: int = 4,
) -> Iterator[Band]:
    """`tiled_blocks` in full-width row bands (each classes x band rows x width floats).

    Args:
        model: the prepared model and its normalisation (`TiledModel.from_segmenter`).
        source: the image, read window by window.
        tile: window side in pixels.
        overlap: pixels shared by neighbouring windows (the stride is `tile - overlap`).
        window_batch: windows per forward pass.
    """
    return row_bands(tiled_blocks(model, source, tile, overlap, window_batch), source.width)


def predict_tiled(
    model: TiledModel,
    source: ImageSource,
    writer: LabelWriter,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    window_batch: int = 4,
    ignore_label: int = IGNORE_LABEL,
) -> dict[int, int]:
    """Segment `source` tile by tile and write its label map band by band; returns pixels per class.

    Pixels without data (`source.valid`) get `ignore_label`. On any error the writer is aborted,
    so no partial output is left under the final name.

    Args:
        model: the prepared model and its normalisation (`TiledModel.from_segmenter`).
        source: the image, read window by window.
        writer: where the labels go (`PngLabelWriter`, `geotiff.GeoTiffLabelWriter`).
        tile: window side in pixels.
        overlap: pixels shared by neighbouring windows.
        window_batch: windows per forward pass.
        ignore_label: the label of pixels without data.
    """
    counts = np.zeros(max(model.num_classes, ignore_label + 1), dtype=np.int64)
    dtype = np.min_scalar_type(len(counts) - 1)
    bands: dict[int, np.ndarray] = {}  # first row -> labels of the band (two bands are open at the bottom)
    filled: dict[int, int] = {}  # first row -> columns labelled so far
    try:
        for block in tiled_blocks(model, source, tile, overlap, window_batch):
            top = block.rows.start
            if top not in bands:
                bands[top], filled[top] = np.zeros((block.rows.stop - top, source.width), dtype), 0
            labels = bands[top]
            labels[:, block.cols] = block.pixels["out"][0].argmax(dim=0).numpy()
            filled[top] += block.cols.stop - block.cols.start
            if filled[top] < source.width:
                continue
            del bands[top], filled[top]
            valid = source.valid(block.rows)
            if valid is not None:
                labels[~valid] = ignore_label
            counts += np.bincount(labels.ravel(), minlength=len(counts))[:len(counts)]
            writer.write(block.rows, labels)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {int(c): int(n) for c, n in enumerate(counts) if n}


# ---- files --------------------------------------------------------------------------------------
GDAL_CACHE_MB = 256  # GDAL's block cache while a GeoTIFF is predicted: a few rows of blocks
AUTO_TILE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit: larger images are predicted in tiles


@contextlib.contextmanager
def huge_images_allowed() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the duration: the user asked for this image."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def image_pixels(path: str | os.PathLike) -> int:
    """Pixels of an image from its header (0 when it cannot be read: the normal path reports that)."""
    from PIL import Image

    from .geotiff import is_geotiff

    if is_geotiff(path):
        try:
            import rasterio

            with rasterio.open(path) as ds:
                return ds.width * ds.height
        except (ImportError, OSError, rasterio.errors.RasterioError):
            pass
    try:
        with huge_images_allowed(), Image.open(path) as img:
            return img.width * img.height
    except (OSError, SyntaxError, ValueError):
        return 0


def wants_tiles(path: str | os.PathLike) -> bool:
    """Automatic tiling: images above `AUTO_TILE_PIXELS` and georeferenced GeoTIFFs."""
    from .geotiff import is_geotiff, is_georeferenced

    return image_pixels(path) > AUTO_TILE_PIXELS or (is_geotiff(path) and is_georeferenced(path))


def read_picture(path: str | os.PathLike, channels: int = 3) -> ArraySource:
    """A PNG/JPEG/... decoded whole (`channels` bytes a pixel) by the one image reader
    (`data.datasets.read_image`: EXIF orientation, grey, alpha, 16-bit), as an `ArraySource`."""
    from ..data.datasets import read_image

    with huge_images_allowed():
        return ArraySource(read_image(path, channels).numpy(), channels_first=True)


def predict_file(
    model: TiledModel,
    path: str | os.PathLike,
    stem: str | os.PathLike,
    palette: Sequence[Sequence[int]],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    bands: Sequence[int] | None = None,
    ignore_label: int = IGNORE_LABEL,
    window_batch: int = 4,
) -> Path:
    """Segment one image file in tiles; returns the label file written.

    A .tif/.tiff is read window by window with rasterio and gives `<stem>_labels.tif`, a GeoTIFF
    with the input's georeferencing and `ignore_label` where the input has no data; any other
    image is decoded whole and gives the palette PNG `<stem>_labels.png`, written band by band.

    Args:
        model: the prepared model and its normalisation (`TiledModel.from_segmenter`).
        path: the image file.
        stem: output path without the `_labels` suffix.
        palette: class colours.
        tile: window side in pixels.
        overlap: pixels shared by neighbouring windows.
        bands: GeoTIFF bands to read (1-based); None for all.
        ignore_label: the label of pixels without data.
        window_batch: windows per forward pass; the outputs of one pass (window_batch x classes x tile^2
            floats, about three times that while the softmax runs) are the largest constant in the memory.
    """
    from .geotiff import GeoTiffLabelWriter, GeoTiffSource, is_geotiff, rasterio_module

    stem = Path(stem)
    if is_geotiff(path):
        rasterio = rasterio_module()
        # GDAL caches every block it reads (default: 5% of RAM): that would grow with the image
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), GeoTiffSource(path, bands) as source:
            out = stem.with_name(stem.name + "_labels.tif")
            predict_tiled(model, source, GeoTiffLabelWriter(out, source, palette, ignore_label), tile, overlap,
                          window_batch, ignore_label)
        return out
    if bands:
        raise UserError(f"{path}: --bands is for GeoTIFF inputs (.tif, .tiff)")
    source = read_picture(path, len(model.mean))
    out = stem.with_name(stem.name + "_labels.png")
    predict_tiled(model, source, PngLabelWriter(out, source.height, source.width, palette), tile, overlap,
                  window_batch, ignore_label)
    return out


def predict_files(
    segmenter: Any,
    files: Sequence[Path],
    stems: Sequence[Path],
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    bands: Sequence[int] | None = None,
    window_batch: int = 4,
) -> Iterator[tuple[Path, Path, list[str]]]:
    """`predict_file` for each image of `files` (output `stems`) with a `Segmenter`'s model; yields
    (image, label file, warnings about it, e.g. a GeoTIFF without georeferencing).

    Args:
        segmenter: the prepared model, its pre-processing and palette.
        files: the images.
        stems: their output paths without the `_labels` suffix.
        tile: window side; None: `DEFAULT_TILE`.
        overlap: pixels shared by neighbouring windows.
        bands: GeoTIFF bands to read (1-based); None for all.
        window_batch: windows per forward pass (fewer: less memory, see `predict_file`).
    """
    from .geotiff import GeoWarning

    model = TiledModel.from_segmenter(segmenter)
    for path, stem in zip(files, stems):
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeoWarning)
            out = predict_file(model, path, stem, segmenter.meta["palette"], tile or DEFAULT_TILE, overlap, bands,
                               window_batch=window_batch)
        yield Path(path), out, [str(w.message) for w in caught if issubclass(w.category, GeoWarning)]
