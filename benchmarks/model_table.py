"""The README's table of variants: parameters and MACs ("FLOPs" of the published tables).

    .venv/bin/python benchmarks/model_table.py          # prints a markdown table

Models are built on the meta device (no memory, no weights), so even the XL variants take seconds.
"""
import torch

import upernet
from upernet.models.stats import count_macs

SKIP = {"upernet_timm", "upernet_multitask", "upernet_multitask_r50", "upernet_multitask_r101"}  # need a timm name / tasks


def main() -> None:
    print("| model | params (M), 150 classes | MACs at 512x512 (G) | MACs at 512x2048 (G) |")
    print("|---|---:|---:|---:|")
    for name in upernet.list_models():
        if name in SKIP:
            continue
        with torch.device("meta"):
            model = upernet.build_model(name, num_classes=150)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = [count_macs(model, shape) / 1e9 for shape in ((512, 512), (512, 2048))]
        print(f"| `{name}` | {params:.1f} | {macs[0]:.0f} | {macs[1]:.0f} |")


if __name__ == "__main__":
    main()
