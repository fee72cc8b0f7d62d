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


COMMANDS = [add_info]


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
