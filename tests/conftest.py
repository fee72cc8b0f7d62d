"""Fixtures shared by several test files."""
import os
import shutil
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    """A test that needs the compiled DCNv3 kernel is `slow` in whichever file it is: the first one
    builds the kernel (a minute or more on 2 cores)."""
    for item in items:
        if "compiled_dcnv3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def compiled_dcnv3(tmp_path_factory):
    """DCNv3's optional compiled CPU kernel, built once per test session into a fresh folder (no
    cache from elsewhere). Skips only on a machine without a C++ compiler."""
    from upernet.ops import dcnv3

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("the compiled DCNv3 kernel is built at run time and this machine has no C++ compiler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # pip's ninja
        dcnv3.compiled_kernel.cache_clear()
        yield dcnv3.compiled_kernel()


# ---- the one tiny-model factory ----------------------------------------------------------------
# Reduced widths/depths so that every registered variant runs in well under a second on 2 cores.
SMALL_BACKBONE = {
    "upernet_convnext_*": {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)},
    "upernet_internimage_*": {"channels": 8, "depths": (1, 1, 1, 1), "groups": (1, 2, 2, 4)},
    "upernet_r*": {"layers": (1, 1, 1, 1), "channels": (4, 8, 16, 32), "stem_width": 8},
    "upernet_swin_*": {"embed_dim": 8, "depths": (2, 2, 1, 1), "num_heads": (1, 1, 2, 2), "window_size": 3},
    "upernet_timm": {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)},
}
HEAD = {"channels": 16, "aux_channels": 8}
TINY_TASKS = {"object": 5, "part": {"objects": [1, 3], "num_parts": [3, 2]}, "material": 4, "scene": 6, "texture": 7}


def small_args(name: str) -> dict:
    """Reduced-size constructor arguments of a registered single-task variant."""
    import fnmatch

    for pattern, args in SMALL_BACKBONE.items():
        if fnmatch.fnmatch(name, pattern):
            return {"backbone_args": args, **HEAD}
    raise KeyError(f"no reduced-size arguments for {name}: add them to SMALL_BACKBONE in tests/conftest.py")


def tiny_model(name: str, num_classes: int = 5, seed: int = 0, **overrides):
    """Any registered variant at a tiny size with seeded weights; the multi-task ones get `TINY_TASKS`
    (or `tasks=`) on a reduced ResNet-50."""
    import torch

    import upernet

    torch.manual_seed(seed)
    if name.startswith("upernet_multitask"):
        args = {"tasks": TINY_TASKS, "channels": 16,
                "base_args": {"backbone_args": SMALL_BACKBONE["upernet_r*"]}}
        if name == "upernet_multitask":
            args["base"] = "upernet_r50"
        return upernet.build_model(name, **{**args, **overrides})
    return upernet.build_model(name, num_classes=num_classes, **{**small_args(name), **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and do not spin-wait on a busy machine; a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def segment_in_one_batch(segmenter, images: list) -> tuple[dict, list]:
    """Queue `images` on a serve BatchWorker and run them in one forward pass: (batch sizes, results)."""
    from upernet.serve.batching import BatchWorker, Job

    worker = BatchWorker(segmenter, max_queue=4, max_batch=4)
    try:
        jobs = [Job(image) for image in images]
        assert all(worker.prepare(job) for job in jobs)
        results = worker.segment_together(jobs)
    finally:
        worker.close()
    return dict(worker.batch_sizes), results
