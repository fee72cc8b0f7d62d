"""`upernet predict | train | eval | convert | export | bench | serve | info | plot | data`.

The command line only turns arguments into objects, calls the library and prints. Every verb that
takes a model takes it the same way: `--model MODEL` (a registered name, a model folder, a Hugging
Face folder, a training checkpoint, a run folder, any checkpoint `convert` reads, and an `.onnx`
file where the verb can run one). A `UserError` (bad input the user can fix) is printed as one line
with exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from . import __version__
from .config import ConfigNote
from .errors import UserError

MODEL_HELP = ("a registered name (upernet info --list), a model folder, a Hugging Face UperNet folder, a training "
              "checkpoint (.pt of upernet train), a run folder, any checkpoint `upernet convert` reads, or a "
              "Hugging Face Hub id org/name")


# ---- shared options -------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (checked for availability when the model is placed)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")


def add_model(p: argparse.ArgumentParser, positional: bool = False, onnx: bool = False, aliases: tuple = ()) -> None:
    """`--model MODEL` (plus the verb's old spellings); `positional` also takes it as the first argument."""
    what = MODEL_HELP + (", or an .onnx file of `upernet export`" if onnx else "")
    if positional:
        p.add_argument("model_arg", nargs="?", metavar="MODEL", help=what)
    p.add_argument("-m", "--model", *aliases, dest="model", metavar="MODEL",
                   help=what if not positional else "the same as MODEL")
    p.add_argument("--revision", metavar="REV", help="of a Hub id: branch, tag or commit (default: main)")


def add_runtime(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", type=device_name, default="auto", metavar="DEVICE",
                       help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch CPU threads (default: torch's choice; on a busy machine 1 is often faster)")


def add_precision(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=default,
                   help="auto: bf16 where the CPU/GPU runs it natively (AVX512-BF16/AMX, recent GPUs), else fp32"
                        f" (default: {default})")


def add_dcnv3_kernel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dcnv3-kernel", choices=("torch", "compiled"), default="torch",
                   help="InternImage models on CPU: 'compiled' samples DCNv3 with a C++ kernel built on first use "
                        "(needs a C++ compiler and ninja; same results, faster); default: plain PyTorch")


def model_source(args: argparse.Namespace, required: bool = True) -> str | None:
    """The model the user named, whichever spelling they used."""
    given = [v for v in (getattr(args, "model_arg", None), args.model) if v]
    if len(given) == 2 and given[0] != given[1]:
        raise UserError(f"two models given ({given[0]} and --model {given[1]}); give one")
    if not given and required:
        raise UserError("no model given: pass --model MODEL (" + MODEL_HELP + ")")
    if given and getattr(args, "revision", None):  # a Hub id at a revision: org/name@REV
        return f"{given[0]}@{args.revision}"
    return given[0] if given else None


def open_model(source: str, onnx: bool = False) -> Any:
    """The model `source` names; an `.onnx` file where the verb can run one, else a clear refusal."""
    from pathlib import Path

    if Path(source).suffix.lower() == ".onnx":
        if not onnx:
            raise UserError(f"{source}: an ONNX file cannot be used here; give the PyTorch model it was exported from")
        if not Path(source).is_file():
            raise UserError(f"{source}: no such ONNX file")
        from .inference.export import OnnxModel

        return OnnxModel(source)
    from .loading import load_model

    return load_model(source)


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; CUDA asked for without a GPU is the user's to fix."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def apply_runtime(args: argparse.Namespace) -> None:
    """--threads and --dcnv3-kernel, for the verbs that have them."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "dcnv3_kernel", "torch") != "torch":
        from .ops.dcnv3 import set_dcnv3_kernel

        try:
            set_dcnv3_kernel(args.dcnv3_kernel)
        except RuntimeError as e:
            raise UserError(f"--dcnv3-kernel {args.dcnv3_kernel}: {e}") from None


def split_overrides(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A `key=value` in the recipe's place is an override (`upernet train optim.lr=0.1`)."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config] + overrides
    return config, overrides


def say(text: str) -> None:
    """Progress notes go to stderr, results to stdout."""
    print(text, file=sys.stderr, flush=True)


# ---- predict --------------------------------------------------------------------------------
def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images: label-map PNGs, colour overlays, probabilities",
                       description="Segment image files or folders. Per image writes <name>_labels.png (palette PNG "
                                   "of class indices at the image's size), <name>_overlay.png and with --save-probs "
                                   "<name>_probs.npy. The model's own test-time protocol (resize rule, slide "
                                   "settings) is used unless overridden.")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER",
                   help="image files and folders (searched recursively); none: sample images of the model's domain")
    add_model(p, onnx=True)
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: the model's, else whole)")
    p.add_argument("--crop", nargs=2, type=positive_int, metavar=("H", "W"), help="slide window (default: the model's, else 512 512)")
    p.add_argument("--stride", nargs=2, type=positive_int, metavar=("H", "W"), help="slide step (default: the model's, else 341 341)")
    p.add_argument("--size", default="meta",
                   help="resize before inference: 'none', a short side like 512, or a keep-ratio scale like "
                        "2048x512 (default: the model's test size, else 2048x512)")
    p.add_argument("--multi-scale", action="store_true", help="average scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--scales", nargs="+", type=float, metavar="RATIO", help="custom scale ratios to average")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--save-probs", action="store_true", help="write <name>_probs.npy (float16, C x H x W)")
    p.add_argument("--batch-workers", type=int, metavar="N", help="image decoding processes (default: min(2, CPUs))")
    p.add_argument("--sample", action="store_true", help="also segment the sample images")
    add_precision(p)
    p.add_argument("--no-legend", action="store_true", help="no class legend beside the overlays")
    add_runtime(p)
    add_dcnv3_kernel(p)
    add_tiles(p)
    add_predict_engine(p)
    p.set_defaults(handler=run_predict)


# ---- predict --engine ray (inference/batch.py) -----------------------------------------------------
def add_predict_engine(p) -> None:
    g = p.add_argument_group("batch prediction on Ray (pip install 'upernet[ray]'; see docs/scale.md)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data actors, resumable, with out/manifest.jsonl")
    g.add_argument("--address", help="Ray cluster address (auto, HOST:PORT, ray://HOST:10001; default: a local one)")
    g.add_argument("--actors", type=positive_int, default=1, help="model actors, each loads the model once (default: 1)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="images per actor call (default: 1)")


def run_predict_ray(args, source: str, inputs: list[str]) -> None:
    from .inference.batch import predict_ray
    from .inference.modes import MS_RATIOS

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'upernet[ray]'") from None
    if not inputs:
        raise UserError("--engine ray: give the images (files, folders, list files or URIs) to segment")
    result = predict_ray(
        source, inputs, args.out, address=args.address, actors=args.actors, batch_size=args.batch_size,
        save_probs=args.save_probs, legend=not args.no_legend, mode=args.mode, crop_size=args.crop,
        stride=args.stride, size=None if args.size == "meta" else args.size,
        scales=args.scales or (MS_RATIOS if args.multi_scale else (1.0,)), flip=args.flip,
        device=args.device, precision=args.precision)  # "auto" resolved on each actor's node
    print(f"wrote {len(result.written)} image(s) to {result.out_dir}, skipped {len(result.skipped)} done before; "
          f"manifest {result.manifest}")
    if result.failures:
        total = len(result.written) + len(result.failures)
        raise UserError(f"{len(result.failures)} of {total} image(s) failed (see {result.manifest}): "
                        + "; ".join(message for _, message in result.failures[:5]))


def run_predict(args) -> None:
    from pathlib import Path

    from .inference.modes import MS_RATIOS
    from .inference.predict import SAMPLE_IMAGE, default_inputs, predict

    source = model_source(args)
    device = resolve_device(args.device)
    if not Path(source).exists() and not source.endswith(".onnx") and "/" not in source:
        say(f"warning: {source} is a model name, not a checkpoint: its weights are random, so the predictions are "
            f"meaningless (pass a trained or converted model for real ones)")
    if args.engine != "ray" and (args.address or args.actors != 1 or args.batch_size != 1):
        raise UserError("--address, --actors and --batch-size are options of --engine ray; add --engine ray")
    if args.engine == "ray":
        return run_predict_ray(args, source, list(args.inputs) + ([str(SAMPLE_IMAGE)] if args.sample else []))
    model = open_model(source, onnx=True)
    inputs = list(args.inputs) or [str(p) for p in default_inputs(model)]
    if args.sample:
        inputs.append(str(SAMPLE_IMAGE))
    inputs = run_predict_tiles(args, model, inputs, device)
    if not inputs:
        return
    result = predict(
        model, inputs, args.out, mode=args.mode, crop_size=args.crop, stride=args.stride, size=args.size,
        scales=args.scales or (MS_RATIOS if args.multi_scale else (1.0,)), flip=args.flip,
        save_probs=args.save_probs, workers=args.batch_workers, device=device, precision=args.precision,
        legend=not args.no_legend,
    )
    kinds = "_labels.png, _overlay.png" + (", _probs.npy" if args.save_probs else "")
    print(f"wrote {len(result.written)} image(s) to {result.out_dir} ({kinds})")
    if result.failures:
        total = len(result.written) + len(result.failures)
        raise UserError(f"{len(result.failures)} of {total} image(s) could not be read: "
                        + "; ".join(message for _, message in result.failures))


# ---- predict: huge images in tiles (inference/tiles.py, inference/geotiff.py) -----------------
def add_tiles(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("huge images", "tiled prediction at the image's own resolution, in bounded memory: "
                             "writes <name>_labels.png, or <name>_labels.tif (GeoTIFF) for .tif inputs. Used for "
                             "every image with --tile, else automatically for images over 89 megapixels and "
                             "georeferenced GeoTIFFs")
    g.add_argument("--tile", type=positive_int, metavar="N", help="window side in pixels (automatic: 512)")
    g.add_argument("--overlap", type=int, default=128, metavar="N",
                   help="pixels shared by neighbouring windows, blended smoothly (default: %(default)s)")
    g.add_argument("--bands", nargs="+", type=positive_int, metavar="B",
                   help="GeoTIFF bands to read, 1-based, in the model's channel order (default: all)")
    g.add_argument("--window-batch", type=positive_int, default=4, metavar="N",
                   help="windows per forward pass; fewer need less memory (with 150 classes each window's "
                        "probabilities take 150 MB, three times that during the softmax) (default: %(default)s)")


def run_predict_tiles(args, model: Any, inputs: list[str], device: str) -> list[str]:
    """Predict the images that go in tiles; returns the inputs left for the ordinary path."""
    from pathlib import Path

    from .inference.modes import find_images
    from .inference.predict import output_stems
    from .inference.segmenter import Segmenter
    from .inference.tiles import DEFAULT_TILE, predict_files, wants_tiles

    files = find_images(inputs)
    tiled = [i for i, (file, _) in enumerate(files) if args.tile or wants_tiles(file)]
    if not tiled:
        return inputs
    if args.scales or args.multi_scale or args.flip or args.save_probs or args.mode == "slide":
        raise UserError("tiled prediction (--tile, huge images, GeoTIFFs) runs single-scale without flip, "
                        "--save-probs or --mode; drop those options for these images")
    if args.size not in ("meta", "none"):
        raise UserError(f"--size {args.size}: tiled prediction runs at the image's own resolution; drop --size")
    segmenter = Segmenter(model, device=device, precision=args.precision)
    stems = output_stems(files, Path(args.out))
    if not args.tile:
        say(f"{len(tiled)} image(s) predicted in {DEFAULT_TILE} px tiles (huge images or GeoTIFFs)")
    for path, out, notes in predict_files(segmenter, [files[i][0] for i in tiled], [stems[i] for i in tiled],
                                          args.tile, args.overlap, args.bands, args.window_batch):
        for message in notes:
            say(f"upernet predict: warning: {message}")
        print(f"wrote {out}")
    return [str(file) for i, (file, _) in enumerate(files) if i not in set(tiled)]


# ---- train ----------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a UPerNet (default: the built-in synthetic recipe)",
                       description="Train from a recipe (a YAML file or a built-in recipe name; default builtin) "
                                   "with dotted overrides, e.g. `upernet train my_recipe.yaml optim.lr=0.02 "
                                   "data.batch_size=4`. Under torchrun: `torchrun --nproc_per_node 2 -m upernet.cli "
                                   "train ...`.")
    p.add_argument("config", nargs="?", metavar="RECIPE",
                   help="recipe YAML file or built-in recipe name (a key=value here is taken as an override)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=6e-5")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint file or run folder (default: the newest checkpoint of --out)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<recipe name>)")
    p.add_argument("--stop-at", type=positive_int, metavar="ITER", help="stop after this iteration with a checkpoint")
    p.add_argument("--allow-config-changes", action="store_true",
                   help="with --resume and a RECIPE: let the recipe replace the run's stored config where they differ "
                        "(without it that is an error listing the keys; key=value overrides always apply)")
    add_runtime(p, device=False)
    p.set_defaults(handler=run_train)


def run_train(args) -> None:
    from pathlib import Path

    from .distributed import restarts_reuse_the_rendezvous_store
    from .training.loop import TrainingDiverged, resolve_run, train

    if restarts_reuse_the_rendezvous_store() and os.environ.get("LOCAL_RANK", "0") == "0":
        say("upernet train: warning: torchrun keeps one rendezvous store for all restarts, and restarted "
            "workers can try the dead workers' addresses left in it and fail or hang; launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    recipe, overrides = split_overrides(args.config, list(args.overrides))
    config, run_dir, resume_file = resolve_run(recipe, overrides, args.out, args.resume or None,
                                               args.resume is not None, args.allow_config_changes)
    if resume_file is not None and args.resume is None:
        say(f"upernet train: note: torchrun restarted the workers; resuming {run_dir} from {resume_file.name}")
    try:
        result = train(config, run_dir, resume=resume_file, stop_at=args.stop_at)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    if not result["is_main"]:
        return
    for key, (old, new) in result.get("config_changes", {}).items():
        say(f"upernet train: note: {key} changed from {old!r} to {new!r} for the rest of the run")
    done = "finished" if (Path(run_dir) / "model").is_dir() else f"stopped at iteration {result['iteration']}"
    best = f"best val mIoU {result['best_mIoU']:.2f}" if result["val"] or result["best_mIoU"] >= 0 else "not validated yet"
    print(f"run folder: {run_dir} ({done}; {best})")


# ---- eval -----------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="aAcc, mIoU and per-class IoU/Acc/Dice/F-score/precision/recall on a validation "
                                    "split, a confusion matrix and the worst images",
                       description="Evaluate a model on the validation split of a recipe (mmsegmentation's "
                                   "IoUMetric rules); prints the per-class table, writes metrics.json, "
                                   "per_class.csv, confusion_matrix.csv / _normalized.csv / .png and "
                                   "worst/NN_<image>.png (image | prediction | ground truth). Under torchrun: "
                                   "`torchrun --nproc_per_node 2 -m upernet.cli eval ...` splits the images over the processes (same numbers as one process).")
    p.add_argument("config", nargs="?", metavar="RECIPE",
                   help="recipe YAML or built-in name (default: the recipe stored with a trained model, else the "
                        "built-in one; a key=value here is taken as an override)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=...")
    add_model(p, onnx=True, aliases=("--checkpoint",))
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: the model's own, else the recipe's val.mode)")
    p.add_argument("--multi-scale", action="store_true", help="average scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json and per_class.csv (default: RUN_DIR/eval)")
    add_precision(p, default="fp32")  # the numbers of training's validation and of published fp32 results
    p.add_argument("--max-images", type=int, default=0, metavar="N", help="only the first N images (default: all)")
    # -- error analysis (evaluation/report.py) --
    p.add_argument("--worst", type=int, default=8, metavar="K",
                   help="write the K images of lowest per-image mIoU to OUT/worst (0: none; default 8)")
    p.add_argument("--beta", type=float, default=1.0, help="F-score weight of recall, mmsegmentation's (default 1: F1)")
    p.add_argument("--nan-to-num", type=float, metavar="V",
                   help="percent value for undefined per-class numbers (absent classes), counted in the means "
                        "(default: nan, left out of the means)")
    add_runtime(p)
    add_dcnv3_kernel(p)
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    from pathlib import Path

    from .config import config_from_dict, load_config
    from .evaluation.evaluate import default_out, evaluate_model, format_results, save_results
    from .evaluation.report import write_report
    from .loading import load_with_recipe

    recipe, overrides = split_overrides(args.config, list(args.overrides))
    source = model_source(args)
    resolve_device(args.device)
    if source.lower().endswith(".onnx"):
        model, stored = open_model(source, onnx=True), None
    else:
        model, stored = load_with_recipe(source)
    if recipe is None and stored is not None:  # the recipe the model was trained with names its validation split
        config = config_from_dict(stored, overrides, source=f"{source} (its training recipe)")
    else:
        config = load_config(recipe, overrides)
    results = evaluate_model(model, config, mode=args.mode, multi_scale=args.multi_scale, flip=args.flip,
                             device=args.device, precision=args.precision, max_images=args.max_images,
                             worst=args.worst, beta=args.beta, nan_to_num=args.nan_to_num)
    results["settings"]["checkpoint"] = source
    report = results.pop("report", None)
    if results["settings"]["rank"] == 0:
        print(format_results(results))
        out = Path(args.out) if args.out else default_out(source)
        json_path, csv_path = save_results(results, out)
        print(f"wrote {json_path}" + (f" and {csv_path}" if csv_path else ""))
        if report is not None:
            write_report(report, out)
            print(f"wrote the confusion matrix ({out / 'confusion_matrix.png'}, .csv) and "
                  f"{len(report.worst)} worst-image panels ({out / 'worst'})")


# ---- convert --------------------------------------------------------------------------------
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import a checkpoint of another toolkit (or a training checkpoint) into our format",
                       description="Convert a checkpoint into our folder format (config.json + model.safetensors), "
                                   "loadable with `upernet.load_model(OUT)`: Hugging Face, mmsegmentation, "
                                   "InternImage, sssegmentation, CSAIL, smp, or a training checkpoint / run folder "
                                   "of `upernet train`.")
    p.add_argument("src", nargs="?", metavar="SRC", help="the checkpoint file or folder to convert (or --model SRC)")
    p.add_argument("out", nargs="?", metavar="OUT", help="output folder")
    p.add_argument("-m", "--model", dest="model", metavar="SRC", help="the same as SRC")
    p.add_argument("--from", dest="fmt", metavar="FORMAT", help="source format (default: detected; see --list-formats)")
    p.add_argument("--to", choices=("upernet", "huggingface"), default="upernet",
                   help="huggingface: a transformers UperNet folder (ConvNeXt and Swin models; default: %(default)s)")
    p.add_argument("--revision", metavar="REV", help="of a Hub id SRC: branch, tag or commit (default: main)")
    p.add_argument("--list-formats", action="store_true", help="list the formats and what they convert")
    p.add_argument("--strict", choices=("true", "false"), default="true",
                   help="false: load what fits and print every skipped or missing key (default: %(default)s)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32),
                   help="of a ResNet (mmseg, sssegmentation) when the checkpoint does not tell it")
    p.set_defaults(handler=run_convert)


def run_convert(args) -> None:
    import logging
    from pathlib import Path

    from .convert import FORMATS, convert_checkpoint, detect_format

    if args.list_formats:
        for name, entry in FORMATS.items():
            print(f"{name:15} {entry.description}")
        return
    src_text = args.model or args.src
    out_text = args.src if args.model and args.src and not args.out else args.out
    if not src_text or not out_text:
        raise UserError("give SRC and OUT (or --list-formats)")
    src, out = Path(src_text), Path(out_text)
    if src.exists() and out.resolve() == src.resolve():
        raise UserError(f"{out}: the output folder must differ from the source (it would overwrite it)")
    from .loading import hub_id, is_our_model, run_record, save_huggingface, save_model

    if not src.exists() and hub_id(src_text) is None:
        raise UserError(f"{src}: no such checkpoint file or folder")
    if not src.exists():  # a Hub id
        model, fmt = open_model(src_text + (f"@{args.revision}" if args.revision else "")), "hub"
    elif args.fmt is None and is_our_model(src):  # ours already, or a training checkpoint / run folder
        model, fmt = open_model(str(src)), "upernet"
    else:
        fmt = args.fmt or detect_format(src)
        report = logging.StreamHandler(sys.stderr)  # --strict false: the skipped keys, one per line
        logging.getLogger("upernet.convert").addHandler(report)
        try:
            model = convert_checkpoint(src, fmt, strict=args.strict == "true", output_stride=args.output_stride)
        finally:
            logging.getLogger("upernet.convert").removeHandler(report)
    recipe, metrics = run_record(src)  # quoted in the model card when the source is a run of ours
    if args.to == "huggingface":
        save_huggingface(model, out, recipe=recipe, metrics=metrics)
    else:
        save_model(model, out, recipe=recipe, metrics=metrics)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {src} ({fmt} format) -> {out}" + (" (transformers UperNet folder)" if args.to == "huggingface" else ""))
    classes = f"{model.num_classes} classes" if hasattr(model, "num_classes") else f"tasks {', '.join(model.tasks)}"
    print(f"model: {model.config['name']}, {classes}, {params / 1e6:.2f} M parameters")


# ---- export ---------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (optionally with dynamic height and width)",
                       description="Write the model as ONNX (float32, BatchNorm folded, no auxiliary head) and check "
                                   "onnxruntime against PyTorch on random inputs.")
    add_model(p, positional=True)
    p.add_argument("output", nargs="?", metavar="OUTPUT", help="the .onnx file to write")
    p.add_argument("--shape", nargs=2, type=positive_int, default=(512, 512), metavar=("H", "W"),
                   help="example input size (default: 512 512)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch check")
    add_runtime(p, device=False)
    p.set_defaults(handler=run_export)


def run_export(args) -> None:
    from .inference.export import check_onnx, export_onnx

    if args.model and args.model_arg and not args.output:  # `export --model M OUT.onnx`
        args.model_arg, args.output = None, args.model_arg
    source = model_source(args)
    if not args.output:
        raise UserError("give the .onnx file to write: upernet export --model MODEL OUTPUT.onnx")
    model = open_model(source)
    h, w = args.shape
    say(f"exporting {source} at {h}x{w}{' (dynamic sizes)' if args.dynamic else ''} ...")
    path = export_onnx(model, args.output, (h, w), args.dynamic, args.opset)
    print(f"wrote {path}")
    if not args.no_check:
        shapes = [(h, w), (h + 64, max(32, w - 32))] if args.dynamic else [(h, w)]
        say("checking onnxruntime against PyTorch ...")
        for shape, diff in zip(shapes, check_onnx(model, path, shapes)):
            print(f"onnxruntime vs PyTorch at {shape[0]}x{shape[1]}: max abs diff {diff:.2e}")


# ---- bench ----------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency, throughput, GFLOP/s and memory, optionally vs transformers or smp",
                       description="Time inference (or one training step) of a model, interleaved with a peer on the "
                                   "same weights when --against is given; prints a table (or JSON).")
    add_model(p, positional=True, onnx=False)
    p.add_argument("--shape", nargs=2, type=positive_int, default=(512, 512), metavar=("H", "W"),
                   help="input size (default: 512 512)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per call (default 1; 2 with --train)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="our dtype (default: fp32, plus bf16 where the hardware has it)")
    p.add_argument("--against", choices=("transformers", "smp"), default=None,
                   help="time the peer (transformers or segmentation-models-pytorch) on the same weights")
    p.add_argument("--train", action="store_true", help="time one optimiser step instead of inference")
    p.add_argument("--checkpointing", action="store_true", help="with --train: also with backbone checkpointing")
    p.add_argument("--onnx", action="store_true", help="also export to ONNX and time onnxruntime")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (reports compile time)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per row (median reported)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_runtime(p, device=False)
    add_dcnv3_kernel(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> None:
    import json

    from .inference import bench, peers

    source = model_source(args)
    if args.against:
        pair = peers.transformers_pair if args.against == "transformers" else peers.smp_pair
        model, peer = pair(source)
    else:
        model, peer = open_model(source), None
    dtypes = (args.dtype,) if args.dtype else bench.default_dtypes()
    rows = len(dtypes) * (2 if peer is not None else 1) + bool(args.onnx) + bool(args.compile)
    say(f"timing {source} at {args.shape[0]}x{args.shape[1]}: {rows} row(s) x {args.runs} run(s), interleaved ...")
    if args.train:
        result = bench.bench_train(model, tuple(args.shape), args.batch or 2, dtypes, peer, args.against or "peer",
                                   runs=args.runs, checkpointing=args.checkpointing)
    else:
        result = bench.bench_inference(model, tuple(args.shape), args.batch or 1, dtypes, peer, args.against or "peer",
                                       runs=args.runs, onnx=args.onnx, compile=args.compile)
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))


# ---- serve ----------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP API and a web page for a model (needs upernet[serve])",
                       description="Serve a model over HTTP: POST /predict (an image -> JSON in the Hugging Face "
                                   "inference format, or ?format=labels|overlay for a PNG), GET /info, GET /health, "
                                   "and a web page at / to try images in a browser. The model is loaded once and "
                                   "prepared for inference; concurrent same-size images share a forward pass.")
    add_model(p, positional=True, onnx=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body accepted (default: %(default)s MB)")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000, metavar="N",
                   help="largest image accepted, width x height, checked before decoding (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=16, metavar="N",
                   help="images waiting for the model at most; more get 503 (default: %(default)s)")
    p.add_argument("--max-batch", type=positive_int, default=None, metavar="N",
                   help="same-size images per forward pass at most (default: 4 on a GPU; 1 on CPU, where batching "
                        "measured slower, see docs/serve.md)")
    p.add_argument("--size", default=None,
                   help="resize before inference: 'none', a short side like 512, or a keep-ratio scale like "
                        "2048x512 (default: the model's test size, else 2048x512)")
    add_precision(p)
    add_runtime(p)
    add_dcnv3_kernel(p)
    p.set_defaults(handler=run_serve)


def run_serve(args) -> None:
    try:
        import uvicorn

        from .serve.app import Limits, create_app
    except ImportError as e:
        raise UserError(f"upernet serve needs FastAPI and uvicorn ({e}): pip install 'upernet[serve]'") from None
    from .inference.segmenter import Segmenter

    source = model_source(args)
    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb {args.max_upload_mb}: give a positive size in MB")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: --host {args.host}: the server answers other machines too, without authentication")
    from .models.registry import list_models

    if source in list_models():
        say(f"warning: {source} is a model name, not a checkpoint: its weights are random, so the predictions are "
            f"meaningless (pass a trained or converted model for real ones)")
    say(f"loading {source} ...")
    segmenter = Segmenter(open_model(source, onnx=True), device=resolve_device(args.device), precision=args.precision,
                          size=args.size)
    batch = args.max_batch or (4 if segmenter.device.type == "cuda" else 1)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels,
                    max_queue=args.max_queue, max_batch=batch)
    app = create_app(segmenter, limits, name=source)
    say(f"serving {source} at http://{args.host}:{args.port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


# ---- info -----------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and FLOPs of a model, or the list of registered models",
                       description="Parameters and MACs of a model (counted on the real forward pass at --shape), "
                                   "or with --list the registered model names.")
    add_model(p, positional=True)
    p.add_argument("--shape", nargs=2, type=positive_int, default=(512, 512), metavar=("H", "W"),
                   help="input size the MACs are counted at (default: 512 512)")
    p.add_argument("--num-classes", type=positive_int, default=150, help="classes of a registered name (default: 150)")
    p.add_argument("--list", action="store_true", help="list the registered model names")
    p.set_defaults(handler=run_info)


def run_info(args) -> None:
    from pathlib import Path

    import upernet

    from .models.stats import model_stats

    source = model_source(args, required=False)
    if args.list or not source:
        print("\n".join(upernet.list_models()))
        return
    if not Path(source).exists() and source in upernet.list_models():
        import torch

        with torch.device("meta"):  # shapes only: counts need no memory and no weights, even for XL
            model = upernet.build_model(source, num_classes=args.num_classes).eval()
    else:
        model = open_model(source)
    stats = model_stats(model, tuple(args.shape))
    h, w = args.shape
    print(f"model:        {source}")
    print(f"params:       {stats['params'] / 1e6:.2f} M (backbone {stats['params_backbone'] / 1e6:.2f} M, "
          f"decode head {stats['params_decode_head'] / 1e6:.2f} M, aux head {stats['params_aux_head'] / 1e6:.2f} M)")
    print(f"MACs:         {stats['macs'] / 1e9:.1f} G at {h}x{w} (the 'FLOPs' of the published tables)")
    print(f"FLOPs:        {2 * stats['macs'] / 1e9:.1f} G at {h}x{w} (2 per multiply-add)")
    print(f"levels:       channels {stats['channels']}, strides {stats['strides']}")


# ---- plot -----------------------------------------------------------------------------------
def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG curves of loss, lr and mIoU of a training run",
                       description="Draw loss.png, lr.png and miou.png from a run folder's metrics.jsonl.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `upernet train`")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default RUN_DIR/plots)")
    p.set_defaults(handler=run_plot)


def run_plot(args) -> None:
    from .training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)


# ---- data check / convert: your own data --------------------------------------------------------
def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("auto", "folder", "ade20k", "cityscapes", "voc", "hf"), default="auto",
                   help="dataset layout (default: found from the folder names)")
    p.add_argument("--classes", metavar="NAMES", help="class names in index order, comma-separated (or their number)")
    p.add_argument("--palette", metavar="FILE", help="colour table of RGB colour masks (YAML/JSON: {classes: [...], "
                                                      "palette: [[r, g, b], ...], ignore: [[r, g, b]]})")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="stored 0 means 'unlabelled' (every other value minus 1); default: decided from the data")
    p.add_argument("--ignore-value", type=int, metavar="V", help="stored value of unlabelled pixels (default 255 when present)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="layout option: folder img_dir, ann_dir, img_suffix, seg_suffix; hf image_column, mask_column, revision")


def data_arguments(args) -> dict:
    """The keyword arguments `check_dataset` and `convert_dataset` share."""
    classes = None
    if args.classes:
        classes = int(args.classes) if args.classes.isdigit() else [c.strip() for c in args.classes.split(",")]
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option img_dir=images")
        options[key.strip()] = value.strip()
    return {"layout": args.layout, "classes": classes, "palette_file": args.palette,
            "reduce_zero_label": args.reduce_zero_label, "ignore_value": args.ignore_value, "options": options}


def add_data(sub) -> None:
    p = sub.add_parser("data", help="check a dataset's files and label protocol, or convert it to index PNGs",
                       description="`upernet data check DIR` reports what a dataset holds and its label protocol; "
                                   "`upernet data convert DIR OUT` writes a clean folder dataset and OUT/recipe.yaml.")
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="check or convert")
    check = verbs.add_parser("check", help="report images, masks, classes and the label protocol",
                             description="Read a dataset (folder, ADE20K, Cityscapes, VOC or Hugging Face layout) and "
                                         "print images per split, sizes, modes, mask kinds, class pixel frequencies, "
                                         "problems and the label protocol (exit status 1 when it found problems).")
    check.add_argument("root", metavar="DIR", help="dataset folder (or, with --layout hf, a Hub dataset name)")
    check.add_argument("--out", metavar="REPORT_DIR", help="write report.json and class_frequencies.png here")
    check.add_argument("--max-images", type=positive_int, metavar="N", help="read at most N pairs per split (evenly spaced)")
    add_data_options(check)
    check.set_defaults(handler=run_data_check)
    convert = verbs.add_parser("convert", help="write index PNG masks, the images and OUT/recipe.yaml",
                               description="Write OUT as a folder dataset with index PNG masks (0..N-1, 255 = ignore), "
                                           "the images (hard links or copies) and OUT/recipe.yaml for `upernet train`.")
    convert.add_argument("root", metavar="DIR", help="dataset folder (or, with --layout hf, a Hub dataset name)")
    convert.add_argument("out", metavar="OUT", help="output folder (outside DIR; DIR is only read)")
    convert.add_argument("--copy", action="store_true", help="copy images (default: hard links where possible)")
    add_data_options(convert)
    convert.set_defaults(handler=run_data_convert)


def run_data_check(args) -> int:
    from .data.check import check_dataset, write_report

    report = check_dataset(args.root, max_images=args.max_images, **data_arguments(args))
    print(report.table())
    if args.out:
        for path in write_report(report, args.out).values():
            print(f"wrote {path}")
    return 0 if report.clean else 1


def run_data_convert(args) -> None:
    from .data.check import convert_dataset

    result = convert_dataset(args.root, args.out, link=not args.copy, progress=say, **data_arguments(args))
    print(f"wrote {result['masks']} masks and {result['images']} images to {result['out']}")
    print(f"train with: upernet train {result['recipe']}")


# In the README's order.
COMMANDS = [add_predict, add_train, add_eval, add_convert, add_export, add_bench, add_serve, add_info, add_plot, add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upernet", description="UPerNet semantic segmentation on any backbone: "
                                     "train, evaluate, predict, convert, export and benchmark.")
    parser.add_argument("--version", action="version", version=f"upernet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # PyTorch backs tensors of 2 MB and more with transparent huge pages when this is set before its
    # first allocation (measured: UPerNet ConvNeXt-T inference 20-30% faster); a user's value is kept.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    # `key=value` overrides may stand after options too (`train x.yaml --out r optim.lr=0.1`):
    # argparse leaves those to parse_known_args' extras, which go back to the overrides here.
    args, extras = parser.parse_known_args(argv)
    stray = [e for e in extras if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = list(args.overrides) + extras
    from .ops.scratch import keep_freed_memory

    keep_freed_memory()  # this process is ours: reuse freed activations instead of faulting them in again
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigNote)
        previous = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest: (
            say(f"upernet {args.command}: note: {message}") if issubclass(category, ConfigNote)
            else previous(message, category, *rest))
        try:
            apply_runtime(args)
            status = args.handler(args)
        except UserError as e:
            print(f"upernet {args.command}: error: {e}", file=sys.stderr)
            return 2
        finally:
            warnings.showwarning = previous
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
