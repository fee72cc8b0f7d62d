"""GeoTIFF in and out for tiled prediction (needs the `upernet[geo]` extra: rasterio).

`GeoTiffSource` reads chosen bands window by window (never the whole raster) and tells which
pixels have no data (nodata value, internal mask or alpha band: GDAL's dataset mask).
`GeoTiffLabelWriter` writes the label raster row band by row band with the input's CRS,
transform (or ground control points) and size, the palette as its colour map, and the ignore
label declared as its nodata value. It writes to a temporary file beside the output and renames
it when complete, so a failed write (a full disk) leaves nothing under the final name.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import MissingFile, UserError
from ..io import temp_path

TIFF_SUFFIXES = (".tif", ".tiff")


class GeoWarning(UserWarning):
    """Something about a GeoTIFF the user should know; the output is still written."""


def rasterio_module() -> Any:
    """rasterio, or a UserError telling how to install it."""
    try:
        import rasterio
    except ImportError:
        raise UserError("reading and writing GeoTIFFs needs rasterio: pip install 'upernet[geo]'") from None
    return rasterio


def is_geotiff(path: str | os.PathLike) -> bool:
    """A .tif/.tiff file (read with rasterio in tiled prediction)."""
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def is_georeferenced(path: str | os.PathLike) -> bool:
    """True for a TIFF with a CRS, a non-identity transform or ground control points (False without rasterio)."""
    try:
        import rasterio
    except ImportError:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return has_georeferencing(ds)
    except rasterio.errors.RasterioError:
        return False


def has_georeferencing(dataset: Any) -> bool:
    """A CRS, a non-identity transform or ground control points."""
    from affine import Affine

    return dataset.crs is not None or dataset.transform != Affine.identity() or bool(dataset.gcps[0])


class GeoTiffSource:
    """A raster read window by window: the `tiles.ImageSource` of a GeoTIFF.

    Args:
        path: the GeoTIFF (or any raster GDAL reads).
        bands: 1-based band numbers to read, in order (None: every band).
    """

    def __init__(self, path: str | os.PathLike, bands: Sequence[int] | None = None):
        rasterio = rasterio_module()
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(f"{self.path}: no such image file")
        try:
            with warnings.catch_warnings():  # our own GeoWarning below says it in one line
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.path)
        except rasterio.errors.RasterioError as e:
            raise UserError(f"{self.path}: cannot read the raster ({e})") from None
        count = self.dataset.count
        self.band_numbers = list(bands) if bands else list(range(1, count + 1))
        bad = [b for b in self.band_numbers if not 1 <= b <= count]
        if bad:
            self.close()
            raise UserError(f"{self.path}: has bands 1-{count}; --bands {' '.join(map(str, bad))} does not exist")
        self.bands, self.height, self.width = len(self.band_numbers), self.dataset.height, self.dataset.width
        from rasterio.enums import MaskFlags

        self.all_valid = all(MaskFlags.all_valid in flags for flags in self.dataset.mask_flag_enums)
        self.georeferenced = has_georeferencing(self.dataset)
        if not self.georeferenced:
            warnings.warn(f"{self.path} has no georeferencing (no CRS, transform or GCPs): the label raster is "
                          f"written without it", GeoWarning, stacklevel=2)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels (bands, h, w) of the window, in the stored dtype."""
        from rasterio.windows import Window

        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        return self.dataset.read(self.band_numbers, window=window)

    def valid(self, rows: slice) -> np.ndarray | None:
        """bool (h, W): False where the raster has no data; None when every pixel has data."""
        if self.all_valid:
            return None
        from rasterio.windows import Window

        return self.dataset.dataset_mask(window=Window(0, rows.start, self.width, rows.stop - rows.start)) != 0

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> "GeoTiffSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GeoTiffLabelWriter:
    """The label raster of `source`, written band by band: the `tiles.LabelWriter` for GeoTIFFs.

    Args:
        path: the output .tif.
        source: the input raster whose size, CRS, transform and GCPs the labels take.
        palette: class colours, written as the colour map (up to 256 classes).
        ignore_label: the label of pixels without data, declared as the raster's nodata value.
    """

    def __init__(self, path: str | os.PathLike, source: GeoTiffSource, palette: Sequence[Sequence[int]],
                 ignore_label: int):
        rasterio = rasterio_module()
        self.path, self.tmp = Path(path), temp_path(path)
        eight_bit = len(palette) <= 256 and ignore_label <= 255
        gcps, gcps_crs = source.dataset.gcps
        profile = {"driver": "GTiff", "height": source.height, "width": source.width, "count": 1,
                   "dtype": "uint8" if eight_bit else "uint16", "nodata": ignore_label, "compress": "deflate",
                   "tiled": True, "blockxsize": 256, "blockysize": 256}
        if gcps and source.dataset.transform.is_identity:
            profile.update(gcps=gcps, crs=gcps_crs)
        elif source.georeferenced:
            profile.update(crs=source.dataset.crs, transform=source.dataset.transform)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.tmp, "w", **profile)
            if eight_bit:
                self.dataset.write_colormap(1, {i: tuple(int(v) for v in c) for i, c in enumerate(palette)})
        except (rasterio.errors.RasterioError, OSError) as e:
            self.abort()
            raise UserError(f"{self.path}: cannot write the label raster ({e})") from None

    def write(self, rows: slice, labels: np.ndarray) -> None:
        from rasterio.windows import Window

        window = Window(0, rows.start, labels.shape[1], rows.stop - rows.start)
        try:
            self.dataset.write(labels.astype(self.dataset.dtypes[0])[None], window=window)
        except (rasterio_module().errors.RasterioError, OSError) as e:
            raise UserError(f"{self.path}: writing the label raster failed ({e}); is the disk full? Nothing was "
                            f"left under that name") from None

    def close(self) -> None:
        try:
            self.dataset.close()  # GDAL flushes its block cache here: a full disk shows up now
            os.replace(self.tmp, self.path)
        except (rasterio_module().errors.RasterioError, OSError) as e:
            self.abort()
            raise UserError(f"{self.path}: writing the label raster failed ({e}); is the disk full? Nothing was "
                            f"left under that name") from None

    def abort(self) -> None:
        dataset = getattr(self, "dataset", None)
        if dataset is not None and not dataset.closed:
            try:
                dataset.close()
            except Exception:  # the write already failed; the temp file goes anyway
                pass
        self.tmp.unlink(missing_ok=True)
        Path(f"{self.tmp}.aux.xml").unlink(missing_ok=True)
