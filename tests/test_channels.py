"""Image input beyond 8-bit RGB: grey, RGBA, 16-bit, TIFF and multi-band images, `model.in_channels`
on every backbone family, and RGB weights adapted to the model's input channels."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import upernet
from conftest import tiny_model
from upernet.config import ConfigNote, load_config
from upernet.data import transforms
from upernet.data.build import build_dataset
from upernet.data.datasets import read_image
from upernet.data.transforms import build_eval_transform, build_train_transform
from upernet.models.weights import adapt_input_channels, input_convs

tifffile = pytest.importorskip("tifffile")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["upernet_r50", "upernet_convnext_tiny", "upernet_swin_tiny", "upernet_internimage_t", "upernet_timm"]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the "said once" notes as a new run would."""
    monkeypatch.setattr(transforms, "NOTES_GIVEN", set())


# ---- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("channels", [1, 4])
def test_every_family_builds_with_in_channels(name, channels):
    model = tiny_model(name, in_channels=channels).eval()
    assert model.in_channels == channels
    (key, taken), = input_convs(model).items()
    assert model.state_dict()[key].shape[1] == taken == channels
    with torch.no_grad():
        out = model(torch.randn(1, channels, 32, 32))["out"]
    assert out.shape == (1, 5, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_rgb_weights_are_adapted_by_timms_rule(name):
    """1 channel: the sum of the RGB filters; N channels: RGB repeated and scaled by 3 / N."""
    rgb = tiny_model(name).state_dict()
    (key, _), = input_convs(tiny_model(name)).items()
    weight = rgb[key].clone()
    for channels, expected in ((1, weight.sum(1, keepdim=True)),
                               (4, torch.cat([weight, weight[:, :1]], 1) * 3 / 4),
                               (7, torch.cat([weight, weight, weight[:, :1]], 1) * 3 / 7)):
        state = dict(rgb)
        model = tiny_model(name, in_channels=channels)
        assert adapt_input_channels(state, model) == [key]
        torch.testing.assert_close(state[key], expected)
        model.load_state_dict(state)  # everything else fits as it is
    state = dict(rgb)
    assert adapt_input_channels(state, tiny_model(name)) == [] and state[key] is rgb[key]


def test_only_rgb_weights_are_adapted():
    state = tiny_model("upernet_swin_tiny", in_channels=4).state_dict()
    with pytest.raises(upernet.UserError, match="in_channels=4"):
        adapt_input_channels(state, tiny_model("upernet_swin_tiny", in_channels=2))


def test_backbone_checkpoint_of_rgb_weights_is_adapted(tmp_path):
    from upernet.training.tasks import load_backbone_checkpoint

    source = tiny_model("upernet_convnext_tiny").backbone.state_dict()
    torch.save(source, tmp_path / "backbone.pt")
    model = tiny_model("upernet_convnext_tiny", in_channels=1, seed=1)
    load_backbone_checkpoint(model.backbone, str(tmp_path / "backbone.pt"))
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded["body.stem_0.weight"], source["body.stem_0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["body.stages_1.blocks.0.conv_dw.weight"],
                               source["body.stages_1.blocks.0.conv_dw.weight"])


def test_internimage_classification_checkpoint_is_adapted(tmp_path):
    from upernet.models.backbones.internimage import load_classification_checkpoint

    source = tiny_model("upernet_internimage_t").backbone.state_dict()
    torch.save({"model": {**source, "head.weight": torch.zeros(10, 64)}}, tmp_path / "in1k.pth")
    backbone = tiny_model("upernet_internimage_t", in_channels=4, seed=1).backbone
    load_classification_checkpoint(backbone, tmp_path / "in1k.pth")
    weight = source["patch_embed.conv1.weight"]
    torch.testing.assert_close(backbone.patch_embed.conv1.weight.data, torch.cat([weight, weight[:, :1]], 1) * 3 / 4)


def test_timm_pretrained_weights_are_adapted_by_timm(tmp_path):
    """`pretrained_backbone` with other input channels: timm adapts its own weights (a local file here)."""
    import timm

    args = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}
    source = timm.create_model("convnext_tiny", **args).state_dict()
    torch.save(source, tmp_path / "convnext.pth")
    model = upernet.build_model("upernet_convnext_tiny", num_classes=3, in_channels=2, pretrained_backbone=True,
                                channels=16, aux_channels=8,
                                backbone_args={**args, "pretrained_cfg_overlay": {"file": str(tmp_path / "convnext.pth")}})
    weight = source["stem.0.weight"]
    torch.testing.assert_close(model.backbone.body.stem_0.weight.data, weight[:, :2] * 3 / 2)


def test_saved_model_rebuilds_with_its_channels(tmp_path):
    model = tiny_model("upernet_convnext_tiny", in_channels=4)
    model.save(tmp_path / "m")
    assert upernet.load_model(tmp_path / "m").in_channels == 4


# ---- reading images ----------------------------------------------------------------------------
def test_grey_rgba_and_sixteen_bit_pngs(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert torch.equal(read_image(tmp_path / "grey.png", 1), torch.from_numpy(grey)[None])
    assert torch.equal(read_image(tmp_path / "grey.png"), torch.from_numpy(grey)[None].repeat(3, 1, 1))

    rgba = np.random.default_rng(0).integers(0, 256, (12, 10, 4), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(rgba, mode="RGBA").save(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert torch.equal(first, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)) and torch.equal(first, second)
    notes = [w for w in caught if issubclass(w.category, ConfigNote)]
    assert len(notes) == 1 and "alpha" in str(notes[0].message)  # once, not per image
    assert torch.equal(read_image(tmp_path / "a.png", 4), torch.from_numpy(rgba).permute(2, 0, 1))  # RGBA as 4 bands

    wide = (np.arange(12 * 10, dtype=np.int64).reshape(12, 10) * 541).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    expected = torch.from_numpy(((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert torch.equal(read_image(tmp_path / "grey16.png", 1)[0], expected)


def test_tiffs_sixteen_bit_and_multi_band(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    expected = torch.from_numpy(((rgb16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "rgb16.tif"), expected)

    bands = rng.integers(0, 256, (9, 11, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "contig.tif", bands, planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tiff", bands.transpose(2, 0, 1), planarconfig="separate",
                     photometric="minisblack")
    for name in ("contig.tif", "planar.tiff"):
        assert torch.equal(read_image(tmp_path / name, 5), torch.from_numpy(bands).permute(2, 0, 1))
    with pytest.raises(upernet.UserError, match=r"contig.tif.*5-band.*model.in_channels=3"):
        read_image(tmp_path / "contig.tif")
    tifffile.imwrite(tmp_path / "float.tif", rng.random((9, 11, 5), dtype=np.float32))
    with pytest.raises(upernet.UserError, match="float.tif.*float32"):
        read_image(tmp_path / "float.tif", 5)


def _folder(root, write_image, count=2, size=(24, 32)):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            write_image(root / "img_dir" / split / f"{i}", rng)
            Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(root / "ann_dir" / split / f"{i}.png")


def _five_band_tiff(stem, rng):
    tifffile.imwrite(stem.with_suffix(".tif"), rng.integers(0, 65536, (24, 32, 5), dtype=np.uint16), planarconfig="contig")


def test_multi_band_tiffs_through_the_folder_dataset_and_predict(tmp_path):
    _folder(tmp_path / "data", _five_band_tiff)
    mean, std = [100.0] * 5, [50.0] * 5
    train = build_dataset("folder", tmp_path / "data", "train", build_train_transform((16, 16), (32, 24), mean=mean,
                                                                                      std=std), channels=5, classes=3)
    sample = train[0]
    assert sample["image"].shape == (5, 16, 16) and sample["label"].shape == (16, 16)
    val = build_dataset("folder", tmp_path / "data", "val", build_eval_transform(None, mean, std), channels=5, classes=3)
    assert val[1]["image"].shape == (5, 24, 32)

    model = tiny_model("upernet_convnext_tiny", num_classes=3, in_channels=5)
    model.meta = {**model.meta, "mean": mean, "std": std, "class_names": ["a", "b", "c"]}
    from upernet.inference.predict import predict

    result = predict(model, [tmp_path / "data" / "img_dir" / "val"], tmp_path / "out", size="none", device="cpu",
                     precision="fp32", workers=0, progress=False)
    assert not result.failures and len(result.written) == 2
    labels = np.asarray(Image.open(tmp_path / "out" / "0_labels.png"))
    assert labels.shape == (24, 32)
    # the same pixels as the dataset's pre-processing: one reader, one pre-processing
    segmenter = upernet.Segmenter(model, device="cpu", precision="fp32", size="none")
    _, image = segmenter.preprocessor(tmp_path / "data" / "img_dir" / "val" / "1.tif")
    assert torch.equal(image[0], val[1]["image"])


@pytest.mark.parametrize("kind", ["grey", "rgba", "grey16"])
def test_grey_rgba_and_sixteen_bit_through_the_folder_dataset_and_predict(tmp_path, kind):
    def write(stem, rng):
        if kind == "grey":
            Image.fromarray(rng.integers(0, 256, (24, 32), dtype=np.uint8)).save(stem.with_suffix(".png"))
        elif kind == "rgba":
            Image.fromarray(rng.integers(0, 256, (24, 32, 4), dtype=np.uint8), mode="RGBA").save(stem.with_suffix(".png"))
        else:
            Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)).save(stem.with_suffix(".png"))

    _folder(tmp_path / "data", write)
    channels = 1 if kind == "grey" else 3
    mean, std = [120.0] * channels, [60.0] * channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        val = build_dataset("folder", tmp_path / "data", "val", build_eval_transform(None, mean, std),
                            channels=channels, classes=3)
        assert val[0]["image"].shape == (channels, 24, 32)
        model = tiny_model("upernet_r50", num_classes=3, in_channels=channels)
        model.meta = {**model.meta, "mean": mean, "std": std}
        from upernet.inference.predict import predict

        result = predict(model, [tmp_path / "data" / "img_dir" / "val"], tmp_path / "out", size="none", device="cpu",
                         precision="fp32", workers=0, progress=False)
    assert not result.failures and len(result.written) == 2
    assert np.asarray(Image.open(tmp_path / "out" / "1_labels.png")).shape == (24, 32)
    assert Image.open(tmp_path / "out" / "1_overlay.png").mode == "RGB"
    alpha_notes = [w for w in caught if issubclass(w.category, ConfigNote) and "alpha" in str(w.message)]
    assert len(alpha_notes) == (1 if kind == "rgba" else 0)


# ---- configuration -----------------------------------------------------------------------------
def test_mean_and_std_need_one_entry_per_channel():
    with pytest.raises(upernet.UserError, match=r"data.mean has 3 entries but model.in_channels=4"):
        load_config("builtin", ["model.in_channels=4"])
    config = load_config("builtin", ["model.in_channels=4", "data.mean=[1,2,3,4]", "data.std=[5,6,7,8]"])
    assert config.model.in_channels == 4 and config.data.std == (5.0, 6.0, 7.0, 8.0)
    assert load_config("builtin").data.mean == (123.675, 116.28, 103.53)


def test_rgb_dataset_kinds_refuse_other_channels():
    with pytest.raises(upernet.UserError, match="model.in_channels=4 needs data.kind=folder"):
        build_dataset("synthetic", None, "train", channels=4)


def test_photometric_distortion_on_multi_band_images():
    image = torch.randint(0, 256, (4, 16, 16), dtype=torch.uint8)
    out = transforms.photometric_distortion(image, generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape and out.dtype == torch.uint8


@pytest.mark.slow
def test_onnx_export_of_a_four_channel_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from upernet.inference.export import check_onnx, export_onnx

    model = tiny_model("upernet_convnext_tiny", in_channels=4).eval()
    path = export_onnx(model, tmp_path / "m.onnx", shape=(32, 32))
    assert max(check_onnx(model, path, [(32, 32)])) < 1e-4


def test_train_on_four_band_tiffs_from_an_rgb_backbone_checkpoint(tmp_path):
    """The whole path: recipe -> folder of 4-band TIFFs -> RGB backbone weights adapted -> saved model
    that predicts a TIFF."""
    from upernet.training.loop import train

    def write(stem, rng):
        tifffile.imwrite(stem.with_suffix(".tif"), rng.integers(0, 256, (24, 32, 4), dtype=np.uint8),
                         planarconfig="contig")

    _folder(tmp_path / "data", write, count=4)
    rgb = upernet.build_model("upernet_timm", model_name="test_convnext", num_classes=3, channels=16, aux_channels=8)
    torch.save(rgb.backbone.state_dict(), tmp_path / "backbone.pt")
    config = load_config(None, [
        "model.args={model_name: test_convnext, channels: 16, aux_channels: 8}", "model.in_channels=4",
        f"model.backbone_checkpoint={tmp_path / 'backbone.pt'}", "data.kind=folder", f"data.root={tmp_path / 'data'}",
        "data.options={classes: 3}", "data.mean=[100,100,100,100]", "data.std=[50,50,50,50]",
        "data.crop_size=[16,16]", "data.scale=[32,24]", "data.batch_size=2", "data.workers=0", "schedule.iters=1",
        "val.interval=0", "val.max_images=1", "train.log_interval=1", "train.checkpoint_interval=1"])
    assert config.model.name == "upernet_timm"
    train(config, tmp_path / "run", progress=False)
    model = upernet.load_model(tmp_path / "run" / "model")
    assert model.in_channels == 4 and len(model.meta["mean"]) == 4
    labels = upernet.Segmenter(model, device="cpu", precision="fp32")(tmp_path / "data" / "img_dir" / "val" / "0.tif").labels
    assert labels.shape == (24, 32)
