"""Fixtures shared by several test files."""
import os
import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def compiled_dcnv3(tmp_path_factory):
    """DCNv3's optional compiled CPU kernel, built once per test session into a fresh folder (no
    cache from elsewhere). Skips only on a machine without a C++ compiler."""
    from upernet.models.backbones import dcnv3

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("the compiled DCNv3 kernel is built at run time and this machine has no C++ compiler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # pip's ninja
        dcnv3.compiled_kernel.cache_clear()
        yield dcnv3.compiled_kernel()
