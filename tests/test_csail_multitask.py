"""The authors' released Unified Perceptual Parsing network (CSAILVision/unifiedparsing): our layout
"csail" against their architecture as written in their models.py / resnet.py, re-derived here.

Their key names and their forward are written out below from their code (read, not imported: it
needs a CUDA build); Precise RoI Pooling is integrated numerically.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import upernet
from upernet.cli import main
from upernet.convert import FORMATS, detect_format
from upernet.labelsets import broden_plus_labels, broden_plus_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"backbone_args": {"layers": (1, 2, 1, 1), "channels": (4, 8, 16, 32), "stem_width": 8}}
SYNC_BN_EXTRA = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")


def small_csail(seed: int = 0, ppm_channels: int = 12):
    """A csail-layout Broden+ model with small widths, every weight and BatchNorm statistic random."""
    torch.manual_seed(seed)
    model = upernet.build_model("upernet_upp_r50", tasks=broden_plus_tasks(texture=False), layout="csail",
                                base_args=SMALL, channels=16, ppm_channels=ppm_channels)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif tensor.dim() > 1:  # conv and linear weights: unit-scale activations (float32 rounding stays small)
                tensor.normal_(0, 1.5 / tensor[0].numel() ** 0.5)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.3 if name.endswith(("running_mean", "bias")) else 0.5)
    return model.eval()


# ---- their state dict layout, from their models.py (Resnet wrapper, UPerNet) -------------------------

def bn_keys(prefix: str, bn) -> dict:
    """Their SynchronizedBatchNorm2d: _BatchNorm's tensors plus its three accumulators."""
    out = {f"{prefix}.{k}": v.clone() for k, v in bn.state_dict().items()}
    out.update({f"{prefix}._tmp_running_mean": bn.running_mean.clone(), f"{prefix}._tmp_running_var": bn.running_var.clone(),
                f"{prefix}._running_iter": torch.ones(1)})
    return out


def conv_bn_keys(prefix: str, block, conv_index="0", bn_index="1") -> dict:
    """A Sequential(Conv2d, SynchronizedBatchNorm2d, ReLU) of theirs from our ConvBNReLU."""
    return {f"{prefix}.{conv_index}.weight": block.conv.weight.clone(), **bn_keys(f"{prefix}.{bn_index}", block.bn)}


def their_state_dicts(model) -> tuple[dict, dict]:
    """(encoder, decoder) state dicts with the keys their models.py writes."""
    body = model.backbone.body
    encoder = {"conv1.weight": body.conv1[0].weight.flip(1).clone(),  # their input is BGR
               **bn_keys("bn1", body.conv1[1]), "conv2.weight": body.conv1[3].weight.clone(),
               **bn_keys("bn2", body.conv1[4]), "conv3.weight": body.conv1[6].weight.clone(), **bn_keys("bn3", body.bn1)}
    for n in range(1, 5):
        for k, block in enumerate(getattr(body, f"layer{n}")):
            for i in (1, 2, 3):
                encoder[f"layer{n}.{k}.conv{i}.weight"] = getattr(block, f"conv{i}").weight.clone()
                encoder.update(bn_keys(f"layer{n}.{k}.bn{i}", getattr(block, f"bn{i}")))
            if block.downsample is not None:
                encoder[f"layer{n}.{k}.downsample.0.weight"] = block.downsample[0].weight.clone()
                encoder.update(bn_keys(f"layer{n}.{k}.downsample.1", block.downsample[1]))
    head = model.decode_head
    decoder = {}
    for i, block in enumerate(head.ppm):
        decoder.update(conv_bn_keys(f"ppm_conv.{i}", block))
    decoder.update(conv_bn_keys("ppm_last_conv", head.ppm_bottleneck))
    for i, (lateral, out) in enumerate(zip(head.lateral_convs, head.fpn_convs)):
        decoder.update(conv_bn_keys(f"fpn_in.{i}", lateral))
        decoder.update(conv_bn_keys(f"fpn_out.{i}.0", out))
    decoder.update(conv_bn_keys("conv_fusion", head.fusion))
    scene = model.heads["scene"]
    decoder.update(conv_bn_keys("scene_head.0", scene.convs[0]))
    decoder["scene_head.2.weight"] = scene.classifier.weight[:, :, None, None].clone()
    decoder["scene_head.2.bias"] = scene.classifier.bias.clone()
    for name, (block, classifier) in {"object": tuple(head.classifier), "part": tuple(model.heads["part"]),
                                      "material": tuple(model.heads["material"])}.items():
        decoder.update(conv_bn_keys(f"{name}_head.0", block))
        decoder[f"{name}_head.1.weight"] = classifier.weight.clone()
        decoder[f"{name}_head.1.bias"] = classifier.bias.clone()
    return encoder, decoder


def save_pair(folder, model, epoch: int = 40):
    encoder, decoder = their_state_dicts(model)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, folder / f"encoder_epoch_{epoch}.pth")
    torch.save(decoder, folder / f"decoder_epoch_{epoch}.pth")
    return encoder, decoder


# ---- their forward, functional, on their state dicts ----------------------------------------------------

def bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)


def conv_bn_relu(x, sd, conv, norm, padding):
    return F.relu(bn(F.conv2d(x, sd[f"{conv}.weight"], padding=padding), sd, norm))


def their_encoder(x, sd):
    """resnet.py: 3x3 stem 64-64-128, max pool, Bottleneck stages (stride on the 3x3 conv)."""
    x = conv_bn_relu(F.conv2d(x, sd["conv1.weight"], stride=2, padding=1), {}, None, None, 0) if False else \
        F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=1), sd, "bn1"))
    x = conv_bn_relu(x, sd, "conv2", "bn2", 1)
    x = conv_bn_relu(x, sd, "conv3", "bn3", 1)
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for n in range(1, 5):
        k = 0
        while f"layer{n}.{k}.conv1.weight" in sd:
            p = f"layer{n}.{k}"
            stride = 2 if n > 1 and k == 0 else 1
            out = conv_bn_relu(x, sd, f"{p}.conv1", f"{p}.bn1", 0)
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
            k += 1
        outs.append(x)
    return outs


def bilinear_at(feature, y, x):
    """Their PrRoIPoolingInterpolation: the 4 neighbours, outside the map reading 0."""
    h, w = feature.shape[-2:]
    value = feature.new_zeros(feature.shape[0])
    for i in (math.floor(y), math.floor(y) + 1):
        for j in (math.floor(x), math.floor(x) + 1):
            if 0 <= i < h and 0 <= j < w:
                value += feature[:, i, j] * (1 - abs(y - i)) * (1 - abs(x - j))
    return value


def cells(a, b):
    """Midpoints and widths of [a, b] cut at the integers (the surface is bilinear on each cell)."""
    cuts = sorted({a, b, *range(math.ceil(a), math.floor(b) + 1)})
    return [((lo + hi) / 2, hi - lo) for lo, hi in zip(cuts[:-1], cuts[1:])]


def prroi_by_integration(x, scale):
    """PrRoIPool2D(scale, scale, 1.0) on the RoI (0, 0, W, H) of each map: a midpoint rule per cell
    (exact for a bilinear surface), in float64."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, scale, scale, dtype=torch.float64)
    bh, bw = h / scale, w / scale
    for b in range(n):
        feature = x[b].double()
        for p in range(scale):
            for q in range(scale):
                total = 0
                for y, dy in cells(p * bh, (p + 1) * bh):
                    for xx, dx in cells(q * bw, (q + 1) * bw):
                        total = total + bilinear_at(feature, y, xx) * dy * dx
                out[b, :, p, q] = total / (bh * bw)
    return out.to(x.dtype)


def their_decoder(conv_out, sd):
    """models.py UPerNet.forward (training branch without log_softmax: raw logits at 1/4, scene (N, K))."""
    up = lambda t, size: F.interpolate(t, size, mode="bilinear", align_corners=False)  # noqa: E731
    conv5 = conv_out[-1]
    size = conv5.shape[2:]
    ppm_out = [conv5]
    for i, scale in enumerate((1, 2, 3, 6)):
        ppm_out.append(conv_bn_relu(up(prroi_by_integration(conv5, scale), size), sd, f"ppm_conv.{i}.0", f"ppm_conv.{i}.1", 0))
    f = conv_bn_relu(torch.cat(ppm_out, 1), sd, "ppm_last_conv.0", "ppm_last_conv.1", 1)
    out = {"scene": F.conv2d(F.adaptive_avg_pool2d(conv_bn_relu(f, sd, "scene_head.0.0", "scene_head.0.1", 1), 1),
                             sd["scene_head.2.weight"], sd["scene_head.2.bias"]).flatten(1)}
    fpn = [f]
    for i in reversed(range(len(conv_out) - 1)):
        lateral = conv_bn_relu(conv_out[i], sd, f"fpn_in.{i}.0", f"fpn_in.{i}.1", 0)
        f = lateral + up(f, lateral.shape[2:])
        fpn.append(conv_bn_relu(f, sd, f"fpn_out.{i}.0.0", f"fpn_out.{i}.0.1", 1))
    fpn.reverse()
    head = lambda t, name: F.conv2d(conv_bn_relu(t, sd, f"{name}_head.0.0", f"{name}_head.0.1", 1),  # noqa: E731
                                    sd[f"{name}_head.1.weight"], sd[f"{name}_head.1.bias"])
    out["material"] = head(fpn[0], "material")
    fused = torch.cat([fpn[0]] + [up(t, fpn[0].shape[2:]) for t in fpn[1:]], 1)
    fused = conv_bn_relu(fused, sd, "conv_fusion.0", "conv_fusion.1", 1)
    out["object"], out["part"] = head(fused, "object"), head(fused, "part")
    return out


# ---- tests ----------------------------------------------------------------------------------------------

def test_label_sets_match_their_csv_counts():
    labels = broden_plus_labels()
    assert [len(labels[k]) for k in ("objects", "parts", "scenes", "materials", "textures")] == [336, 153, 365, 26, 47]
    assert labels["objects"][0] == labels["parts"][0] == labels["materials"][0] == "-"
    assert len(labels["hierarchy"]) == 77 and all(h["parts"][0] == 0 for h in labels["hierarchy"])
    person = next(h for h in labels["hierarchy"] if labels["objects"][h["object"]] == "person")
    assert [labels["parts"][p] for p in person["parts"][:3]] == ["-", "leg", "head"]
    tasks = broden_plus_tasks()
    assert tasks["texture"] == 47 and sum(tasks["part"]["num_parts"]) == 427


@pytest.mark.slow
def test_upp_r50_builds_without_arguments():
    """Like upernet_r50 with ADE20K's 150: the authors' Broden+ network, names and hierarchy in the meta."""
    model = upernet.build_model("upernet_upp_r50")
    assert model.layout == "csail" and model.config == {"name": "upernet_multitask_r50", "args": {}}
    assert model.tasks == broden_plus_tasks()
    assert model.meta["tasks_meta"]["parts"]["person"][:2] == ["-", "leg"]
    assert model.backbone.body.conv1[6].out_channels == 128  # their deep stem 64-64-128
    assert model.decode_head.ppm[0].conv.out_channels == 512 and model.decode_head.fusion.conv.out_channels == 512


def test_given_tasks_keep_the_paper_layout():
    model = upernet.build_model("upernet_multitask_r50", tasks={"object": 3, "scene": 2}, base_args=SMALL, channels=8)
    assert model.layout == "paper" and type(model.decode_head).__name__ == "UPerHead"


def test_pair_round_trip_through_upernet_convert(tmp_path, capsys):
    model = small_csail()
    encoder, decoder = save_pair(tmp_path / "upp", model)
    assert "bn1.num_batches_tracked" in encoder and "conv_fusion.1._running_iter" in decoder
    assert detect_format(tmp_path / "upp") == "csail_upp"
    assert not FORMATS["csail"].detect(tmp_path / "upp")  # mit-semseg's pair is a different layout
    assert main(["convert", "--list-formats"]) == 0 and "csail_upp" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "upp"), str(tmp_path / "ours")]) == 0
    loaded = upernet.load_model(tmp_path / "ours")
    assert loaded.layout == "csail" and loaded.meta["mean"] == [122.7717, 115.9465, 102.9801]
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_converter_is_strict(tmp_path):
    model = small_csail()
    encoder, decoder = their_state_dicts(model)
    decoder["object_head.9.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    torch.save(encoder, tmp_path / "bad" / "encoder_epoch_1.pth")
    torch.save(decoder, tmp_path / "bad" / "decoder_epoch_1.pth")
    with pytest.raises(upernet.UserError, match="object_head.9.weight"):
        FORMATS["csail_upp"].convert(tmp_path / "bad")


def test_pair_without_batch_counters_converts(tmp_path):
    """Checkpoints saved before PyTorch 0.4.1 have no num_batches_tracked."""
    model = small_csail(seed=1, ppm_channels=16)
    encoder, decoder = their_state_dicts(model)
    (tmp_path / "old").mkdir()
    for name, sd in (("encoder", encoder), ("decoder", decoder)):
        torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old" / f"{name}_epoch_5.pth")
    ours = FORMATS["csail_upp"].convert(tmp_path / "old")
    assert ours.decode_head.ppm[0].conv.out_channels == 16


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_forward_matches_their_forward(tmp_path, size):
    """Converted model on RGB vs their forward, re-derived above, on the same image in BGR."""
    model = small_csail(seed=2)
    encoder, decoder = save_pair(tmp_path / "upp", model)
    ours = FORMATS["csail_upp"].convert(tmp_path / "upp")
    torch.manual_seed(3)
    rgb = torch.randn(2, 3, *size) * 2
    with torch.no_grad():
        out = ours(rgb)
        theirs = their_decoder(their_encoder(rgb.flip(1), encoder), decoder)
    resize = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=False)  # noqa: E731  (their inference)
    torch.testing.assert_close(out["scene"], theirs["scene"], rtol=1e-4, atol=1e-4)
    for task in ("object", "material", "part"):
        torch.testing.assert_close(out[task], resize(theirs[task]), rtol=1e-4, atol=1e-4)
    # their per-object part softmax, in object_part_hierarchy order
    head = 0
    for (obj, logits), entry in zip(ours.part_layout.split(out["part"]), broden_plus_labels()["hierarchy"]):
        n = len(entry["parts"])
        assert obj == entry["object"]
        torch.testing.assert_close(logits.softmax(1), resize(theirs["part"][:, head:head + n]).softmax(1),
                                   rtol=1e-4, atol=1e-4)
        head += n
