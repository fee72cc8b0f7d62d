"""Writes docs/model_zoo.md: every published UPerNet result, the recipe that targets it, and how to check it.

    python tools/model_zoo.py            # regenerate docs/model_zoo.md
    python tools/model_zoo.py --check    # fail if the page differs from what the recipes and table give

The page comes from two sources only: the shipped recipes (upernet/configs/*.yaml, whose header names
the row each one targets) and `PUBLISHED` below (one entry per published row: the checkpoint file as
published, its mIoU and, where the source states them, parameters and FLOPs). Before writing, every
recipe is loaded, its model built on the meta device (no memory, no weights), and our parameters and
MACs compared with the published ones: a difference above 2% is an error, not a footnote.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import upernet
from upernet.config import Config, load_config
from upernet.data.classes import DATASET_META
from upernet.errors import UserError
from upernet.io import write_text
from upernet.models.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "upernet" / "configs"
PAGE = ROOT / "docs" / "model_zoo.md"
TOLERANCE = 0.02  # params and MACs may differ from the published ones by this share at most
NOT_ROWS = {"builtin", "multitask_builtin", "finetune_folder"}  # built-in data or your own folder: no published row


@dataclass(frozen=True)
class Published:
    """One published row: where it comes from and what it reports.

    Attributes:
        recipe: our recipe that targets it (a file stem in upernet/configs).
        source: sssegmentation, mmsegmentation or InternImage.
        config: the source's config path, as in its repository.
        checkpoint: the checkpoint file name as published.
        miou: single-scale mIoU (%).
        miou_ms: multi-scale + flip mIoU (%), when published.
        params_m: parameters in millions, when the source states them.
        flops_g: "FLOPs" in G (multiply-adds) at `flops_shape`, when the source states them.
        flops_shape: (H, W) the published FLOPs were counted at.
        stats_source: where the parameters and FLOPs are published.
        note: what a user checking this row must know (shown under its commands).
        hub_id: the Hugging Face Hub repo holding this row's checkpoint in the transformers layout (the
            transformers conversion script names the published file it converted), or "".
    """

    recipe: str
    source: str
    config: str
    checkpoint: str
    miou: float
    miou_ms: Optional[float] = None
    params_m: Optional[float] = None
    flops_g: Optional[float] = None
    flops_shape: tuple[int, int] = (512, 2048)
    stats_source: str = ""
    note: str = ""
    hub_id: str = ""


SSSEG = "SegmentationBLWX/sssegmentation docs/modelzoo/upernet/README.md"
MMSEG = "open-mmlab/mmsegmentation configs/upernet/README.md"
INTERNIMAGE = "OpenGVLab/InternImage segmentation/README.md"
CONVNEXT_PAPER = "ConvNeXt paper (Liu et al. 2022), Table 4"
SWIN_PAPER = "Swin Transformer paper (Liu et al. 2021), Table 3"

ALIGN_NOTE = ("`upernet convert` reads `align_corners=True` from the decode head of the config text the checkpoint's "
              "meta carries: the converted model resizes with it in the head and on the logits, as the published run "
              "and this recipe do. A file stripped of that meta converts with align_corners=False (expect a small "
              "mIoU difference).")


def _ssseg_rows() -> list[Published]:
    """The 12 rows of sssegmentation's UPerNet table (ResNet V1c, output stride 8 or 16)."""
    miou = {("voc", "50", 8): 76.86, ("voc", "50", 16): 77.48, ("voc", "101", 8): 79.13, ("voc", "101", 16): 77.88,
            ("ade20k", "50", 8): 43.02, ("ade20k", "50", 16): 42.87, ("ade20k", "101", 8): 44.92,
            ("ade20k", "101", 16): 44.77, ("cityscapes", "50", 8): 79.08, ("cityscapes", "50", 16): 78.94,
            ("cityscapes", "101", 8): 80.39, ("cityscapes", "101", 16): 79.64}
    ours = {"voc": "voc12aug_512x512_60e", "ade20k": "ade20k_512x512_130e", "cityscapes": "cityscapes_512x1024_220e"}
    rows = []
    for (dataset, depth, stride), value in miou.items():
        theirs = f"upernet_resnet{depth}os{stride}_{dataset}"
        rows.append(Published(f"upernet_r{depth}_d{stride}_{ours[dataset]}", "sssegmentation",
                              f"ssseg/configs/upernet/{theirs}.py", f"{theirs}_train.pth", value))
    return rows


PUBLISHED: list[Published] = [
    *_ssseg_rows(),
    # mmsegmentation's UPerNet R-50/101 (ResNet V1c, output stride 32)
    Published("upernet_r50_ade20k_512x512_160k", "mmsegmentation", "configs/upernet/upernet_r50_4xb4-160k_ade20k-512x512.py",
              "upernet_r50_512x512_160k_ade20k_20200615_184328-8534de8d.pth", 42.05, 42.78),
    Published("upernet_r101_ade20k_512x512_160k", "mmsegmentation", "configs/upernet/upernet_r101_4xb4-160k_ade20k-512x512.py",
              "upernet_r101_512x512_160k_ade20k_20200615_161951-91b32684.pth", 43.82, 44.85),
    Published("upernet_r50_ade20k_512x512_80k", "mmsegmentation", "configs/upernet/upernet_r50_4xb4-80k_ade20k-512x512.py",
              "upernet_r50_512x512_80k_ade20k_20200614_144127-ecc8377b.pth", 40.70, 41.81),
    Published("upernet_r101_ade20k_512x512_80k", "mmsegmentation", "configs/upernet/upernet_r101_4xb4-80k_ade20k-512x512.py",
              "upernet_r101_512x512_80k_ade20k_20200614_185117-32e4db94.pth", 42.91, 43.96),
    Published("upernet_r50_cityscapes_512x1024_40k", "mmsegmentation",
              "configs/upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py",
              "upernet_r50_512x1024_40k_cityscapes_20200605_094827-aa54cb54.pth", 77.10, 78.37),
    Published("upernet_r101_cityscapes_512x1024_40k", "mmsegmentation",
              "configs/upernet/upernet_r101_4xb2-40k_cityscapes-512x1024.py",
              "upernet_r101_512x1024_40k_cityscapes_20200605_094933-ebce3b10.pth", 78.69, 80.11),
    Published("upernet_r50_cityscapes_512x1024_80k", "mmsegmentation",
              "configs/upernet/upernet_r50_4xb2-80k_cityscapes-512x1024.py",
              "upernet_r50_512x1024_80k_cityscapes_20200607_052207-848beca8.pth", 78.19, 79.19),
    Published("upernet_r101_cityscapes_512x1024_80k", "mmsegmentation",
              "configs/upernet/upernet_r101_4xb2-80k_cityscapes-512x1024.py",
              "upernet_r101_512x1024_80k_cityscapes_20200607_002403-f05f2345.pth", 79.40, 80.46),
    Published("upernet_r50_cityscapes_769x769_40k", "mmsegmentation",
              "configs/upernet/upernet_r50_4xb2-40k_cityscapes-769x769.py",
              "upernet_r50_769x769_40k_cityscapes_20200530_033048-92d21539.pth", 77.98, 79.70, note=ALIGN_NOTE),
    Published("upernet_r101_cityscapes_769x769_40k", "mmsegmentation",
              "configs/upernet/upernet_r101_4xb2-40k_cityscapes-769x769.py",
              "upernet_r101_769x769_40k_cityscapes_20200530_040819-83c95d01.pth", 79.03, 80.77, note=ALIGN_NOTE),
    Published("upernet_r50_cityscapes_769x769_80k", "mmsegmentation",
              "configs/upernet/upernet_r50_4xb2-80k_cityscapes-769x769.py",
              "upernet_r50_769x769_80k_cityscapes_20200607_005107-82ae7d15.pth", 79.39, 80.92, note=ALIGN_NOTE),
    Published("upernet_r101_cityscapes_769x769_80k", "mmsegmentation",
              "configs/upernet/upernet_r101_4xb2-80k_cityscapes-769x769.py",
              "upernet_r101_769x769_80k_cityscapes_20200607_001014-082fc334.pth", 80.10, 81.49, note=ALIGN_NOTE),
    Published("upernet_r50_voc12aug_512x512_20k", "mmsegmentation", "configs/upernet/upernet_r50_4xb4-20k_voc12aug-512x512.py",
              "upernet_r50_512x512_20k_voc12aug_20200617_165330-5b5890a7.pth", 74.82, 76.35),
    Published("upernet_r101_voc12aug_512x512_20k", "mmsegmentation", "configs/upernet/upernet_r101_4xb4-20k_voc12aug-512x512.py",
              "upernet_r101_512x512_20k_voc12aug_20200617_165629-f14e7f27.pth", 77.10, 78.29),
    Published("upernet_r50_voc12aug_512x512_40k", "mmsegmentation", "configs/upernet/upernet_r50_4xb4-40k_voc12aug-512x512.py",
              "upernet_r50_512x512_40k_voc12aug_20200613_162257-ca9bcc6b.pth", 75.92, 77.44),
    Published("upernet_r101_voc12aug_512x512_40k", "mmsegmentation", "configs/upernet/upernet_r101_4xb4-40k_voc12aug-512x512.py",
              "upernet_r101_512x512_40k_voc12aug_20200613_163549-e26476ac.pth", 77.43, 78.56),
    # mmsegmentation's Swin rows (configs/swin/README.md); parameters and FLOPs from the Swin paper
    Published("upernet_swin_tiny_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth",
              44.41, 45.79, 60, 945, stats_source=SWIN_PAPER, hub_id="openmmlab/upernet-swin-tiny"),
    Published("upernet_swin_small_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210526_192015-ee2fff1c.pth",
              47.72, 49.24, 81, 1038, stats_source=SWIN_PAPER, hub_id="openmmlab/upernet-swin-small"),
    Published("upernet_swin_base_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-base-patch4-window12-in1k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_base_patch4_window12_512x512_160k_ade20k_pretrain_384x384_1K_20210531_132020-05b22ea4.pth",
              48.35, 49.65, 121, 1188, stats_source=SWIN_PAPER + " (its Swin-B row has window 7: 1.5% fewer MACs)"),
    Published("upernet_swin_base_w7_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_base_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210526_192340-593b0e13.pth",
              47.99, 49.57, 121, 1188, stats_source=SWIN_PAPER),
    Published("upernet_swin_base_w7_in22k_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-base-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_base_patch4_window7_512x512_160k_ade20k_pretrain_224x224_22K_20210526_211650-762e2178.pth",
              50.31, 51.9, 121, 1188, stats_source=SWIN_PAPER),
    Published("upernet_swin_base_in22k_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-base-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_base_patch4_window12_512x512_160k_ade20k_pretrain_384x384_22K_20210531_125459-429057bf.pth",
              50.76, 52.4, 121, 1188, stats_source=SWIN_PAPER + " (its Swin-B row has window 7: 1.5% fewer MACs)",
              hub_id="openmmlab/upernet-swin-base"),
    # Swin-L: the Swin paper's Swin-L row trains at 640x640 and states 3230G FLOPs, not comparable: params only
    Published("upernet_swin_large_w7_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-large-patch4-window7-in22k-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_large_patch4_window7_512x512_pretrain_224x224_22K_160k_ade20k_20220318_015320-48d180dd.pth",
              51.17, 52.99, 234, stats_source=SWIN_PAPER),
    Published("upernet_swin_large_ade20k_512x512_160k", "mmsegmentation",
              "configs/swin/swin-large-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py",
              "upernet_swin_large_patch4_window12_512x512_pretrain_384x384_22K_160k_ade20k_20220318_091743-9ba68901.pth",
              52.25, 54.12, 234, stats_source=SWIN_PAPER, hub_id="openmmlab/upernet-swin-large"),
    # mmsegmentation's ConvNeXt rows (configs/convnext/README.md); parameters and FLOPs from the ConvNeXt paper
    Published("upernet_convnext_tiny_ade20k_512x512_160k", "mmsegmentation",
              "configs/convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py",
              "upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth", 46.11, 46.62, 60, 939,
              stats_source=CONVNEXT_PAPER, hub_id="openmmlab/upernet-convnext-tiny"),
    Published("upernet_convnext_small_ade20k_512x512_160k", "mmsegmentation",
              "configs/convnext/convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py",
              "upernet_convnext_small_fp16_512x512_160k_ade20k_20220227_131208-1b1e394f.pth", 48.56, 49.02, 82, 1027,
              stats_source=CONVNEXT_PAPER, hub_id="openmmlab/upernet-convnext-small"),
    Published("upernet_convnext_base_ade20k_512x512_160k", "mmsegmentation",
              "configs/convnext/convnext-base_upernet_8xb2-amp-160k_ade20k-512x512.py",
              "upernet_convnext_base_fp16_512x512_160k_ade20k_20220227_181227-02a24fc6.pth", 48.71, 49.54, 122, 1170,
              stats_source=CONVNEXT_PAPER, hub_id="openmmlab/upernet-convnext-base"),
    Published("upernet_convnext_base_ade20k_640x640_160k", "mmsegmentation",
              "configs/convnext/convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py",
              "upernet_convnext_base_fp16_640x640_160k_ade20k_20220227_182859-9280e39b.pth", 52.13, 52.66, 122, 1828,
              (640, 2560), CONVNEXT_PAPER),
    Published("upernet_convnext_large_ade20k_640x640_160k", "mmsegmentation",
              "configs/convnext/convnext-large_upernet_8xb2-amp-160k_ade20k-640x640.py",
              "upernet_convnext_large_fp16_640x640_160k_ade20k_20220226_040532-e57aa54d.pth", 53.16, 53.38, 235, 2458,
              (640, 2560), CONVNEXT_PAPER, hub_id="openmmlab/upernet-convnext-large"),
    Published("upernet_convnext_xlarge_ade20k_640x640_160k", "mmsegmentation",
              "configs/convnext/convnext-xlarge_upernet_8xb2-amp-160k_ade20k-640x640.py",
              "upernet_convnext_xlarge_fp16_640x640_160k_ade20k_20220226_080344-95fc38c2.pth", 53.58, 54.11, 391, 3335,
              (640, 2560), CONVNEXT_PAPER, hub_id="openmmlab/upernet-convnext-xlarge"),
    # InternImage's ADE20K table
    Published("upernet_internimage_t_ade20k_512x512_160k", "InternImage",
              "segmentation/configs/ade20k/upernet_internimage_t_512_160k_ade20k.py",
              "upernet_internimage_t_512_160k_ade20k.pth", 47.9, 48.1, 59, 944, stats_source=INTERNIMAGE),
    Published("upernet_internimage_s_ade20k_512x512_160k", "InternImage",
              "segmentation/configs/ade20k/upernet_internimage_s_512_160k_ade20k.py",
              "upernet_internimage_s_512_160k_ade20k.pth", 50.1, 50.9, 80, 1017, stats_source=INTERNIMAGE),
    Published("upernet_internimage_b_ade20k_512x512_160k", "InternImage",
              "segmentation/configs/ade20k/upernet_internimage_b_512_160k_ade20k.py",
              "upernet_internimage_b_512_160k_ade20k.pth", 50.8, 51.3, 128, 1185, stats_source=INTERNIMAGE),
    Published("upernet_internimage_l_ade20k_640x640_160k", "InternImage",
              "segmentation/configs/ade20k/upernet_internimage_l_640_160k_ade20k.py",
              "upernet_internimage_l_640_160k_ade20k.pth", 53.9, 54.1, 256, 2526, (640, 2560), INTERNIMAGE),
    Published("upernet_internimage_xl_ade20k_640x640_160k", "InternImage",
              "segmentation/configs/ade20k/upernet_internimage_xl_640_160k_ade20k.py",
              "upernet_internimage_xl_640_160k_ade20k.pth", 55.0, 55.3, 368, 3142, (640, 2560), INTERNIMAGE),
]
SOURCES = {"sssegmentation": SSSEG, "mmsegmentation": MMSEG + " (and configs/swin, configs/convnext: it publishes no "
           "ConvNeXt-B ImageNet-22K row at 512x512)",
           "InternImage": INTERNIMAGE}
# The openmmlab/upernet-* Hub repos (transformers' conversions of mmsegmentation's checkpoints) are each the
# `hub_id` of the row whose file they converted; these have no row.
HUB_WITHOUT_ROW: list[str] = []


@dataclass
class Row:
    """A published row with what our recipe builds."""

    published: Published
    config: Config
    params_m: float
    macs_g: float
    shape: tuple[int, int]


def stats_shape(published: Published, config: Config) -> tuple[int, int]:
    """Where to count MACs: the published FLOPs' input, else the recipe's training crop."""
    if published.flops_g is not None:
        return published.flops_shape
    return tuple(config.data.crop_size) if config.data.crop_size else (512, 512)


def measure(config: Config, shape: tuple[int, int]) -> tuple[float, float]:
    """(parameters in M, inference MACs in G at `shape`) of the recipe's model, built on the meta device."""
    num_classes = len(DATASET_META[config.data.kind]["class_names"])
    args = {k: v for k, v in config.model.args.items() if k != "pretrained_backbone"}  # no download for counting
    with torch.device("meta"):
        model = upernet.build_model(config.model.name, num_classes=num_classes, **args).eval()
    stats = model_stats(model, shape)
    # The published parameter counts include the auxiliary head; in eval mode it does not run.
    return stats["params"] / 1e6, stats["macs"] / 1e9


def build_row(published: Published) -> Row:
    """Load the recipe, build its model, count, and compare with the published numbers (2% at most)."""
    path = RECIPES / f"{published.recipe}.yaml"
    if not path.exists():
        raise UserError(f"{path}: no recipe for the published row {published.checkpoint}")
    config = load_config(path)
    shape = stats_shape(published, config)
    params_m, macs_g = measure(config, shape)
    for what, ours, theirs in (("params (M)", params_m, published.params_m), ("FLOPs (G)", macs_g, published.flops_g)):
        if theirs is not None and abs(ours - theirs) > TOLERANCE * theirs:
            raise ValueError(f"{published.recipe}: {what} {ours:.1f} differ from the published {theirs} by more than "
                             f"{TOLERANCE:.0%} ({published.stats_source})")
    return Row(published, config, params_m, macs_g, shape)


def convert_command(row: Row, source: str = "") -> str:
    """`upernet convert` of the published file, or of `source` (a Hub id) into the same folder."""
    return f"upernet convert {source or row.published.checkpoint} models/{row.published.recipe}"


def hub_commands(row: Row) -> list[str]:
    """The row checked from its Hugging Face Hub repo: download and convert in one step, then the same evals."""
    return [convert_command(row, row.published.hub_id), *eval_commands(row)] if row.published.hub_id else []


def eval_commands(row: Row) -> list[str]:
    """The `upernet eval` commands of the published protocol: single scale, then multi-scale + flip if published."""
    config = row.config
    # The recipe holds the rest of the protocol: the resize (data.scale) and the slide window (val.*).
    base = f"upernet eval {row.published.recipe} -m models/{row.published.recipe} data.root=... --mode {config.val.mode}"
    commands = [base]
    if row.published.miou_ms is not None:
        commands.append(base + " --multi-scale --flip")
    return commands


def protocol(config: Config) -> str:
    scale = f"resize {config.data.scale[0]}x{config.data.scale[1]}" if config.data.scale else "original size"
    if config.val.mode == "slide":
        return f"slide {config.val.crop_size[0]}x{config.val.crop_size[1]} stride {config.val.stride[0]}, {scale}"
    return f"whole, {scale}"


def number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: list[Row], others: list[str]) -> str:
    lines = [
        "# Model zoo: published UPerNet results and the recipes that target them",
        "",
        "<!-- Generated by tools/model_zoo.py from upernet/configs/*.yaml and its PUBLISHED table; do not edit. -->",
        "<!-- Regenerate: python tools/model_zoo.py (CI runs --check through tests/test_model_zoo.py). -->",
        "",
        "Each row is one published result. `recipe` trains it (`upernet train RECIPE data.root=...`; the",
        "recipe's header names the source config, the schedule arithmetic and what differs). To check a",
        "published checkpoint, download the file under its published name, convert it (no option needed:",
        "the format, backbone and output stride are read from the weights and the file name), then evaluate",
        "it with the protocol the source reports (its single-scale number; multi-scale means scales",
        "0.5-1.75 with flip).",
        "",
        "Parameters include the auxiliary head, as the published counts do; MACs are multiply-adds of",
        "inference (the \"FLOPs\" of the published tables), counted at the published FLOPs input where one is published,",
        "else at the training crop. Where the source publishes them, ours match within 2% (the script fails",
        "otherwise).",
        "",
        "Sources: " + "; ".join(f"{name}: {where}" for name, where in SOURCES.items()) + ".",
        "",
        "| recipe | source | published mIoU (ss / ms+flip) | eval protocol | params M (ours / published) "
        "| MACs G (ours / published) at HxW |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row.published
        source = f"{p.source} (Hub `{p.hub_id}`)" if p.hub_id else p.source
        lines.append(
            f"| `{p.recipe}` | {source} | {p.miou:.2f} / {number(p.miou_ms, 2)} | {protocol(row.config)} "
            f"| {row.params_m:.1f} / {number(p.params_m, 0)} | {row.macs_g:.0f} / {number(p.flops_g, 0)} "
            f"at {row.shape[0]}x{row.shape[1]} |")
    lines += ["", "## Commands per row", ""]
    for row in rows:
        p = row.published
        lines += [f"### `{p.recipe}`", "",
                  f"{p.source} `{p.config}`; checkpoint `{p.checkpoint}`: mIoU {p.miou:.2f}"
                  + (f" (multi-scale + flip {p.miou_ms:.2f})" if p.miou_ms is not None else "") + ".", "",
                  "```bash", convert_command(row), *eval_commands(row), "```", ""]
        if p.hub_id:
            lines += [f"The same weights from the Hugging Face Hub (`{p.hub_id}`, transformers' conversion of this "
                      "file): `upernet convert` downloads the Hub id itself.", "",
                      "```bash", *hub_commands(row), "```", ""]
        if p.note:
            lines += [p.note, ""]
    hub_rows = [row.published for row in rows if row.published.hub_id]
    lines += ["## Hugging Face checkpoints", "",
              "The `openmmlab/upernet-*` repos on the Hugging Face Hub hold mmsegmentation's ConvNeXt and Swin",
              "checkpoints converted by transformers' `convert_convnext_upernet_to_pytorch.py` and",
              "`convert_swin_upernet_to_pytorch.py`; each is the published file of one row above (same architecture,",
              "so the same params/MACs check). `upernet convert HUB_ID OUT` downloads and converts it with no option.",
              "", "| Hub id | row | published checkpoint |", "|---|---|---|",
              *[f"| `{p.hub_id}` | `{p.recipe}` | `{p.checkpoint}` |" for p in hub_rows], ""]
    if HUB_WITHOUT_ROW:
        lines += ["Without a row yet: " + ", ".join(f"`{name}`" for name in HUB_WITHOUT_ROW) + ".", ""]
    if others:
        lines += ["## Recipes without a published row", "",
                  "These recipes target no published number (e.g. mmsegmentation's schedule on an output-stride",
                  "8/16 model):", "", *[f"- `{name}`" for name in others], ""]
    return "\n".join(lines)


def generate() -> str:
    """The page's text, after every recipe was loaded, built and compared with its published row."""
    rows = [build_row(p) for p in PUBLISHED]
    targeted = {p.recipe for p in PUBLISHED}
    others = []
    for path in sorted(RECIPES.glob("*.yaml")):
        if path.stem in NOT_ROWS or path.stem in targeted:
            continue
        config = load_config(path)  # every shipped recipe loads, even one without a published row
        if config.model.name not in upernet.list_models():
            raise ValueError(f"{path}: model {config.model.name} is not registered")
        others.append(path.stem)
    return render(rows, others)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/model_zoo.md differs from the generated page")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(PAGE), "generated", lineterm="")
            print("\n".join(diff))
            print(f"{PAGE} is out of date: run python tools/model_zoo.py", file=sys.stderr)
            return 1
        return 0
    write_text(PAGE, text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
