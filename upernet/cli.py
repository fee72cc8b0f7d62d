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

    if Path(model).exists():
        return upernet.load_model(model)
    if model in upernet.list_models():
        return upernet.build_model(model).eval()
    raise CLIError(f"{model!r} is neither an existing checkpoint path nor a registered model name "
                   f"(see `upernet info --list`)")


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
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    from upernet.engine.evaluate import evaluate_from_cli

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    evaluate_from_cli(config, overrides, args.checkpoint, mode=args.mode, multi_scale=args.multi_scale,
                      flip=args.flip, out=args.out, device=args.device, precision=args.precision)


COMMANDS = [add_info, add_eval]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upernet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (CLIError, FileNotFoundError, ValueError) as e:
        print(f"upernet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
