"""docs/model_zoo.md is what tools/model_zoo.py generates from the recipes and the published table, and
the generator refuses a recipe whose model does not match the published parameters/FLOPs."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", ROOT / "tools" / "model_zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_zoo"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_model_zoo_page_is_regenerated_without_a_diff(zoo, capsys):
    """CI's check: every recipe loads and builds, params/MACs match the published ones within 2%, and the
    committed page is the generated one."""
    assert zoo.main(["--check"]) == 0, capsys.readouterr().out


def test_every_published_row_has_a_recipe_and_every_recipe_is_on_the_page(zoo):
    recipes = {p.stem for p in zoo.RECIPES.glob("*.yaml")} - zoo.NOT_ROWS
    targeted = [p.recipe for p in zoo.PUBLISHED]
    assert len(targeted) == len(set(targeted)), "two published rows name the same recipe"
    assert set(targeted) <= recipes
    page = zoo.PAGE.read_text()
    assert all(f"`{name}`" in page for name in recipes)
    sssegmentation = [p for p in zoo.PUBLISHED if p.source == "sssegmentation"]
    assert len(sssegmentation) == 12 and len([p for p in zoo.PUBLISHED if p.source == "InternImage"]) == 5


def test_a_model_that_does_not_match_the_published_counts_is_an_error(zoo):
    row = next(p for p in zoo.PUBLISHED if p.recipe == "upernet_r50_d16_voc12aug_512x512_60e")
    params_m, macs_g = zoo.measure(zoo.load_config(zoo.RECIPES / f"{row.recipe}.yaml"), (64, 64))
    close = dataclasses.replace(row, flops_shape=(64, 64), params_m=params_m * 1.015, flops_g=macs_g * 0.985)
    assert zoo.build_row(close).params_m == params_m
    with pytest.raises(ValueError, match=r"params \(M\) .* differ from the published .* by more than 2%"):
        zoo.build_row(dataclasses.replace(close, params_m=params_m * 1.03))
    with pytest.raises(ValueError, match=r"FLOPs \(G\) .* differ from the published .* by more than 2%"):
        zoo.build_row(dataclasses.replace(close, flops_g=macs_g * 0.97))


def test_commands_follow_the_published_protocol(zoo):
    by_recipe = {p.recipe: p for p in zoo.PUBLISHED}
    ssseg = zoo.build_row(by_recipe["upernet_r50_d8_voc12aug_512x512_60e"])
    assert zoo.convert_command(ssseg) == ("upernet convert upernet_resnet50os8_voc_train.pth "
                                          "models/upernet_r50_d8_voc12aug_512x512_60e")
    assert zoo.eval_commands(ssseg) == ["upernet eval upernet_r50_d8_voc12aug_512x512_60e -m "
                                        "models/upernet_r50_d8_voc12aug_512x512_60e data.root=... --mode whole"]
    convnext = zoo.build_row(by_recipe["upernet_convnext_tiny_ade20k_512x512_160k"])
    single, multi = zoo.eval_commands(convnext)
    assert "--mode slide" in single and multi == single + " --multi-scale --flip"


def test_every_recipe_header_names_its_published_row(zoo):
    """The header of a recipe says which published number it targets (its mIoU and checkpoint file) and
    what differs; a recipe without a published row says so."""
    targeted = {p.recipe: p for p in zoo.PUBLISHED}
    for path in sorted(zoo.RECIPES.glob("*.yaml")):
        if path.stem in zoo.NOT_ROWS:
            continue
        header = " ".join(line.lstrip("# ") for line in path.read_text().split("\nmodel:\n")[0].splitlines())
        if path.stem not in targeted:
            assert "no published row" in header, path.name
            continue
        row = targeted[path.stem]
        assert f"{row.miou:.2f}" in header or f"{row.miou:g}" in header, path.name
        assert row.checkpoint in header and row.config.rsplit("/", 1)[-1] in header, path.name
        assert "Differs:" in header, path.name


def test_hugging_face_repos_are_rows_with_a_hub_convert_command(zoo):
    """Each openmmlab/upernet-* repo is transformers' conversion of one published mmsegmentation file: it is
    the `hub_id` of that row (so the row's params/MACs check covers it) and the row's commands convert the
    Hub id directly, then evaluate as the published file's commands do."""
    hub_rows = {p.hub_id: p for p in zoo.PUBLISHED if p.hub_id}
    expected = {f"openmmlab/upernet-convnext-{size}" for size in ("tiny", "small", "base", "large", "xlarge")}
    expected |= {f"openmmlab/upernet-swin-{size}" for size in ("tiny", "small", "base", "large")}
    assert len(hub_rows) == len([p for p in zoo.PUBLISHED if p.hub_id]), "two rows name the same Hub repo"
    assert set(hub_rows) | set(zoo.HUB_WITHOUT_ROW) == expected and not set(hub_rows) & set(zoo.HUB_WITHOUT_ROW)
    assert all(p.source == "mmsegmentation" for p in hub_rows.values())
    # transformers' scripts: ConvNeXt-B is the 512x512 row, Swin-B the window-12 ImageNet-22K one
    assert hub_rows["openmmlab/upernet-convnext-base"].checkpoint.endswith("_20220227_181227-02a24fc6.pth")
    assert hub_rows["openmmlab/upernet-swin-base"].recipe == "upernet_swin_base_in22k_ade20k_512x512_160k"
    assert hub_rows["openmmlab/upernet-swin-large"].checkpoint.endswith("_20220318_091743-9ba68901.pth")
    row = zoo.build_row(hub_rows["openmmlab/upernet-convnext-small"])
    convert, *evals = zoo.hub_commands(row)
    assert convert == "upernet convert openmmlab/upernet-convnext-small models/upernet_convnext_small_ade20k_512x512_160k"
    assert evals == zoo.eval_commands(row) and len(evals) == 2
    page = zoo.PAGE.read_text()
    assert all(f"upernet convert {hub} models/{p.recipe}" in page for hub, p in hub_rows.items())
    assert zoo.hub_commands(zoo.build_row(next(p for p in zoo.PUBLISHED if not p.hub_id))) == []
