"""`upernet predict --engine ray`: same bytes as single-process predict, a manifest, resumable after a kill.

One local Ray cluster (`ray.init(num_cpus=2)`, temp dir under the test's tmp dir) for the module:
Ray's start-up takes seconds, so the tests are few and marked slow + distributed.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local two-CPU Ray cluster for this module; yields its address (for subprocess drivers)."""
    temp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, _temp_dir=str(temp), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model and a folder of small images (one in a sub-folder)."""
    import upernet

    root = tmp_path_factory.mktemp("data")
    upernet.save_model(tiny_model("upernet_convnext_tiny"), root / "model")
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    for i in range(10):
        folder = root / "images" / ("sub" if i == 0 else "")
        Image.fromarray(rng.integers(0, 255, (32 + 2 * i, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return root


def reference(setup, tmp_path, save_probs=True) -> Path:
    """The single-process predict outputs of the setup images."""
    from upernet.inference.predict import predict

    out = tmp_path / "reference"
    predict(str(setup / "model"), [setup / "images"], out, size="none", save_probs=save_probs, progress=False,
            device="cpu", workers=0)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.jsonl"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_same_bytes_as_single_process_and_a_bad_image_is_recorded(cluster, setup, tmp_path):
    from upernet.inference.batch import predict_ray

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "ray"
    result = predict_ray(str(setup / "model"), [setup / "images", bad], out, batch_size=2, save_probs=True,
                         size="none", device="cpu", progress=False)
    assert len(result.written) == 10 and [s for s, _ in result.failures] == [str(bad)]
    expected = files(reference(setup, tmp_path))
    assert files(out) == expected  # byte for byte, sub-folder mirrored, no temp files left
    by_source = {r["source"]: r for r in rows(out)}
    assert "cannot read the image" in by_source[str(bad)]["error"]
    first = by_source[str(setup / "images" / "sub" / "im0.png")]
    assert first["error"] is None and (first["height"], first["width"]) == (32, 40)
    assert [Path(p).name for p in first["outputs"]] == ["im0_labels.png", "im0_overlay.png", "im0_probs.npy"]
    labels = np.array(Image.open(first["outputs"][0]))
    assert first["classes"] == sorted(int(c) for c in np.unique(labels))

    again = predict_ray(str(setup / "model"), [setup / "images", bad], out, save_probs=True, size="none",
                        device="cpu", progress=False)
    assert len(again.skipped) == 10 and not again.written and len(again.failures) == 1  # only the bad one retried


def test_killed_run_then_rerun_does_every_image_once(cluster, setup, tmp_path):
    from upernet.inference.batch import predict_ray

    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "upernet.cli", "predict", str(setup / "images"), "--model", str(setup / "model"),
           "--out", str(out), "--size", "none", "--device", "cpu", "--engine", "ray", "--address", cluster,
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 3:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, mid-job
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    done_before = {r["source"] for r in rows(out)}
    assert 3 <= len(done_before) < 10

    result = predict_ray(str(setup / "model"), [setup / "images"], out, size="none", device="cpu", progress=False)
    assert set(result.skipped) == done_before and len(result.written) == 10 - len(done_before)
    sources = [r["source"] for r in rows(out)]
    assert len(sources) == len(set(sources)) == 10  # every image once in the manifest, none lost
    assert files(out) == files(reference(setup, tmp_path, save_probs=False))


def test_unreachable_address_is_one_line(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "upernet.cli", "predict", str(setup / "images" / "im1.png"),
                           "--model", str(setup / "model"), "--out", str(tmp_path / "out"), "--engine", "ray",
                           "--address", "127.0.0.1:9"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--address 127.0.0.1:9: cannot reach a Ray cluster" in proc.stderr
