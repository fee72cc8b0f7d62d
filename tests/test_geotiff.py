"""GeoTIFF in and out of tiled prediction: georeferencing copied, multi-band input, nodata as the
ignore label, a raster without georeferencing, a write that fails half way."""
import errno

import numpy as np
import pytest
import torch
from torch import nn

from upernet.cli import main
from upernet.inference.geotiff import GeoTiffLabelWriter, GeoTiffSource, GeoWarning
from upernet.inference.tiles import IGNORE_LABEL, ArraySource, TiledModel, predict_file, predict_tiled

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
TRANSFORM = from_origin(600000.0, 5200000.0, 0.5, 0.5)


class BandThreshold(nn.Module):
    """Class 1 where band 0 > band 1, else 0 (class 2 never): labels that tiling must not change."""

    def forward(self, x):
        diff = x[:, :1] - x[:, 1:2]
        return torch.cat([-diff, diff, torch.full_like(diff, -10.0)], dim=1)


def write_raster(path, bands, georeferenced=True, nodata=None):
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2], "count": bands.shape[0],
               "dtype": bands.dtype.name, "nodata": nodata}
    if georeferenced:
        profile.update(crs=CRS.from_epsg(32632), transform=TRANSFORM)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)


def scene(bands=4):
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, (bands, 200, 300)).astype(np.uint16)


def model(bands):
    return TiledModel(BandThreshold(), 3, (0.0,) * bands, (1.0,) * bands)


def test_labels_keep_georeferencing_and_mark_nodata(tmp_path):
    data = scene(4)
    data[:, 150:, :40] = 9999  # a nodata corner
    write_raster(tmp_path / "in.tif", data, nodata=9999)
    out = predict_file(model(2), tmp_path / "in.tif", tmp_path / "in", PALETTE, tile=64, overlap=16, bands=[3, 1])
    assert out == tmp_path / "in_labels.tif"
    with rasterio.open(out) as ds:
        labels = ds.read(1)
        assert ds.crs == CRS.from_epsg(32632) and ds.transform == TRANSFORM
        assert (ds.width, ds.height, ds.nodata, ds.dtypes[0]) == (300, 200, IGNORE_LABEL, "uint8")
        assert ds.colormap(1)[1] == (255, 0, 0, 255)
    expected = (data[2].astype(int) > data[0]).astype(np.uint8)  # bands 3 and 1, in that order
    expected[150:, :40] = IGNORE_LABEL
    assert np.array_equal(labels, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "in_labels.tif"]


def test_band_count_must_match_the_model(tmp_path):
    write_raster(tmp_path / "in.tif", scene(4))
    with pytest.raises(ValueError, match="takes 3 band.*has 4; pick bands with --bands"):
        predict_file(model(3), tmp_path / "in.tif", tmp_path / "in", PALETTE, tile=64, overlap=16)
    with pytest.raises(ValueError, match="bands 1-4; --bands 7"):
        predict_file(model(2), tmp_path / "in.tif", tmp_path / "in", PALETTE, bands=[1, 7])


def test_raster_without_georeferencing_warns_and_still_writes(tmp_path):
    write_raster(tmp_path / "plain.tif", scene(2), georeferenced=False)
    with pytest.warns(GeoWarning, match="plain.tif has no georeferencing"):
        out = predict_file(model(2), tmp_path / "plain.tif", tmp_path / "plain", PALETTE, tile=64, overlap=16)
    with rasterio.open(out) as ds:
        assert ds.crs is None and ds.read(1).shape == (200, 300)


def test_full_disk_leaves_no_output(tmp_path, monkeypatch):
    write_raster(tmp_path / "in.tif", scene(2))
    calls = {"n": 0}
    real_write = rasterio.io.DatasetWriter.write

    def fill_up(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", fill_up)
    with pytest.raises(ValueError, match=r"in_labels.tif: writing the label raster failed .*No space left.*disk full"):
        predict_file(model(2), tmp_path / "in.tif", tmp_path / "in", PALETTE, tile=64, overlap=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_writer_streams_bands_of_an_array_source(tmp_path):
    write_raster(tmp_path / "in.tif", scene(2))
    with GeoTiffSource(tmp_path / "in.tif") as source:
        image = np.stack([source.read(slice(0, 200), slice(0, 300))[b] for b in range(2)], axis=-1)
        writer = GeoTiffLabelWriter(tmp_path / "out.tif", source, PALETTE, IGNORE_LABEL)
        predict_tiled(model(2), ArraySource(image.astype(np.float32)), writer, tile=48, overlap=12)
    with rasterio.open(tmp_path / "out.tif") as ds:
        assert np.array_equal(ds.read(1), (image[..., 0].astype(int) > image[..., 1]).astype(np.uint8))


def test_cli_predicts_a_georeferenced_tiff_in_tiles_automatically(tmp_path, capsys):
    import upernet
    from conftest import tiny_model

    upernet.save_model(tiny_model("upernet_r50"), tmp_path / "model")
    write_raster(tmp_path / "field.tif", np.random.default_rng(1).integers(0, 255, (3, 90, 120)).astype(np.uint8))
    assert main(["predict", str(tmp_path / "field.tif"), "--model", str(tmp_path / "model"), "--out",
                 str(tmp_path / "out"), "--precision", "fp32", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "predicted in 512 px tiles" in captured.err and "field_labels.tif" in captured.out
    with rasterio.open(tmp_path / "out" / "field_labels.tif") as ds:
        assert ds.crs == CRS.from_epsg(32632) and ds.read(1).max() < 5
