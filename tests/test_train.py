"""The training engine: schedule, parameter groups, sampler, resume exactness, NaN stop, DDP, CLI runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import upernet
from upernet import cli
from upernet.training.checkpoint import load_checkpoint, non_finite, periodic_checkpoints
from upernet.config import OptimConfig, ScheduleConfig, load_config
from upernet.training.optim import PolySchedule, build_optimizer, param_groups, poly_lr
from upernet.training.loop import InfiniteSampler, TrainingDiverged, train

# The built-in recipe shrunk to seconds: a 0.2 M-parameter ConvNeXt (LayerNorm only in the backbone)
# with a 16-channel head on 32x32 synthetic scenes.
TINY = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8}",
        "data.options={num_samples: 16, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
        "data.batch_size=2", "data.workers=0", "val.interval=0", "val.max_images=2", "train.log_interval=1",
        "train.checkpoint_interval=2", "schedule.warmup_iters=2", "optim.lr=0.01"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def tiny_config(*overrides: str):
    return load_config(None, TINY + list(overrides))


def weights(run_dir: Path) -> dict:
    return upernet.load_model(run_dir / "model").state_dict()


# ---- schedule and parameter groups --------------------------------------------------------------
def test_poly_with_linear_warmup_values():
    cfg = ScheduleConfig(iters=100, warmup_iters=10, warmup_ratio=1e-6, power=0.9, min_lr=1e-4)
    base = 0.01
    # mmsegmentation: poly on the whole run, times the linear warmup factor during warmup.
    for it in (0, 5, 10, 50, 99, 100):
        poly = (base - 1e-4) * (1 - it / 100) ** 0.9 + 1e-4
        factor = 1 - (1 - it / 10) * (1 - 1e-6) if it < 10 else 1.0
        assert poly_lr(it, base, cfg) == pytest.approx(poly * factor, rel=1e-12)
    assert poly_lr(0, base, cfg) == pytest.approx((base - 1e-4) * 1e-6 + 1e-4 * 1e-6)
    assert poly_lr(100, base, cfg) == pytest.approx(1e-4)

    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=base))
    schedule = PolySchedule(opt, cfg)
    for _ in range(50):
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(poly_lr(50, base, cfg))
    again = PolySchedule(opt, cfg)
    again.load_state_dict(schedule.state_dict())
    assert again.get_last_lr() == schedule.get_last_lr()


def test_no_weight_decay_groups():
    model = upernet.build_model("upernet_timm", model_name="test_convnext", num_classes=3, channels=8, aux_channels=8)
    groups = param_groups(model, OptimConfig(weight_decay=0.05, no_weight_decay=["norm", "bias"]))
    decay = {n for g in groups if g["weight_decay"] for n in g["param_names"]}
    no_decay = {n for g in groups if not g["weight_decay"] for n in g["param_names"]}
    assert "decode_head.classifier.bias" in no_decay and "decode_head.fusion.bn.weight" in no_decay
    assert "backbone.body.stem_1.weight" in no_decay  # the stem's LayerNorm
    assert "decode_head.classifier.weight" in decay and "backbone.body.stem_0.weight" in decay
    # ConvNeXt's layer scale (gamma, 1-D) keeps decay under "norm"/"bias" but not under mmseg's "1d" rule.
    gamma = next(n for n in decay if n.endswith(".gamma"))
    one_d = param_groups(model, OptimConfig(weight_decay=0.05, no_weight_decay=["1d"]))
    assert gamma in {n for g in one_d if not g["weight_decay"] for n in g["param_names"]}
    pos = param_groups(upernet.build_model("upernet_swin_tiny", num_classes=3, backbone_args={"depths": (1, 1, 1, 1)}),
                       OptimConfig(weight_decay=0.01, no_weight_decay=["pos"]))
    tables = [n for g in pos for n in g["param_names"] if n.endswith("relative_position_bias_table")]
    assert tables and all(not g["weight_decay"] for g in pos for n in g["param_names"] if n in tables)


def test_auto_layer_decay_is_layer_wise_where_a_rule_exists_and_one_lr_elsewhere():
    import warnings

    from upernet.config import ConfigNote

    convnext = upernet.build_model("upernet_convnext_tiny", num_classes=3, channels=8, aux_channels=8,
                                   backbone_args={"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]})
    cfg = OptimConfig(layer_decay_type="auto", layer_decay_rate=0.9, layer_decay_num_layers=6)
    scales = lambda groups: sorted({g["lr_scale"] for g in groups})  # noqa: E731
    assert scales(param_groups(convnext, cfg)) == scales(param_groups(convnext, OptimConfig(
        layer_decay_type="layer_wise", layer_decay_rate=0.9, layer_decay_num_layers=6)))
    assert len(scales(param_groups(convnext, cfg))) > 1
    resnet = upernet.build_model("upernet_timm", model_name="resnet18", num_classes=3, channels=8, aux_channels=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigNote)
        assert scales(param_groups(resnet, cfg)) == [1.0]
    assert any("no layer-wise rule" in str(w.message) for w in caught)


def test_convnext_stage_wise_lr_scales_as_mmsegmentation():
    model = upernet.build_model("upernet_timm", model_name="test_convnext", num_classes=3, channels=8, aux_channels=8)
    cfg = OptimConfig(name="adamw", lr=1e-4, layer_decay_type="stage_wise", layer_decay_rate=0.9, layer_decay_num_layers=6)
    opt = build_optimizer(model, cfg)
    scale = {n: g["lr"] / 1e-4 for g in opt.param_groups for n in g["param_names"]}
    # mmseg: num_layers + 2 = 8 ids; stem/downsampling id 0, stage s id s + 1, the rest id 7; scale 0.9 ** (7 - id).
    assert scale["backbone.body.stem_0.weight"] == pytest.approx(0.9 ** 7)
    assert scale["backbone.body.stages_1.downsample.1.weight"] == pytest.approx(0.9 ** 7)
    for s in range(4):
        block = next(n for n in scale if n.startswith(f"backbone.body.stages_{s}.blocks.0."))
        assert scale[block] == pytest.approx(0.9 ** (6 - s))
    assert scale["decode_head.classifier.weight"] == pytest.approx(1.0)


def test_convnext_layer_wise_ids_as_mmsegmentation():
    from upernet.training.optim import convnext_layer_id

    model = upernet.build_model("upernet_timm", model_name="convnext_atto", num_classes=3, channels=8, aux_channels=8,
                                output_norms=True)
    # mmseg: stem 0; stage 0 -> 1; stage 1 and its downsampling -> 2; stage 2 -> 3 + block // 3 (its
    # downsampling 3); stage 3 and its downsampling -> num_layers; the rest num_layers + 1.
    expected = {"backbone.body.stem_0.weight": 0, "backbone.body.stages_0.blocks.1.conv_dw.weight": 1,
                "backbone.body.stages_1.downsample.1.weight": 2, "backbone.body.stages_1.blocks.0.conv_dw.weight": 2,
                "backbone.body.stages_2.downsample.1.weight": 3, "backbone.body.stages_2.blocks.5.conv_dw.weight": 4,
                "backbone.body.stages_3.downsample.1.weight": 12, "backbone.body.stages_3.blocks.1.conv_dw.weight": 12,
                "backbone.output_norms.0.weight": 13, "decode_head.classifier.weight": 13}
    names = dict(model.named_parameters())
    assert set(expected) <= set(names)
    assert {n: convnext_layer_id(n, 12, model) for n in expected} == expected


def test_swin_layer_wise_lr_scales():
    model = upernet.build_model("upernet_swin_tiny", num_classes=3, backbone_args={"depths": (1, 1, 2, 1)})
    cfg = OptimConfig(name="adamw", lr=1.0, layer_decay_type="layer_wise", layer_decay_rate=0.5, layer_decay_num_layers=5)
    groups = param_groups(model, cfg)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    # ids: patch embed 0, blocks 1..5 through the stages, head 6; scale 0.5 ** (6 - id)
    assert scale["backbone.patch_embed.proj.weight"] == 0.5 ** 6
    assert scale["backbone.stages.2.blocks.1.attn.qkv.weight"] == 0.5 ** (6 - 4)
    assert scale["backbone.stages.3.blocks.0.attn.qkv.weight"] == 0.5 ** (6 - 5)
    assert scale["backbone.stages.0.downsample.reduction.weight"] == 0.5 ** (6 - 1)
    assert scale["decode_head.classifier.weight"] == 1.0


def test_layer_decay_for_an_unknown_family_is_a_clear_error():
    model = upernet.build_model("upernet_timm", model_name="test_resnet", num_classes=3, channels=8, aux_channels=8)
    with pytest.raises(ValueError, match="no stage_wise layer decay is registered for model 'upernet_timm'"):
        param_groups(model, OptimConfig(layer_decay_type="stage_wise"))


# ---- data order -----------------------------------------------------------------------------------
def test_infinite_sampler_shards_and_restarts_at_its_position():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(InfiniteSampler(10, seed=1), 30)
    ranks = [take(InfiniteSampler(10, seed=1, rank=r, world_size=2), 15) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == single  # 2 shards interleave to the 1-process stream
    assert sorted(i for i, _ in single[:10]) == list(range(10))  # each epoch is a permutation
    assert single[:10] != single[10:20]
    assert take(InfiniteSampler(10, seed=1, start=7), 5) == single[7:12]  # resume = the same continuation


# ---- whole runs -----------------------------------------------------------------------------------
def test_resume_gives_the_weights_of_the_uninterrupted_run(tmp_path):
    # Dropout, drop path, augmentation and a DataLoader worker all draw random numbers.
    overrides = ["schedule.iters=4", "data.workers=1", "model.args.backbone_args={drop_path_rate: 0.2}"]
    straight = train(tiny_config(*overrides), tmp_path / "straight", progress=False)
    first = train(tiny_config(*overrides), tmp_path / "split", stop_at=2, progress=False)
    assert first["iteration"] == 2 and not (tmp_path / "split" / "model").exists()
    resumed = train(tiny_config(*overrides), tmp_path / "split", resume=tmp_path / "split", progress=False)
    assert resumed["iteration"] == straight["iteration"] == 4
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the straight run"
    assert resumed["loss"] == straight["loss"]
    state = load_checkpoint(tmp_path / "split" / "checkpoints" / "iter_0000002.pt")
    assert state["data"] == {"samples_per_rank": 4, "epoch": 0, "index": 4, "world_size": 1}
    assert state["config"]["schedule"]["iters"] == 4
    for key in ("model", "optimizer", "schedule", "scaler", "iteration", "rng", "best_mIoU"):
        assert key in state


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = upernet.UPerNet.forward, []

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        if "loss" in outputs:  # a training step (validation calls return logits)
            calls.append(1)
            if len(calls) == 3:
                outputs = {"loss": outputs["loss"] * float("nan")}
        return outputs

    monkeypatch.setattr(upernet.UPerNet, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at iteration 3.*iter_0000002.pt"):
        train(tiny_config("schedule.iters=6", "train.checkpoint_interval=1"), tmp_path, progress=False)
    files = periodic_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files] == ["iter_0000001.pt", "iter_0000002.pt"]
    assert not non_finite(load_checkpoint(files[-1])["model"])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_total_batch(tmp_path):
    # BatchNorm frozen (gloo has no SyncBN), no dropout, loss averaged over all pixels: 2 x batch 1
    # with averaged gradients is then the same optimisation as 1 x batch 2.
    same = ["model.norm_eval=true", "model.args={model_name: test_convnext, channels: 16, aux_channels: 8, dropout: 0.0}",
            "train.loss_average=all", "schedule.iters=3", "val.max_images=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "upernet.cli",
           "train", *TINY, *same, "data.batch_size=1", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(tiny_config(*same, "data.batch_size=2"), tmp_path / "single", progress=False)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"][-1]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] == pytest.approx(single["loss"], rel=1e-4)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert val[key] == pytest.approx(single["val"][key], abs=0.05)


def test_cli_run_on_the_builtin_dataset_with_resume_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "schedule.iters=20", "val.interval=10", "train.checkpoint_interval=5", "--out", str(run)]
    assert cli.main(args + ["--stop-at", "10"]) == 0
    assert cli.main(args) == 2  # the folder has checkpoints: refuse to start over it
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(run)]) == 0  # config taken from the checkpoint

    assert load_config(run / "config.yaml").schedule.iters == 20
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == list(range(1, 21))
    val = [r for r in records if r["kind"] == "val"]
    assert [r["iter"] for r in val] == [10, 20] and all(0 <= r["mIoU"] <= 100 for r in val)
    assert [p.name for p in periodic_checkpoints(run / "checkpoints")] == ["iter_0000015.pt", "iter_0000020.pt"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_mIoU"] == max(r["mIoU"] for r in val)
    model = upernet.load_model(run / "model")
    assert model.meta["class_names"][:2] == ["sky", "water"] and len(model.meta["palette"]) == model.num_classes == 7
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")

    assert cli.main(["plot", str(run)]) == 0
    for name in ("loss.png", "lr.png", "miou.png"):
        with Image.open(run / "plots" / name) as image:
            assert image.size == (640, 400) and len(image.getcolors(1 << 16)) > 2
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    same = ["model.norm_eval=true", "model.args={model_name: test_convnext, channels: 16, aux_channels: 8, dropout: 0.0}",
            "train.loss_average=all", "schedule.iters=2"]
    accumulated = train(tiny_config(*same, "data.batch_size=1", "optim.accumulate=2"), tmp_path / "acc", progress=False)
    batched = train(tiny_config(*same, "data.batch_size=2"), tmp_path / "batch", progress=False)
    a, b = weights(tmp_path / "acc"), weights(tmp_path / "batch")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert accumulated["loss"] == pytest.approx(batched["loss"], rel=1e-4)


def test_bf16_autocast_on_cpu_trains_float32_weights(tmp_path):
    result = train(tiny_config("train.precision=bf16", "schedule.iters=2", "train.device=cpu"), tmp_path, progress=False)
    assert math.isfinite(result["loss"])
    assert all(v.dtype == torch.float32 for v in weights(tmp_path).values() if v.is_floating_point())
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(tiny_config("train.precision=fp16", "train.device=cpu"), tmp_path / "fp16", progress=False)
