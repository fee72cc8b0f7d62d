"""`upernet` against transformers' `pipeline("image-segmentation")` on the same images: time and masks.

The model (default: `upernet_convnext_tiny`, 150 classes, random weights; `--model` takes any
source `load_model` does) is written as a transformers folder with `save_huggingface`, then both
segment the same synthetic scenes, fp32 on CPU, whole-image inference, one image at a time:

1. at the model's test-time protocol (keep-ratio resize, 2048x512 unless the model's meta says
   otherwise): ours resizes like mmsegmentation, transformers by its `shortest_edge`/`longest_edge`
   rule (antialiased, long side truncated), so masks may differ near class boundaries;
2. with no resize in either (the images at their own size): the masks must be identical.

Reported per protocol: wall time per image (median) of each, and the share of pixels (and of images)
where the two label maps agree. With random weights many pixels are near-ties between classes, so
the agreement of protocol 1 is a lower bound of what a trained model gives.

    python benchmarks/hf_pipeline.py                       # 50 scenes of 240x320, ConvNeXt-T
    python benchmarks/hf_pipeline.py --model runs/x/model --count 50
    python benchmarks/hf_pipeline.py --smoke               # tiny model, 3 images: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def label_map(entries: list[dict], label2id: dict[str, int], shape: tuple[int, int]) -> np.ndarray:
    """The pipeline's list of {label, mask} as one (H, W) map of class indices (-1 where no mask)."""
    out = np.full(shape, -1, dtype=np.int64)
    for entry in entries:
        out[np.array(entry["mask"]) > 0] = label2id[entry["label"]]
    return out


def run(images: list[Path], segmenter, segment, label2id: dict[str, int]) -> dict:
    """Time both on every image (interleaved) and compare their label maps."""
    ours_s, theirs_s, agree, pixels, identical = [], [], 0, 0, 0
    for image in images:
        start = time.perf_counter()
        ours = segmenter(str(image)).labels
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = label_map(segment(str(image), subtask="semantic"), label2id, ours.shape)
        theirs_s.append(time.perf_counter() - start)
        same = int((ours == theirs).sum())
        agree, pixels, identical = agree + same, pixels + ours.size, identical + (same == ours.size)
    return {"images": len(images), "upernet_s_per_image": statistics.median(ours_s),
            "transformers_s_per_image": statistics.median(theirs_s),
            "pixel_agreement_percent": 100 * agree / pixels, "identical_images": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="upernet_convnext_tiny", help="any source load_model takes")
    parser.add_argument("--count", type=int, default=50, help="number of images (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 small images")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    from transformers import pipeline

    import upernet
    from upernet.data.synthetic import write_synthetic_images
    from upernet.inference.segmenter import Segmenter
    from upernet.loading import save_huggingface

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.smoke:
        model = upernet.build_model("upernet_convnext_tiny", num_classes=5, channels=16, aux_channels=8,
                                    backbone_args={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)})
        args.count, args.size = 3, (48, 64)
    else:
        model = upernet.load_model(args.model)
    model.eval()
    results = {"model": args.model if not args.smoke else "tiny", "threads": args.threads,
               "torch": torch.__version__, "image_size": list(args.size)}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        images = write_synthetic_images(scratch / "images", count=args.count, image_size=tuple(args.size))
        save_huggingface(model, scratch / "hf")
        label2id = json.loads((scratch / "hf" / "config.json").read_text())["label2id"]
        protocols = {"test_time_resize": None, "no_resize": "none"}
        for name, size in protocols.items():
            if size == "none":  # the same folder with transformers' resize off
                processor = json.loads((scratch / "hf" / "preprocessor_config.json").read_text())
                (scratch / "hf" / "preprocessor_config.json").write_text(json.dumps({**processor, "do_resize": False}))
            segmenter = Segmenter(model, device="cpu", precision="fp32", mode="whole", size=size)
            segment = pipeline("image-segmentation", model=str(scratch / "hf"), device="cpu")
            results[name] = run(images, segmenter, segment, label2id)
            print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
