"""`upernet predict`: outputs, sizes, palette, probabilities, folders, and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import upernet
from upernet.cli import main
from upernet.data.classes import set_meta
from upernet.inference.predict import SAMPLE_IMAGE, overlay_image, save_label_png

NAMES = ["sky", "tree", "grass", "road", "house"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = upernet.build_model("upernet_convnext_tiny", num_classes=5, channels=16, aux_channels=8,
                                backbone_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
    # a large classifier bias spread so that several classes win somewhere
    with torch.no_grad():
        model.decode_head.classifier.weight.mul_(20)
    set_meta(model, class_names=NAMES, palette=[[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200], [90, 90, 90]])
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save(folder)
    return folder


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_predict_folder_writes_labels_overlay_probs(checkpoint, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _image(images / "a.png", (57, 41), 0)
    _image(images / "sub" / "b.jpg", (40, 66), 1)
    (images / "readme.txt").write_text("not an image, and not picked up from a folder")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoint), str(images), "--out", str(out), "--size", "64",
                 "--save-probs", "--batch-workers", "1"])
    assert code == 0
    for stem, (w, h) in (("a", (57, 41)), ("sub/b", (40, 66))):
        labels = Image.open(out / f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (w, h)  # original size, not the 64-pixel inference size
        assert labels.getpalette()[:15] == [10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200, 90, 90, 90]
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width > w and overlay.height >= h  # the legend beside the picture
        probs = np.load(out / f"{stem}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (5, h, w)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        index = np.asarray(labels)
        assert index.max() < 5
        agree = (probs.astype(np.float32).argmax(0) == index).mean()
        assert agree > 0.99  # the same decision, up to float16 ties
    assert not list(out.rglob("readme*"))


def test_predict_matches_inference_api(checkpoint, tmp_path):
    from upernet.inference.modes import infer, load_image, image_to_tensor, normalize

    _image(tmp_path / "x.png", (48, 40), 3)
    main(["predict", "--model", str(checkpoint), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"),
          "--size", "none", "--mode", "slide", "--crop", "32", "32", "--stride", "16", "16", "--batch-workers", "0", "--precision", "fp32"])
    model = upernet.load_model(checkpoint)
    x = normalize(image_to_tensor(load_image(tmp_path / "x.png")), model.meta["mean"], model.meta["std"])
    expected = infer(model, x, mode="slide", crop_size=(32, 32), stride=(16, 16)).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "x_labels.png")), expected)


def test_sample_image_and_repeated_names(checkpoint, tmp_path, capsys):
    assert SAMPLE_IMAGE.is_file() and SAMPLE_IMAGE.stat().st_size < 100_000
    _image(tmp_path / "sample.jpg", (33, 35), 2)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoint), str(tmp_path / "sample.jpg"), "--sample",
                 "--out", str(out), "--size", "none", "--batch-workers", "0"])
    assert code == 0
    assert Image.open(out / "sample_labels.png").size == (33, 35)
    assert Image.open(out / "sample-2_labels.png").size == Image.open(SAMPLE_IMAGE).size
    printed = capsys.readouterr().out
    assert str(out) in printed and "2 image(s)" in printed


def test_overlay_blend_and_legend():
    image = np.full((120, 160, 3), 100, np.uint8)
    labels = np.zeros((120, 160), np.int64)
    labels[:, 80:] = 1
    palette = [[0, 0, 0], [200, 100, 50]]
    plain = np.asarray(overlay_image(image, labels, palette, alpha=0.5))
    assert tuple(plain[0, 0]) == (50, 50, 50) and tuple(plain[119, 159]) == (150, 100, 75)
    with_legend = np.asarray(overlay_image(image, labels, palette, ["a", "b"]))
    assert with_legend.shape[1] > 160 and with_legend.shape[0] == 120  # a panel to the right
    np.testing.assert_array_equal(with_legend[:, :160], plain)  # the picture stays whole


def test_legend_beside_a_small_image_leaves_it_visible():
    image = np.full((128, 128, 3), 100, np.uint8)
    labels = np.arange(128 * 128).reshape(128, 128) % 7
    palette = [[i * 30, 0, 0] for i in range(7)]
    names = ["sky", "water", "shore", "reeds", "pier", "boat", "buoy"]
    out = np.asarray(overlay_image(image, labels, palette, names))
    np.testing.assert_array_equal(out[:128, :128], np.asarray(overlay_image(image, labels, palette)))
    assert out.shape[1] - 128 < 128  # the panel is narrower than the picture


def test_more_than_256_classes_written_as_16_bit(tmp_path):
    labels = np.array([[0, 299], [256, 3]])
    save_label_png(labels, [[0, 0, 0]] * 300, tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), labels)


def test_unknown_model_name(tmp_path, capsys):
    code = main(["predict", "--model", "upernet_nonexistent", "--sample", "--out", str(tmp_path)])
    assert code == 2
    assert "upernet_nonexistent" in capsys.readouterr().err


def test_checkpoint_folder_without_weights(checkpoint, tmp_path, capsys):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    code = main(["predict", "--model", str(folder), "--sample", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "noweights" in err and "model.safetensors" in err


def test_corrupt_image_reported_others_written(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _image(images / "good.png", (36, 34), 4)
    _image(images / "bad.png", (64, 64), 5)
    data = (images / "bad.png").read_bytes()
    (images / "bad.png").write_bytes(data[: len(data) // 3])  # truncated
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoint), str(images), "--out", str(out), "--size", "none",
                 "--batch-workers", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "1 of 2" in err
    assert (out / "good_labels.png").is_file() and not (out / "bad_labels.png").exists()


def test_missing_input_and_bad_size(checkpoint, tmp_path, capsys):
    assert main(["predict", "--model", str(checkpoint), str(tmp_path / "nope.jpg"), "--out", str(tmp_path)]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert main(["predict", "--model", str(checkpoint), "--sample", "--size", "huge", "--out", str(tmp_path)]) == 2
    assert "huge" in capsys.readouterr().err


def test_large_images_resized_in_stripes_agree(checkpoint, tmp_path):
    from upernet.inference.predict import predict

    _image(tmp_path / "in.png", (70, 52), 6)
    model = upernet.load_model(checkpoint)
    for name, limit in (("full", 2 ** 27), ("stripes", 1)):
        predict(model, [tmp_path / "in.png"], tmp_path / name, size="32", save_probs=True, workers=0,
                progress=False, max_full_size=limit)
    full, striped = (np.load(tmp_path / n / "in_probs.npy").astype(np.float32) for n in ("full", "stripes"))
    assert striped.shape == full.shape == (5, 52, 70)
    np.testing.assert_allclose(striped.sum(0), 1.0, atol=5e-3)
    assert np.abs(striped - full).mean() < 0.02  # softmax before vs after the resize: close, not equal
    labels = [np.asarray(Image.open(tmp_path / n / "in_labels.png")) for n in ("full", "stripes")]
    assert (labels[0] == labels[1]).mean() > 0.9
    assert (labels[1] == striped.argmax(0)).mean() > 0.99  # up to float16 ties
