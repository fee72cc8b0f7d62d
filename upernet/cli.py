"""`upernet train | eval | predict | convert | export | bench | info | plot`.

One `add_<command>` function per subcommand builds its parser and names its handler; the
handlers import what they need lazily so that `upernet --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """An error whose message is shown to the user without a traceback."""


def _load_any(model: str):
    """A model from a checkpoint folder/file, or a registered name (random weights)."""
    from pathlib import Path

    import upernet

    if Path(model).suffix == ".onnx" and Path(model).is_file():  # exported by `upernet export`
        from upernet.inference.export import OnnxModel

        return OnnxModel(model)
    return upernet.load_model(model)


def _add_dcnv3_kernel(p) -> None:
    p.add_argument("--dcnv3-kernel", choices=("torch", "compiled"), default="torch",
                   help="InternImage models on CPU: 'compiled' samples DCNv3 with a C++ kernel built on first use "
                        "(needs a C++ compiler and ninja; same results, faster); default: plain PyTorch")


def _use_dcnv3_kernel(args) -> None:
    """Apply --dcnv3-kernel (commands without it keep the default)."""
    name = getattr(args, "dcnv3_kernel", "torch")
    if name != "torch":
        from upernet.ops.dcnv3 import set_dcnv3_kernel

        try:
            set_dcnv3_kernel(name)
        except RuntimeError as e:
            raise CLIError(str(e)) from None


# ---- info -----------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and FLOPs of a model")
    p.add_argument("model", nargs="?", help="registered name or checkpoint path")
    p.add_argument("--shape", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--list", action="store_true", help="list the registered model names")
    p.set_defaults(handler=run_info)


def run_info(args) -> None:
    import upernet
    from upernet.models.stats import model_stats

    if args.list or not args.model:
        print("\n".join(upernet.list_models()))
        return
    from pathlib import Path

    if Path(args.model).exists():
        model = upernet.load_model(args.model)
    elif args.model in upernet.list_models():
        import torch

        with torch.device("meta"):  # shapes only: counts need no memory and no weights, even for XL
            model = upernet.build_model(args.model, num_classes=args.num_classes).eval()
    else:
        _load_any(args.model)  # raises the helpful error
    stats = model_stats(model, tuple(args.shape))
    h, w = args.shape
    print(f"model:        {args.model}")
    print(f"params:       {stats['params'] / 1e6:.2f} M (backbone {stats['params_backbone'] / 1e6:.2f} M, "
          f"decode head {stats['params_decode_head'] / 1e6:.2f} M, aux head {stats['params_aux_head'] / 1e6:.2f} M)")
    print(f"MACs:         {stats['macs'] / 1e9:.1f} G at {h}x{w} (the 'FLOPs' of the published tables)")
    print(f"FLOPs:        {2 * stats['macs'] / 1e9:.1f} G at {h}x{w} (2 per multiply-add)")
    print(f"levels:       channels {stats['channels']}, strides {stats['strides']}")


# ---- predict --------------------------------------------------------------------------------
def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images: label-map PNGs, colour overlays, probabilities",
                       description="Segment image files or folders. Per image writes <name>_labels.png (palette PNG "
                                   "of class indices), <name>_overlay.png and with --save-probs <name>_probs.npy.")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER",
                   help="image files and folders (searched recursively); none: the built-in sample image")
    p.add_argument("--model", required=True, help="checkpoint folder/file, or a registered name (random weights)")
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--mode", choices=("whole", "slide"), help="default: the model's test mode, else whole")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="slide window (default 512 512)")
    p.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"), help="slide step (default 341 341)")
    p.add_argument("--size", default="meta",
                   help="resize before inference: 'none', a short side like 512, or a keep-ratio scale like "
                        "2048x512 (default: the model's test size, else 2048x512)")
    p.add_argument("--multi-scale", action="store_true", help="average scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--scales", nargs="+", type=float, help="custom scale ratios to average")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--save-probs", action="store_true", help="write <name>_probs.npy (float16, C x H x W)")
    p.add_argument("--batch-workers", type=int, help="image decoding processes (default: min(2, CPUs))")
    p.add_argument("--sample", action="store_true", help="also segment the built-in sample image")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the CPU/GPU runs it natively (AVX512-BF16/AMX, recent GPUs), else fp32")
    p.add_argument("--no-legend", action="store_true", help="no class legend on the overlays")
    _add_dcnv3_kernel(p)
    p.set_defaults(handler=run_predict)


def run_predict(args) -> None:
    from pathlib import Path

    import torch

    import upernet
    from upernet.inference.modes import MS_RATIOS
    from upernet.inference.prepare import autocast_dtype_for
    from upernet.inference.predict import SAMPLE_IMAGE, predict

    if not Path(args.model).exists() and args.model in upernet.list_models():
        print(f"warning: {args.model} is a model name, not a checkpoint: its weights are random, so the "
              f"predictions are meaningless (pass a checkpoint folder for real ones)", file=sys.stderr)
    model = _load_any(args.model)
    inputs = list(args.inputs) + ([str(SAMPLE_IMAGE)] if args.sample or not args.inputs else [])
    result = predict(
        model, inputs, args.out, mode=args.mode, crop_size=args.crop, stride=args.stride, size=args.size,
        scales=args.scales or (MS_RATIOS if args.multi_scale else (1.0,)), flip=args.flip,
        save_probs=args.save_probs, workers=args.batch_workers, device=args.device,
        autocast_dtype=autocast_dtype_for(args.precision, args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        legend=not args.no_legend,
    )
    kinds = "_labels.png, _overlay.png" + (", _probs.npy" if args.save_probs else "")
    print(f"wrote {len(result.written)} image(s) to {result.out_dir} ({kinds})")
    if result.failures:
        total = len(result.written) + len(result.failures)
        raise CLIError(f"{len(result.failures)} of {total} image(s) could not be read:\n  "
                       + "\n  ".join(message for _, message in result.failures))


# ---- train ----------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a UPerNet (default: the built-in synthetic recipe)",
                       description="Train from a recipe (a YAML file or a built-in recipe name; default builtin) with dotted "
                                   "overrides, e.g. `upernet train my_recipe.yaml optim.lr=0.02 data.batch_size=4`. "
                                   "Under torchrun: `torchrun --nproc_per_node 2 -m upernet.cli train ...`.")
    p.add_argument("config", nargs="?", help="recipe YAML file (a key=value here is taken as an override)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint file or run folder (default: the newest checkpoint of --out)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<config name>)")
    p.add_argument("--stop-at", type=int, metavar="ITER", help="stop after this iteration with a checkpoint")
    p.set_defaults(handler=run_train)


def run_train(args) -> None:
    from pathlib import Path

    from upernet.training.loop import TrainingDiverged, train_from_cli

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    try:
        result = train_from_cli(config, overrides, args.out, args.resume or None, args.resume is not None,
                                args.stop_at)
    except TrainingDiverged as e:
        raise CLIError(str(e)) from None
    run_dir = result["run_dir"]
    done = "finished" if (Path(run_dir) / "model").is_dir() else f"stopped at iteration {result['iteration']}"
    best = f"best val mIoU {result['best_mIoU']:.2f}" if result["val"] or result["best_mIoU"] >= 0 else "not validated yet"
    print(f"run folder: {run_dir} ({done}; {best})")


# ---- plot -----------------------------------------------------------------------------------
def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG curves of loss, lr and mIoU of a training run")
    p.add_argument("run_dir", help="run folder of `upernet train`")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    p.set_defaults(handler=run_plot)


def run_plot(args) -> None:
    from upernet.training.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)


# ---- eval -----------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="aAcc, mIoU, mAcc and per-class IoU/Acc on a validation split",
                       description="Evaluate a checkpoint on the validation split of a recipe (mmsegmentation's "
                                   "IoUMetric rules); prints the per-class table, writes metrics.json and "
                                   "per_class.csv. Under torchrun: `torchrun --nproc_per_node 2 -m upernet.cli eval "
                                   "...` splits the images over the processes (same numbers as one process).")
    p.add_argument("config", nargs="?", help="recipe YAML (default: the config stored in a training checkpoint, "
                                             "else the built-in recipe; a key=value here is taken as an override)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=...")
    p.add_argument("--checkpoint", required=True,
                   help="model folder, training checkpoint (.pt of `upernet train`) or a foreign checkpoint")
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: the config's val.mode)")
    p.add_argument("--multi-scale", action="store_true", help="average scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json and per_class.csv (default: RUN_DIR/eval)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the CPU/GPU runs it natively (AVX512-BF16/AMX, recent GPUs), else fp32")
    p.add_argument("--max-images", type=int, default=0, metavar="N", help="only the first N images (default: all)")
    _add_dcnv3_kernel(p)
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    from upernet.evaluation.evaluate import evaluate_from_cli

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    evaluate_from_cli(config, overrides, args.checkpoint, mode=args.mode, multi_scale=args.multi_scale,
                      flip=args.flip, out=args.out, device=args.device, precision=args.precision,
                      max_images=args.max_images)


# ---- convert --------------------------------------------------------------------------------
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import a foreign checkpoint (e.g. a Hugging Face UperNet folder) into our format",
                       description="Convert a checkpoint of another toolkit into our folder format (config.json + "
                                   "model.safetensors), loadable with `upernet.load_model(OUT)`.")
    p.add_argument("src", nargs="?", help="checkpoint file or folder to convert")
    p.add_argument("out", nargs="?", help="output folder")
    p.add_argument("--from", dest="fmt", metavar="FORMAT", help="source format (default: detected)")
    p.add_argument("--list-formats", action="store_true", help="list the formats and what they convert")
    p.add_argument("--strict", choices=("true", "false"), default="true",
                   help="false: load what fits and print every skipped or missing key (default: %(default)s)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32),
                   help="of a ResNet (mmseg, sssegmentation) when the checkpoint does not tell it")
    p.set_defaults(handler=run_convert)


def run_convert(args) -> None:
    import logging
    from pathlib import Path

    from upernet.convert import FORMATS, convert_checkpoint, detect_format

    if args.list_formats:
        for name, entry in FORMATS.items():
            print(f"{name:15} {entry.description}")
        return
    if not args.src or not args.out:
        raise CLIError("give SRC and OUT (or --list-formats)")
    src, out = Path(args.src), Path(args.out)
    if src.exists() and out.resolve() == src.resolve():
        raise CLIError(f"{out}: the output folder must differ from the source (it would overwrite it)")
    fmt = args.fmt or (detect_format(src) if src.exists() else None)
    report = logging.StreamHandler(sys.stderr)  # --strict false: the skipped keys, one per line
    logging.getLogger("upernet.convert").addHandler(report)
    try:
        model = convert_checkpoint(src, fmt, strict=args.strict == "true", output_stride=args.output_stride)
    finally:
        logging.getLogger("upernet.convert").removeHandler(report)
    model.save(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {src} ({fmt} format) -> {out}")
    print(f"model: {model.config['name']}, {model.num_classes} classes, {params / 1e6:.2f} M parameters")


# ---- bench ----------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency, throughput, GFLOP/s and memory, optionally vs transformers or smp")
    p.add_argument("model", help="registered name or checkpoint path (a Hugging Face folder with --against)")
    p.add_argument("--shape", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=None, help="images per call (default 1; 2 with --train)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="our dtype (default: fp32, plus bf16 where the hardware has it)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--against", choices=("transformers", "smp"), default=None,
                   help="time the peer (transformers or segmentation-models-pytorch) on the same weights")
    p.add_argument("--train", action="store_true", help="time one optimiser step instead of inference")
    p.add_argument("--checkpointing", action="store_true", help="with --train: also with backbone checkpointing")
    p.add_argument("--onnx", action="store_true", help="also export to ONNX and time onnxruntime")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (reports compile time)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_dcnv3_kernel(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> None:
    import json

    import torch

    from upernet.inference import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.against:
        pair = bench.transformers_pair if args.against == "transformers" else bench.smp_pair
        model, peer = pair(args.model)
    else:
        model, peer = _load_any(args.model), None
    dtypes = (args.dtype,) if args.dtype else bench.default_dtypes()
    if args.train:
        result = bench.bench_train(model, tuple(args.shape), args.batch or 2, dtypes, peer, args.against or "peer",
                                   runs=args.runs, checkpointing=args.checkpointing)
    else:
        result = bench.bench_inference(model, tuple(args.shape), args.batch or 1, dtypes, peer, args.against or "peer",
                                       runs=args.runs, onnx=args.onnx, compile=args.compile)
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))


# ---- export ---------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (optionally with dynamic height and width)")
    p.add_argument("model", help="registered name or checkpoint path")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--shape", nargs=2, type=int, default=(512, 512), metavar=("H", "W"), help="example input size")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch check")
    p.set_defaults(handler=run_export)


def run_export(args) -> None:
    from upernet.inference.export import check_onnx, export_onnx

    model = _load_any(args.model)
    path = export_onnx(model, args.output, tuple(args.shape), args.dynamic, args.opset)
    print(f"wrote {path}")
    if not args.no_check:
        h, w = args.shape
        shapes = [(h, w), (h + 64, w - 32)] if args.dynamic else [(h, w)]
        for shape, diff in zip(shapes, check_onnx(model, path, shapes)):
            print(f"onnxruntime vs PyTorch at {shape[0]}x{shape[1]}: max abs diff {diff:.2e}")


COMMANDS = [add_info, add_predict, add_train, add_plot, add_eval, add_convert, add_bench, add_export]


def main(argv: list[str] | None = None) -> int:
    import os

    # PyTorch backs tensors of 2 MB and more with transparent huge pages when this is set before its
    # first allocation (measured: UPerNet ConvNeXt-T inference 20-30% faster); a user's value is kept.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = argparse.ArgumentParser(prog="upernet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    # `key=value` overrides may stand after options too (`train x.yaml --out r optim.lr=0.1`):
    # argparse leaves those to parse_known_args' extras, which go back to the overrides here.
    args, extras = parser.parse_known_args(argv)
    stray = [e for e in extras if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = list(args.overrides) + extras
    from upernet.ops.scratch import keep_freed_memory

    keep_freed_memory()  # this process is ours: reuse freed activations instead of faulting them in again
    try:
        _use_dcnv3_kernel(args)
        args.handler(args)
    except (CLIError, FileNotFoundError, ValueError) as e:
        print(f"upernet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
