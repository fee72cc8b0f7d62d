"""`upernet predict --engine ray`: same bytes as single-process predict, a manifest, resumable after a kill.

One local Ray cluster (`ray.init(num_cpus=2)`, temp dir under the test's tmp dir) for the module:
Ray's start-up takes seconds, so the tests on it are few and marked slow + distributed.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model



RAY_TEMP = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local two-CPU Ray cluster for this module; yields its address (for subprocess drivers)."""
    ray = pytest.importorskip("ray")
    temp = RAY_TEMP["path"] = tmp_path_factory.mktemp("ray")
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


@pytest.mark.slow
@pytest.mark.distributed
def test_same_bytes_as_single_process_and_a_bad_image_is_recorded(cluster, setup, tmp_path):
    from upernet.inference.batch import predict_ray

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    listed = tmp_path / "list.txt"  # a list file naming a URI that pyarrow reads: output im3-2 (im3 is taken)
    listed.write_text(f"# one URI\nfile://{setup / 'images' / 'im3.png'}\n")
    out = tmp_path / "ray"
    result = predict_ray(str(setup / "model"), [setup / "images", bad, listed], out, batch_size=2, save_probs=True,
                         size="none", device="cpu", progress=False)
    assert len(result.written) == 11 and [s for s, _ in result.failures] == [str(bad)]
    expected = files(reference(setup, tmp_path))
    expected.update({name.replace("im3_", "im3-2_"): data for name, data in expected.items()
                     if name.startswith("im3_")})
    assert files(out) == expected  # byte for byte, sub-folder mirrored, no temp files left
    by_source = {r["source"]: r for r in rows(out)}
    assert "cannot be read as an image" in by_source[str(bad)]["error"]
    first = by_source[str(setup / "images" / "sub" / "im0.png")]
    assert first["error"] is None and (first["height"], first["width"]) == (32, 40)
    assert [Path(p).name for p in first["outputs"]] == ["im0_labels.png", "im0_overlay.png", "im0_probs.npy"]
    labels = np.array(Image.open(first["outputs"][0]))
    assert first["classes"] == sorted(int(c) for c in np.unique(labels))

    again = predict_ray(str(setup / "model"), [setup / "images", bad, listed], out, save_probs=True, size="none",
                        device="cpu", progress=False)
    assert len(again.skipped) == 11 and not again.written and len(again.failures) == 1  # only the bad one retried


@pytest.mark.slow
@pytest.mark.distributed
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


def model_actor_pids() -> list[int]:
    """Processes of this module's Ray cluster (children of its raylet) running a SegmentActor."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"SegmentActor" in (proc / "cmdline").read_bytes():
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                if str(RAY_TEMP["path"]).encode() in Path(f"/proc/{parent}/cmdline").read_bytes():
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_model_actor_is_restarted_and_the_job_goes_on(cluster, setup, tmp_path):
    from upernet.inference.batch import predict_ray

    out, killed = tmp_path / "ray", []

    def watcher():  # once two images are done, kill the model actor's process
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            manifest = out / "manifest.jsonl"
            done = manifest.read_text().count("\n") if manifest.is_file() else 0
            if done >= 2:
                for pid in model_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, done))
            time.sleep(0.02)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    result = predict_ray(str(setup / "model"), [setup / "images"], out, size="none", device="cpu", progress=False)
    thread.join(timeout=10)
    assert killed, "no model actor process was found to kill"
    assert killed[0][1] < 10, "the job had finished before the actor was killed"
    assert len(result.written) == 10 and not result.failures
    sources = [r["source"] for r in rows(out)]
    assert len(sources) == len(set(sources)) == 10
    assert files(out) == files(reference(setup, tmp_path, save_probs=False))


@pytest.mark.slow
@pytest.mark.distributed
def test_unreachable_address_is_one_line(setup, tmp_path):
    pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "upernet.cli", "predict", str(setup / "images" / "im1.png"),
                           "--model", str(setup / "model"), "--out", str(tmp_path / "out"), "--engine", "ray",
                           "--address", "127.0.0.1:9"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--address 127.0.0.1:9: cannot reach a Ray cluster" in proc.stderr


def test_manifest_skips_a_line_cut_by_a_kill_and_a_row_counts_only_with_its_outputs(tmp_path):
    from upernet.inference.batch import Manifest, is_complete, read_manifest

    out = tmp_path / "out.png"
    out.write_bytes(b"png")
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"source": "a.png", "outputs": [str(out)], "error": None}) + '\n{"source": "b.pn')
    manifest = Manifest(path)  # appends on a fresh line after the cut one
    manifest.write({"source": "c.png", "outputs": [str(tmp_path / "missing.png")], "error": None})
    manifest.write({"source": "d.png", "outputs": [], "error": "cannot read the image"})
    manifest.close()
    rows = read_manifest(path)
    assert sorted(rows) == ["a.png", "c.png", "d.png"]
    assert [is_complete(rows[s]) for s in ("a.png", "c.png", "d.png")] == [True, False, False]


def test_ray_options_without_engine_ray_are_refused(tmp_path, capsys):
    import upernet
    from upernet.cli import main

    upernet.save_model(tiny_model("upernet_convnext_tiny"), tmp_path / "model")
    code = main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "model"), "--actors", "2"])
    assert code == 2 and "options of --engine ray" in capsys.readouterr().err


def test_a_uri_is_decoded_like_the_same_file_any_band_count(tmp_path):
    """Images behind URIs (read as bytes through pyarrow) go through the one image reader: a 4-band
    TIFF and an RGBA PNG decode exactly as the files themselves; a broken one names itself."""
    import tifffile

    from upernet.data.datasets import read_image
    from upernet.inference.batch import read_source

    bands = np.random.default_rng(0).integers(0, 255, (20, 24, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "four.tif", bands, photometric="minisblack", planarconfig="contig")
    Image.fromarray(bands, "RGBA").save(tmp_path / "rgba.png")
    for name, channels in (("four.tif", 4), ("rgba.png", 3)):
        data = read_source((tmp_path / name).as_uri())
        assert isinstance(data, bytes)
        assert np.array_equal(read_image(data, channels), read_image(tmp_path / name, channels))
    assert np.array_equal(read_image(read_source((tmp_path / "four.tif").as_uri()), 4).permute(1, 2, 0), bands)
    from upernet.errors import UserError

    with pytest.raises(UserError, match="cannot be read as an image"):
        read_image(b"not an image", 3)


def test_a_full_disk_is_told_apart_from_other_write_errors_in_the_actor(setup, tmp_path, monkeypatch):
    """The model actor (run here in this process) marks an image whose outputs hit ENOSPC as "disk full",
    the row the driver stops the job on; any other write error stays that image's own failure."""
    import errno

    from upernet.inference import batch as batch_module

    actor = batch_module.SegmentActor(str(setup / "model"), {"device": "cpu", "precision": "fp32", "size": "none"},
                                      save_probs=False, legend=True)
    decoded = batch_module.decode_row({"source": str(setup / "images" / "im1.png"), "stem": str(tmp_path / "im1")},
                                      actor.segmenter.preprocessor)
    rows = {}
    for code in (errno.ENOSPC, errno.EACCES):
        def refuse(*args, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(batch_module, "write_prediction", refuse)
        (text,) = actor({key: [value] for key, value in decoded.items()})["row"]
        rows[code] = json.loads(text)
    assert rows[errno.ENOSPC]["error"].startswith(batch_module.DISK_FULL)
    assert rows[errno.EACCES]["error"].startswith("PermissionError") and not list(tmp_path.glob("im1*"))


def test_the_driver_stops_on_a_full_disk_and_the_rerun_redoes_that_image(tmp_path, monkeypatch):
    """The driver records each actor row as it comes; a "disk full" row stops the job with one line,
    the rows before it stay in the manifest, and the failed image is not complete for the rerun. A
    manifest line that cannot be written for lack of space is the same one-line stop."""
    import errno

    from upernet.errors import UserError
    from upernet.inference.batch import (DISK_FULL, BatchResult, Manifest, is_complete, read_manifest,
                                         record_rows)

    done = tmp_path / "a.png"
    done.write_bytes(b"png")
    rows = [{"source": "a.jpg", "stem": str(tmp_path / "a"), "outputs": [str(done)], "error": ""},
            {"source": "b.jpg", "stem": str(tmp_path / "b"), "outputs": [], "error": f"{DISK_FULL}: [Errno 28]"},
            {"source": "c.jpg", "stem": str(tmp_path / "c"), "outputs": [], "error": ""}]
    manifest_path = tmp_path / "manifest.jsonl"
    result, manifest = BatchResult(tmp_path, manifest_path), Manifest(manifest_path)
    with pytest.raises(UserError, match=r"b: cannot write the outputs, the disk is full; free some space") as e:
        record_rows((json.dumps(r) for r in rows), manifest, result)
    manifest.close()
    assert len(str(e.value).splitlines()) == 1
    recorded = read_manifest(manifest_path)
    assert sorted(recorded) == ["a.jpg", "b.jpg"]  # c never reached the manifest: the job stopped at b
    assert is_complete(recorded["a.jpg"]) and not is_complete(recorded["b.jpg"])
    assert result.written == ["a.jpg"] and [source for source, _ in result.failures] == ["b.jpg"]

    manifest = Manifest(manifest_path)

    def no_space(row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(manifest, "write", no_space)
    with pytest.raises(UserError, match=r"manifest.jsonl: cannot record c.jpg, the disk is full"):
        record_rows([json.dumps(rows[2])], manifest, BatchResult(tmp_path, manifest_path))
    manifest.close()
    assert "c.jpg" not in read_manifest(manifest_path)  # not recorded: the rerun does it again
