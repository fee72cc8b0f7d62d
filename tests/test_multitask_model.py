import pytest
import torch

import upernet
from upernet.models.multitask import PartLayout

SMALL_R50 = {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (4, 8, 16, 32), "stem_width": 8}}
TASKS = {"object": 5, "part": {"objects": [1, 3], "num_parts": [3, 2]}, "material": 4, "scene": 6, "texture": 7}


def build(tasks=TASKS, base="upernet_multitask_r50"):
    torch.manual_seed(0)
    return upernet.build_model(base, tasks=tasks, base_args=SMALL_R50, channels=16)


def test_outputs_per_task():
    model = build().eval()
    out = model(torch.randn(2, 3, 65, 70))
    assert out["object"].shape == (2, 5, 65, 70)
    assert out["part"].shape == (2, 5, 65, 70)  # 3 + 2 (object, part) channels
    assert out["material"].shape == (2, 4, 65, 70)
    assert out["scene"].shape == (2, 6) and out["texture"].shape == (2, 7)
    only = model(torch.randn(1, 3, 64, 64), tasks=["scene"])
    assert set(only) == {"scene"}


def test_texture_gradient_stops_at_backbone():
    model = build().train()
    model(torch.randn(2, 3, 64, 64), tasks=["texture"])["texture"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.heads["texture"].parameters())


def test_part_layout_slices():
    layout = PartLayout(objects=[1, 3], num_parts=[3, 2])
    logits = torch.arange(5.0).view(1, 5, 1, 1)
    (o1, s1), (o3, s3) = layout.split(logits)
    assert (o1, o3) == (1, 3)
    assert s1.flatten().tolist() == [0, 1, 2] and s3.flatten().tolist() == [3, 4]
    with pytest.raises(ValueError):
        PartLayout(objects=[1], num_parts=[1])


def test_any_registered_backbone_and_save_roundtrip(tmp_path):
    model = upernet.build_model(
        "upernet_multitask", tasks={"object": 3, "material": 2}, base="upernet_convnext_tiny",
        base_args={"backbone_args": {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}}, channels=16,
    ).eval()
    model.save(tmp_path / "multitask")
    loaded = upernet.load_model(tmp_path / "multitask")
    x = torch.randn(1, 3, 48, 48)
    for k, v in model(x).items():
        torch.testing.assert_close(loaded(x)[k], v)


def test_unknown_task_rejected():
    with pytest.raises(ValueError, match="tasks"):
        build(tasks={"depth": 1})


def test_part_loss_only_inside_parent_object_and_multi_part_objects():
    from upernet.models.multitask import part_loss

    layout = PartLayout(objects=[1, 3], num_parts=[3, 2])
    logits = torch.randn(1, 5, 4, 4, requires_grad=True)
    objects = torch.full((1, 4, 4), 0)
    objects[0, :2] = 1  # top half: object 1, with parts 1 and 2
    objects[0, 2:, :2] = 3  # object 3 with only one annotated part: no loss
    parts = torch.full((1, 4, 4), 255)
    parts[0, 0] = 1
    parts[0, 1] = 2
    parts[0, 2:, :2] = 1
    loss = part_loss(logits, objects, parts, layout)
    loss.backward()
    # Only the object-1 slice (channels 0..2) at object-1 pixels gets a gradient.
    grad = logits.grad[0]
    assert grad[3:].abs().sum() == 0
    assert grad[:3, 2:].abs().sum() == 0 and grad[:3, :2].abs().sum() > 0
    expected = torch.nn.functional.cross_entropy(logits[0, :3, :2].permute(1, 2, 0).reshape(-1, 3), parts[0, :2].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_heads_without_labels_get_no_gradient():
    from upernet.models.multitask import multitask_loss

    model = build().train()
    images = torch.randn(2, 3, 64, 64)
    outputs = model(images, tasks=["material", "object", "part", "scene"])
    targets = {"material": torch.randint(0, 4, (2, 64, 64))}  # a material-only source
    losses = multitask_loss(model, outputs, targets)
    assert set(losses) == {"material", "total"}
    losses["total"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.heads["scene"].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.heads["part"].parameters())
    assert model.decode_head.classifier.weight.grad is None or model.decode_head.classifier.weight.grad.abs().sum() == 0
    assert model.heads["material"][1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", upernet.list_models("upernet_multitask*"))
def test_registry_sweep_multitask(name):
    """Every multi-task variant: all heads' outputs finite, every parameter gets a gradient."""
    from upernet.models.multitask import multitask_loss

    base = {"upernet_multitask": {"base": "upernet_r50"}}.get(name, {})
    model = upernet.build_model(name, tasks=TASKS, base_args=SMALL_R50, channels=16, **base).train()
    images = torch.randn(2, 3, 66, 70)
    outputs = model(images)
    targets = {"object": torch.randint(0, 5, (2, 66, 70)), "material": torch.randint(0, 4, (2, 66, 70)),
               "scene": torch.randint(0, 6, (2,)), "texture": torch.randint(0, 7, (2,))}
    parts = torch.randint(0, 2, (2, 66, 70))  # valid for both objects with parts (3 and 2 part classes)
    targets["object"][:, :33] = 1  # object 1 (3 parts) fills the top half, its parts vary
    targets["part"] = parts
    losses = multitask_loss(model, outputs, targets)
    assert set(losses) == {"object", "material", "scene", "texture", "part", "total"}
    losses["total"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:10]


def test_models_saved_under_the_old_names_load(tmp_path):
    """Folders and training checkpoints written before the rename store "upernet_upp*" names."""
    import json

    model = build().eval()
    model.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config["model"] == "upernet_multitask_r50"
    config["model"] = "upernet_upp_r50"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    checkpoint = {"model": model.state_dict(), "iteration": 10, "meta": {}, "config": {},
                  "model_config": {"name": "upernet_upp_r50", "args": model.config["args"]}}
    torch.save(checkpoint, tmp_path / "old.pt")
    x = torch.randn(1, 3, 48, 48)
    for source in (tmp_path / "old", tmp_path / "old.pt"):
        loaded = upernet.load_model(source)
        assert loaded.config["name"] == "upernet_multitask_r50"  # saved again under the current name
        for k, v in model(x).items():
            torch.testing.assert_close(loaded(x)[k], v)


def test_old_names_are_aliases_not_listed():
    assert upernet.list_models("upernet_upp*") == []
    assert upernet.list_models("upernet_multitask*") == [
        "upernet_multitask", "upernet_multitask_r101", "upernet_multitask_r50"]
    with pytest.raises(ValueError, match="already registered"):
        from upernet.models.registry import register_alias
        register_alias("upernet_upp", "upernet_multitask")
