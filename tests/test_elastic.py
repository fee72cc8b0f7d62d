"""Multi-node and elastic training under torchrun, on one machine: two "nodes" (two torchrun agents, one
gloo process each, a c10d rendezvous on 127.0.0.1) train the weights of one process with the same total
batch; with `--nnodes 1:2 --max-restarts 2`, a worker killed mid-run is restarted from the last
checkpoint and the run ends with the weights of the uninterrupted one.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import upernet
from upernet.config import load_config
from upernet.training.loop import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# tests/test_train.py's tiny built-in recipe, made order-independent: BatchNorm frozen (gloo has no
# SyncBN), no dropout, the loss averaged over all pixels; 2 x batch 1 is then 1 x batch 2.
RECIPE = ["model.args={model_name: test_convnext, channels: 16, aux_channels: 8, dropout: 0.0}",
          "data.options={num_samples: 16, image_size: 32}", "data.crop_size=[32,32]", "data.scale=[64,32]",
          "data.workers=0", "val.interval=0", "val.max_images=4", "train.log_interval=1",
          "train.checkpoint_interval=2", "schedule.warmup_iters=2", "optim.lr=0.01", "model.norm_eval=true",
          "train.loss_average=all", "schedule.iters=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node_rank: int, nnodes: str, port: int, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """One torchrun agent ("node") with one worker process, training into the shared `out` folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node-rank", str(node_rank),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", out.name, *extra, "-m", "upernet.cli", "train", *RECIPE, "data.batch_size=1",
           "--out", str(out)]
    # As docs/scale.md says: a new rendezvous store for every restart (torchrun's shared one keeps the
    # dead workers' addresses, and restarted workers can hang on them: pytorch/pytorch#135712).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def finish(agents: list[subprocess.Popen], logs: list[Path]) -> None:
    for agent, log in zip(agents, logs):
        try:
            agent.wait(timeout=900)
        finally:
            if agent.poll() is None:
                agent.kill()
        assert agent.returncode == 0, log.read_text()[-3000:]


def weights(run_dir: Path) -> dict:
    return upernet.load_model(run_dir / "model").state_dict()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """The uninterrupted run of two one-process nodes."""
    root = tmp_path_factory.mktemp("two_nodes")
    port, out = free_port(), root / "run"
    logs = [root / "node0.log", root / "node1.log"]
    finish([launch(rank, "2", port, out, logs[rank]) for rank in (0, 1)], logs)
    return out


def test_two_nodes_equal_one_process_with_the_total_batch(two_nodes, tmp_path):
    single = train(load_config(None, RECIPE + ["data.batch_size=2"]), tmp_path / "single", progress=False)
    a, b = weights(two_nodes), weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    records = [json.loads(line) for line in (two_nodes / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in train_records] == list(range(1, 11))  # rank 0 alone writes the log: no duplicates
    assert train_records[-1]["loss"] == pytest.approx(single["loss"], rel=1e-4)


def worker_of_rank(agents: list[subprocess.Popen], rank: int) -> int | None:
    """The pid of the worker process torchrun started with RANK=rank, if it runs."""
    for agent in agents:
        for pid in children(agent.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
    return None


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0"])
def test_a_killed_worker_restarts_from_the_last_checkpoint_with_the_uninterrupted_weights(two_nodes, tmp_path,
                                                                                          victim):
    port, out = free_port(), tmp_path / "elastic"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [launch(rank, "1:2", port, out, logs[rank], "--max-restarts", "2") for rank in (0, 1)]
    try:
        # The watcher: once checkpoint 2 exists, kill the worker of rank `victim` (rank 0 writes the
        # checkpoints; not its agent).
        deadline, killed = time.monotonic() + 600, None
        while time.monotonic() < deadline and killed is None and all(agent.poll() is None for agent in agents):
            if (out / "checkpoints" / "iter_0000002.pt").exists() and worker_of_rank(agents, victim):
                killed = worker_of_rank(agents, victim)
                os.kill(killed, signal.SIGKILL)
                unfinished = not (out / "checkpoints" / "iter_0000010.pt").exists()
            time.sleep(0.01)
        assert killed is not None, logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
        assert unfinished, "the run had finished before the worker was killed"
        finish(agents, logs)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    resumed = [log.read_text().count("torchrun restarted the workers; resuming") for log in logs]
    assert resumed == [1, 1], resumed  # each node's worker was restarted once and resumed the run
    assert "warning" not in logs[0].read_text()  # the store is not shared: no warning
    a, b = weights(two_nodes), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted run's weights differ from the uninterrupted run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == list(range(1, 11))  # rewound to the checkpoint


def _resume_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from upernet.distributed import DistInfo
    from upernet.errors import UserError
    from upernet.training.loop import check_same_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)
    try:
        check_same_checkpoint({"iteration": 4}, Path(out_dir) / "iter_4.pt", info)  # the same: no error
        try:  # node 1 sees a run folder of its own (not shared): another checkpoint
            check_same_checkpoint({"iteration": 4 if rank == 0 else 2}, Path(out_dir) / f"rank{rank}.pt", info)
            message = ""
        except UserError as e:
            message = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_ranks_resuming_from_different_checkpoints_stop_with_one_line(tmp_path):
    """A run folder that is not shared between nodes shows up as ranks resuming from different
    iterations: every rank stops with one line naming the fix, instead of training apart."""
    import torch.multiprocessing as mp

    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "resume from different iterations [4, 2]" in message and "shares" in message
        assert len(message.splitlines()) == 1


def test_a_restart_torchrun_does_not_count_is_told_from_a_new_job_by_the_recorded_job_id(tmp_path, monkeypatch):
    """A node leaving or joining restarts the workers with TORCHELASTIC_RESTART_COUNT still 0: the run
    folder's recorded rendezvous id says it is the same job (resume), another id a new one (refused)."""
    from upernet.training.loop import ELASTIC_RUN_FILE, restarted_by_torchrun

    (tmp_path / ELASTIC_RUN_FILE).write_text("job-a\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert restarted_by_torchrun(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert not restarted_by_torchrun(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id tells no jobs apart
    (tmp_path / ELASTIC_RUN_FILE).write_text("none\n")
    assert not restarted_by_torchrun(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a failure torchrun counted
    assert restarted_by_torchrun(tmp_path)


def test_restarts_that_reuse_the_rendezvous_store_are_warned_about(monkeypatch, capsys, tmp_path):
    """torchrun's default keeps one store for every restart; `upernet train` says so on each node's
    first process, with the variable that avoids it, and trains on."""
    from upernet.cli import main
    from upernet.distributed import restarts_reuse_the_rendezvous_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not restarts_reuse_the_rendezvous_store()  # no restarts: nothing to warn about
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert restarts_reuse_the_rendezvous_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not restarts_reuse_the_rendezvous_store()

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", *RECIPE, "data.batch_size=1", "--stop-at", "1", "--out", str(tmp_path / "run")]) in (0, None)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line]) == 1
    assert (tmp_path / "run" / "checkpoints" / "iter_0000001.pt").exists()
