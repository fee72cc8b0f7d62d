"""ONNX export with dynamic height and width, and running the exported file in onnxruntime.

The obstacle to a dynamic-size UPerNet in ONNX is the pyramid pooling's adaptive average pooling,
whose bins depend on the input size (mmsegmentation and optimum export it for one fixed size only).
The export runs the prepared model (`prepare_for_inference`, float32); during export the head's
pooling builds its bins as averaging matrices from the runtime shape (`adaptive_avg_pool2d_exportable`),
its concat convs run as "literal" and every resize is recorded, so one file serves every input size.
The model's `config` and `meta` (class names, palette, normalisation) travel in
the ONNX metadata, so `upernet predict --model file.onnx` needs nothing else.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import MissingFile, UserError
from ..models.upernet import UPerNet
from .prepare import prepare_for_inference

INPUT, OUTPUT = "images", "logits"


def export_onnx(
    model: UPerNet,
    path: str | os.PathLike,
    shape: Sequence[int] = (512, 512),
    dynamic: bool = True,
    opset: int = 17,
) -> Path:
    """Write `model` (float32, BN folded, no auxiliary head) as ONNX; returns the path.

    Args:
        model: the model to export (left untouched).
        path: the .onnx file to write.
        shape: (H, W) of the example input; the only size accepted unless `dynamic`.
        dynamic: batch, height and width as dynamic axes.
        opset: ONNX opset version.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise MissingFile(f"{path}: the folder {path.parent} does not exist")
    fast = prepare_for_inference(model.cpu(), "fp32", channels_last=False)
    images = torch.randn(1, getattr(model, "in_channels", 3), *shape)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notes about the shape arithmetic
        torch.onnx.export(fast, (images,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: axes, OUTPUT: axes} if dynamic else None,
                          opset_version=opset, dynamo=False)
    _write_metadata(path, model)
    return path


def _write_metadata(path: Path, model: UPerNet) -> None:
    import onnx

    proto = onnx.load(str(path))
    values = {"upernet_config": model.config, "upernet_meta": model.meta, "upernet_num_classes": model.num_classes}
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for the file (threads: torch's count by default)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own error types for invalid files
        raise UserError(f"{path}: onnxruntime cannot load it ({e})") from None


def input_channels(session) -> int:
    """Channels of the images an ONNX session takes: dim 1 of its input, fixed at export."""
    channels = session.get_inputs()[0].shape[1]
    if not isinstance(channels, int):
        raise UserError(f"the ONNX model's input has a dynamic channel axis ({channels!r}): export it with "
                        f"`upernet export`, which fixes it to the model's in_channels")
    return channels


class OnnxModel:
    """An exported model behind the call signature of ours: images (N, C, H, W) -> {"out": logits}.

    Carries `meta` and `config` from the file's metadata and `in_channels` from its input, so
    prediction code can treat it like a loaded UPerNet (it is always in eval mode and runs on the
    CPU). A one-channel (sigmoid) model's `meta["binary_threshold"]` travels in the meta.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        self.session = onnx_session(self.path, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = json.loads(props.get("upernet_meta", "{}"))
        self.config = json.loads(props.get("upernet_config", "{}"))
        if "upernet_num_classes" not in props:
            raise UserError(f"{self.path}: not exported by `upernet export` (no upernet_num_classes metadata)")
        self.num_classes = int(props["upernet_num_classes"])
        self.in_channels = input_channels(self.session)
        self.training = False

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.session.run([OUTPUT], {INPUT: images.detach().float().cpu().numpy()})[0]
        return {"out": torch.from_numpy(logits)}

    def eval(self) -> "OnnxModel":
        return self

    def to(self, device: str | torch.device) -> "OnnxModel":
        if torch.device(device).type != "cpu":
            raise UserError(f"{self.path}: ONNX models run on the CPU through onnxruntime, not on {device}")
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise UserError(f"{self.path}: an ONNX model cannot be trained")
        return self


def check_onnx(model: UPerNet, path: str | os.PathLike, shapes: Sequence[Sequence[int]], batch: int = 1) -> list[float]:
    """Max abs difference between onnxruntime and PyTorch logits at each (H, W) in `shapes`."""
    onnx_model = OnnxModel(path)
    diffs = []
    model = model.eval()
    for shape in shapes:
        images = torch.randn(batch, getattr(model, "in_channels", 3), *shape)
        with torch.no_grad():
            expected = model(images)["out"].numpy()
        diffs.append(float(np.abs(onnx_model(images)["out"].numpy() - expected).max()))
    return diffs
