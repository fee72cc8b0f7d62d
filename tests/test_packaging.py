"""The package works once installed from its wheel, away from the repository.

Builds the wheel, installs it with `--no-deps --no-index` into a fresh venv that borrows the heavy
dependencies (torch, timm, ...) from the running interpreter's site-packages through a `.pth` file
(nothing is downloaded), then runs the installed `upernet` from a folder outside the repository.
This catches what the editable install of the test venv hides: a recipe, an asset or a C++ source
missing from `package-data`, or code that finds its files relative to the repository.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Files the build needs; copied so that setuptools' build/ and *.egg-info never land in the checkout
# (and a stale build/ left there cannot feed files into the wheel).
BUILD_INPUTS = ("pyproject.toml", "README.md", "upernet")
# Quick settings of the built-in recipe (see upernet/configs/builtin.yaml and upernet/config.py).
TINY_RUN = ["schedule.iters=2", "val.interval=0", "val.max_images=2", "data.options.image_size=64",
            "data.crop_size=[64,64]", "data.scale=[128,64]", "data.batch_size=2", "data.workers=0",
            "train.log_interval=1"]

pytestmark = pytest.mark.slow


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def package_files(root: Path) -> set[str]:
    """The files of the source package as wheel paths (`upernet/...`), without caches and hidden files."""
    return {p.relative_to(root.parent).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".") and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built offline with the running interpreter's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp / "dist", source], cwd=tmp)
    (built,) = (tmp / "dist").glob("upernet-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """(bin folder, environment) of a fresh venv with the wheel installed and the dependencies borrowed."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             cwd=tmp).stdout.strip())
    # A path line in a .pth only extends sys.path: the .pth files over there (among them the test
    # venv's editable install of this checkout) are not processed, so `upernet` comes from the wheel.
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder that is not inside the repository."""
    assert not tmp_path.resolve().is_relative_to(REPO)
    return tmp_path


def test_wheel_ships_every_package_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {n for n in names if n.startswith("upernet/configs/") and n.endswith(".yaml")}
    assert {"upernet/configs/builtin.yaml", "upernet/configs/multitask_builtin.yaml"} <= recipes
    assert "upernet/data/assets/sample.png" in names
    assert any(n.startswith("upernet/") and n.endswith("/dcnv3_cpu.cpp") for n in names), \
        "the DCNv3 C++ source (dcnv3_cpu.cpp) is not in the wheel"
    missing = package_files(REPO / "upernet") - names
    assert not missing, f"files of upernet/ missing from the wheel (add them to package-data): {sorted(missing)}"


def test_installed_package_is_the_wheel_and_has_its_files(installed, outside):
    bin_dir, env = installed
    script = ("import importlib.resources, upernet, upernet.config as c; root = importlib.resources.files('upernet');"
              "print(upernet.__file__); print(' '.join(c.list_recipes()));"
              "print((root / 'data' / 'assets' / 'sample.png').is_file());"
              "print(len(list(__import__('pathlib').Path(str(root)).rglob('dcnv3_cpu.cpp'))))")
    lines = run([bin_dir / "python", "-c", script], cwd=outside, env=env).stdout.splitlines()
    assert Path(lines[0]).resolve().is_relative_to(bin_dir.parent.resolve()), f"upernet imported from {lines[0]}"
    assert lines[1].split() == sorted(p.stem for p in (REPO / "upernet" / "configs").glob("*.yaml"))
    assert lines[2] == "True", "data/assets/sample.png is not installed"
    assert lines[3] == "1", "dcnv3_cpu.cpp is not installed (exactly once)"


def test_installed_cli_help(installed, outside):
    bin_dir, env = installed
    result = run([bin_dir / "upernet", "--help"], cwd=outside, env=env)
    assert "train" in result.stdout and "predict" in result.stdout


def test_installed_cli_trains_builtin_recipe(installed, outside):
    bin_dir, env = installed
    run([bin_dir / "upernet", "train", "builtin", *TINY_RUN, "--out", "run"], cwd=outside, env=env)
    model = outside / "run" / "model"
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert (outside / "run" / "config.yaml").is_file()
    # the run folder's model loads with the installed package
    check = "import sys, upernet; m = upernet.load_model(sys.argv[1]); print(type(m).__name__)"
    assert run([bin_dir / "python", "-c", check, model], cwd=outside, env=env).stdout.strip()
