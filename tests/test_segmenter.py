"""`upernet.Segmenter`: inputs, results, the model's protocol, and eval == predict on the same data."""
import numpy as np
import pytest
import torch
from PIL import Image

import upernet
from conftest import tiny_model
from upernet.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, write_synthetic_folder
from upernet.inference.segmenter import Segmentation, Segmenter


@pytest.fixture(scope="module")
def model():
    m = tiny_model("upernet_convnext_tiny", num_classes=7).eval()
    with torch.no_grad():
        m.decode_head.classifier.weight.mul_(20)  # several classes win somewhere
    upernet.data.set_meta(m, class_names=SYNTHETIC_CLASSES, palette=SYNTHETIC_PALETTE)
    return m


def _picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_inputs_results_and_pipeline_format(model, tmp_path):
    seg = upernet.Segmenter(model, device="cpu", precision="fp32", size="none")
    array = _picture(30, 40)
    Image.fromarray(array).save(tmp_path / "x.png")
    from_path, from_pil, from_array = seg([tmp_path / "x.png", Image.fromarray(array), array])
    for result in (from_path, from_pil, from_array):
        assert isinstance(result, Segmentation) and result.labels.shape == (30, 40)
        np.testing.assert_array_equal(result.labels, from_array.labels)
    assert from_array.class_names == list(SYNTHETIC_CLASSES) and from_array.probs is None
    with_probs = seg(array, probs=True)
    assert with_probs.probs.shape == (7, 30, 40)
    np.testing.assert_array_equal(with_probs.probs.argmax(0), with_probs.labels)
    areas = from_array.areas()
    assert abs(sum(areas.values()) - 1) < 1e-9 and list(areas.values()) == sorted(areas.values(), reverse=True)
    assert from_array.overlay(legend=False).size == (40, 30)
    np.testing.assert_array_equal(np.asarray(from_array.overlay())[:30, :40], np.asarray(from_array.overlay(legend=False)))
    pipeline = seg(array, output="pipeline")
    present = np.unique(from_array.labels)
    assert [p["label"] for p in pipeline] == [SYNTHETIC_CLASSES[c] for c in present]
    for entry, c in zip(pipeline, present):
        assert entry["score"] is None and entry["mask"].mode == "L" and entry["mask"].size == (40, 30)
        np.testing.assert_array_equal(np.asarray(entry["mask"]), (from_array.labels == c) * 255)
    with pytest.raises(upernet.UserError, match="output"):
        seg(array, output="json")


def test_model_protocol_is_the_default(model, tmp_path):
    """A model whose meta says test_size 128x128 runs at 128x128 unless told otherwise."""
    model.meta["test_size"] = "128x128"
    try:
        seen = []
        hook = model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
        upernet.Segmenter(model, device="cpu", precision="fp32")(_picture(64, 96))
        assert seen[-1] == (85, 128)  # keep ratio: long side 128
        upernet.Segmenter(model, device="cpu", precision="fp32", size="none")(_picture(64, 96))
        assert seen[-1] == (64, 96)
        from upernet.inference.predict import predict

        Image.fromarray(_picture(64, 96)).save(tmp_path / "p.png")
        predict(model, [tmp_path / "p.png"], tmp_path / "out", workers=0, progress=False, precision="fp32")
        assert seen[-1] == (85, 128)
        hook.remove()
    finally:
        del model.meta["test_size"]


def test_eval_metrics_equal_metrics_of_predict_label_maps(model, tmp_path):
    """The same pre-processing for both: eval's numbers are those of predict's label PNGs, exactly."""
    import yaml

    from upernet.config import load_config
    from upernet.evaluation.evaluate import evaluate_model
    from upernet.evaluation.metrics import confusion_matrix, summarize
    from upernet.inference.predict import predict

    write_synthetic_folder(tmp_path / "data", num_train=1, num_val=4, image_size=(40, 56))
    model.meta["test_size"] = "72x72"  # every image is resized (upscaled, non-integer factor)
    try:
        recipe = {"model": {"name": "upernet_convnext_tiny"}, "val": {"mode": "whole"},
                  "data": {"kind": "folder", "root": str(tmp_path / "data"), "scale": [512, 512],
                           "options": {"classes": list(SYNTHETIC_CLASSES)}}}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        config = load_config(tmp_path / "recipe.yaml", [])
        results = evaluate_model(model, config, device="cpu", precision="fp32", progress=False)
        predict(model, [tmp_path / "data" / "img_dir" / "val"], tmp_path / "pred", workers=0, progress=False,
                precision="fp32")
    finally:
        del model.meta["test_size"]
    confusion = torch.zeros(7, 7, dtype=torch.int64)
    for label_file in sorted((tmp_path / "data" / "ann_dir" / "val").glob("*.png")):
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"{label_file.stem}_labels.png"))
        confusion += confusion_matrix(torch.from_numpy(predicted.astype(np.int64)),
                                      torch.from_numpy(np.asarray(Image.open(label_file)).astype(np.int64)), 7)
    expected = summarize(confusion, SYNTHETIC_CLASSES)
    assert results["settings"]["size"] == (72, 72) and results["settings"]["images"] == 4
    assert repr({k: results[k] for k in expected}) == repr(expected)  # NaN-aware
    assert expected["aAcc"] > 0


def test_eval_and_segmenter_feed_the_model_the_same_tensor(model, tmp_path):
    from upernet.data.build import build_dataset
    from upernet.data.transforms import build_eval_transform

    options = write_synthetic_folder(tmp_path / "data", num_train=1, num_val=3, image_size=(40, 56))
    seg = upernet.Segmenter(model, device="cpu", precision="fp32", size="72x72")
    dataset = build_dataset("folder", tmp_path / "data", "val", build_eval_transform(seg.size, model.meta["mean"],
                                                                                     model.meta["std"]), **options)
    for i in range(len(dataset)):
        sample = dataset[i]
        _, image = seg.preprocessor(sample["path"])
        assert image.shape[-2:] == (51, 72)
        assert torch.equal(image[0], sample["image"])  # bit for bit: one pre-processing


def test_sixteen_bit_grey_is_scaled_not_saturated(model, tmp_path):
    from upernet.data.datasets import read_image
    from upernet.inference.modes import load_image

    ramp = (np.arange(64 * 48, dtype=np.int64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535
    for decoded in (np.asarray(load_image(tmp_path / "grey16.png")), read_image(tmp_path / "grey16.png").permute(1, 2, 0).numpy()):
        np.testing.assert_array_equal(decoded[..., 0], expected)
        assert decoded.max() < 255 and decoded.min() == 0  # not saturated to white
    rgb = Image.fromarray(np.repeat(expected.astype(np.uint8)[..., None], 3, axis=2))
    seg = upernet.Segmenter(model, device="cpu", precision="fp32", size="none")
    np.testing.assert_array_equal(seg(tmp_path / "grey16.png").labels, seg(rgb).labels)
    wide = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I")
    with pytest.raises(upernet.UserError, match="0..65535"):
        seg(wide)


def test_cuda_without_gpu_is_one_user_error(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error case cannot happen here")
    with pytest.raises(upernet.UserError, match="device 'cuda'"):
        Segmenter(model, device="cuda")


def test_fresh_model_has_class_names():
    model = tiny_model("upernet_r50", num_classes=3)
    assert model.meta["class_names"] == ["class_0", "class_1", "class_2"]
    result = upernet.Segmenter(model, device="cpu", precision="fp32", size="none")(_picture(20, 24))
    assert set(result.areas()) <= {"class_0", "class_1", "class_2"}


def test_default_inputs_follow_the_model_domain(model, tmp_path, monkeypatch):
    from upernet.inference.predict import SAMPLE_IMAGE, default_inputs

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    scenes = default_inputs(model, count=2)
    assert len(scenes) == 2 and all(Image.open(p).size == (128, 128) for p in scenes)
    assert default_inputs(tiny_model("upernet_r50", num_classes=3)) == [SAMPLE_IMAGE]


def test_predict_reports_unreadable_image_once_and_prints_nothing(model, tmp_path, capsys):
    from upernet.inference.predict import predict

    Image.fromarray(_picture(20, 20)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    result = predict(model, [tmp_path / "good.png", tmp_path / "bad.png"], tmp_path / "out", size="none",
                     workers=0, progress=False, precision="fp32")
    assert [f.name for f, _ in result.failures] == ["bad.png"] and len(result.written) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_multitask_segmenter_and_predict_options(tmp_path):
    from upernet.inference.predict import predict

    model = tiny_model("upernet_multitask_r50").eval()
    seg = upernet.Segmenter(model, device="cpu", precision="fp32", flip=True, mode="slide", crop_size=(24, 24),
                            stride=(16, 16))
    result = seg(_picture(40, 36))
    assert set(result.tasks) == {"object", "part", "material"} and set(result.image_labels) == {"scene", "texture"}
    assert result.tasks["object"].labels.shape == (40, 36)
    Image.fromarray(_picture(40, 36)).save(tmp_path / "m.png")
    predict(model, [tmp_path / "m.png"], tmp_path / "out", size="32", save_probs=True, workers=0, progress=False,
            precision="fp32")
    assert Image.open(tmp_path / "out" / "m_object.png").size == (36, 40)
    assert np.load(tmp_path / "out" / "m_material_probs.npy").shape == (4, 40, 36)
    assert (tmp_path / "out" / "m_part_overlay.png").is_file() and (tmp_path / "out" / "m_labels.json").is_file()
