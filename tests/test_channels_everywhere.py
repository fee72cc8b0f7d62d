"""N-channel and one-channel (sigmoid) models everywhere a model runs: the multi-task model, ONNX
export through `Segmenter`, `upernet serve` and `upernet eval` (issue #16 follow-up)."""
import numpy as np
import pytest
import torch

import upernet
from conftest import tiny_model
from upernet import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

FOUR_BANDS = {"mean": [100.0, 110.0, 120.0, 130.0], "std": [50.0, 55.0, 60.0, 65.0]}


def bands(height: int = 40, width: int = 48, channels: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# ---- multi-task ----------------------------------------------------------------------------------
def test_multitask_model_with_four_input_channels(tmp_path):
    model = tiny_model("upernet_multitask", in_channels=4).eval()
    assert model.in_channels == 4
    with torch.no_grad():
        outputs = model(torch.randn(1, 4, 32, 32))
    assert outputs["object"].shape == (1, 5, 32, 32) and outputs["scene"].shape == (1, 6)
    model.save(str(tmp_path / "m"))
    loaded = upernet.load_model(tmp_path / "m")
    assert loaded.in_channels == 4
    torch.testing.assert_close(loaded.eval()(torch.ones(1, 4, 32, 32))["object"],
                               model(torch.ones(1, 4, 32, 32))["object"])
    assert tiny_model("upernet_multitask").in_channels == 3


def test_multitask_segmenter_reads_four_band_images():
    model = tiny_model("upernet_multitask", in_channels=4).eval()
    model.meta.update(FOUR_BANDS)
    result = Segmenter(model, device="cpu", precision="fp32")(bands())
    assert result.tasks["object"].labels.shape == (40, 48)
    assert result.tasks["object"].image.shape == (40, 48, 3)  # the first three bands, for overlays
    with pytest.raises(upernet.UserError, match="model.in_channels=4"):
        Segmenter(model, device="cpu", precision="fp32")(bands(channels=3))
