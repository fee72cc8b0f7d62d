"""Hub ids: `load_model("org/name")` through huggingface_hub's real download and cache code.

A small HTTP server on 127.0.0.1 plays the Hub (`HF_ENDPOINT`): it answers the requests
huggingface_hub makes for `snapshot_download` (repo info, tree listing, HEAD + GET of
`/resolve/`). Loads run in a subprocess because huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import upernet
from upernet.errors import MissingFile, UserError
from upernet.loading import hub_id

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """Serves `self.server.repos` ({"org/name": folder}) at revision "main" / COMMIT."""

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def json(self, data) -> None:
        self.send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def answer(self, head: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        api = parts[0] == "api" and parts[1] == "models"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        folder = self.server.repos.get(repo)
        if folder is None:
            return self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        if api and parts[4] == "revision":  # repo info
            return self.json({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                              "siblings": [{"rfilename": f} for f in files]})
        if api and parts[4] == "tree":  # recursive listing
            return self.json([{"type": "file", "path": f, "size": (folder / f).stat().st_size,
                               "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()} for f in files])
        if not api and parts[2] == "resolve":
            file = folder / "/".join(parts[4:])
            if not file.is_file():
                return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            body = file.read_bytes()
            etag = f'"{hashlib.sha1(body).hexdigest()}"'
            return self.send(200, body, {"X-Repo-Commit": COMMIT, "ETag": etag}, head)
        self.send(404, b"", {}, head)

    def do_GET(self):
        self.answer(head=False)

    def do_HEAD(self):
        self.answer(head=True)


@pytest.fixture
def hub(tmp_path):
    """(server, endpoint URL); `server.repos` maps repo ids to folders."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOADER = """
import json, sys
import upernet
from upernet.cli import main
out = {}
for repo, target in json.loads(sys.argv[1]).items():
    try:
        upernet.load_model(repo).save(target)
        out[repo] = "ok"
    except upernet.UserError as error:
        out[repo] = str(error)
print(json.dumps(out))
"""


def load_in_subprocess(tmp_path: Path, endpoint: str, loads: dict, offline: bool = False) -> dict:
    """Run `load_model(repo).save(target)` for each item of `loads` with the Hub env set; returns the outcomes."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(loads)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_hub_ids_download_then_load_offline(hub, tmp_path):
    """Our folder and a transformers UperNet repo load by id, then again offline from the cache; an
    uncached id offline and a repo of neither layout are one-line errors."""
    server, endpoint = hub
    ours = tiny_model("upernet_convnext_tiny")
    ours.meta["class_names"] = ["a", "b", "c", "d", "e"]
    ours.save(tmp_path / "repo_ours")
    repos = {"org/ours": tmp_path / "repo_ours"}
    transformers = None
    try:
        import transformers
    except ImportError:
        pass
    if transformers is not None:  # a transformers UperNet repo, as save_pretrained writes it
        from upernet.loading import save_huggingface

        save_huggingface(tiny_model("upernet_swin_tiny"), tmp_path / "repo_hf")
        weights = load_file(str(tmp_path / "repo_hf" / "model.safetensors"))
        torch.save(weights, tmp_path / "repo_hf" / "pytorch_model.bin")  # not fetched: there are safetensors
        shutil.copytree(tmp_path / "repo_hf", tmp_path / "repo_hf_bin")
        (tmp_path / "repo_hf_bin" / "model.safetensors").unlink()  # an older repo: pickled weights only
        repos.update({"org/hf": tmp_path / "repo_hf", "org/hf_bin": tmp_path / "repo_hf_bin"})
    (tmp_path / "repo_other").mkdir()
    (tmp_path / "repo_other" / "config.json").write_text('{"model_type": "segformer"}')
    repos["org/other"] = tmp_path / "repo_other"
    server.repos.update(repos)

    online = load_in_subprocess(tmp_path, endpoint, {"org/ours": str(tmp_path / "got_ours"),
                                                     "org/hf": str(tmp_path / "got_hf"),
                                                     "org/hf_bin": str(tmp_path / "got_hf_bin"),
                                                     "org/other": str(tmp_path / "got_other"),
                                                     "org/missing": str(tmp_path / "got_missing")})
    assert online["org/ours"] == "ok"
    assert any(r.startswith("GET /org/ours/resolve/") and "model.safetensors" in r for r in server.requests)
    assert same_weights(upernet.load_model(tmp_path / "got_ours"), ours)
    assert upernet.load_model(tmp_path / "got_ours").meta["class_names"] == ["a", "b", "c", "d", "e"]
    assert "org/other: neither an upernet model folder nor a transformers UperNet repo" in online["org/other"]
    assert "model_type 'segformer'" in online["org/other"]
    assert "org/missing: no such file or folder, nor a model repo on the Hub" in online["org/missing"]
    assert all("\n" not in message for message in online.values())
    if transformers is not None:
        assert online["org/hf"] == online["org/hf_bin"] == "ok"
        assert same_weights(upernet.load_model(tmp_path / "got_hf"), upernet.load_model(tmp_path / "repo_hf"))
        assert same_weights(upernet.load_model(tmp_path / "got_hf_bin"), upernet.load_model(tmp_path / "repo_hf"))
        assert not any(r.startswith("GET /org/hf/") and "pytorch_model.bin" in r for r in server.requests)

    server.shutdown()  # offline: the cache alone (and the port closed: nothing answers)
    server.server_close()
    offline = load_in_subprocess(tmp_path, endpoint, {"org/ours": str(tmp_path / "again_ours"),
                                                      "org/uncached": str(tmp_path / "nothing")}, offline=True)
    assert offline["org/ours"] == "ok"
    assert same_weights(upernet.load_model(tmp_path / "again_ours"), ours)
    message = offline["org/uncached"]
    assert message.startswith("org/uncached: no such local folder, and not in the Hugging Face cache") and "HF_HUB_OFFLINE" in message
    assert "hf download org/uncached" in message and "\n" not in message
    # the Hub down but not declared offline: the cache still serves, an uncached id says the Hub is unreachable
    down = load_in_subprocess(tmp_path, endpoint, {"org/ours": str(tmp_path / "third"), "org/uncached": ""})
    assert down["org/ours"] == "ok"
    assert down["org/uncached"].startswith("org/uncached: no such local folder; the Hub (http://127.0.0.1:")


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("openmmlab/upernet-convnext-small") == ("openmmlab/upernet-convnext-small", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for path in ("runs/best.pt", "a/b/c", "./x", "/abs/path", "../x/y", "model.onnx", "upernet_r50"):
        assert hub_id(path) is None
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert hub_id("org/local") is None  # an existing folder is a folder


def test_missing_paths_keep_their_message(tmp_path):
    with pytest.raises(MissingFile, match="nor a registered model name"):
        upernet.load_model(tmp_path / "missing" / "model.pt")


def test_hub_errors_are_one_line(monkeypatch):
    """huggingface_hub's errors become one UserError line each (no network: snapshot_download is replaced)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    import httpx2

    response = httpx2.Response(403, request=httpx2.Request("GET", "http://127.0.0.1/x"))
    for error, expected in ((GatedRepoError("gated", response=response), "a gated repo"),
                            (RevisionNotFoundError("no", response=response), "no revision 'v9'")):
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(UserError) as caught:
            upernet.load_model("org/name", revision="v9")
        assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_push_to_hub_calls(tmp_path, monkeypatch):
    """push_to_hub creates the repo and commits the saved folder, its card naming the repo (checked at the
    HfApi boundary: the upload protocol is too large to fake)."""
    import huggingface_hub

    from upernet.loading import push_to_hub

    calls = []

    class Api:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_commit(self, **kwargs):
            files = {op.path_in_repo: op.path_or_fileobj for op in kwargs["operations"]}
            contents = {name: data if isinstance(data, bytes) else Path(data).read_bytes() for name, data in files.items()}
            calls.append(("create_commit", contents, kwargs))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    model = tiny_model("upernet_convnext_tiny")
    assert push_to_hub(model, "me/seg", token="t0k", private=True) == "https://hub/commit/1"
    assert calls[0] == ("init", "t0k")
    assert calls[1] == ("create_repo", "me/seg", {"repo_type": "model", "private": True, "exist_ok": True})
    contents = calls[2][1]
    assert sorted(contents) == ["README.md", "config.json", "model.safetensors"]
    assert b'upernet.load_model("me/seg")' in contents["README.md"] and b"path/to/this/folder" not in contents["README.md"]
    assert json.loads(contents["config.json"])["model"] == "upernet_convnext_tiny"
    assert calls[2][2]["repo_id"] == "me/seg" and calls[2][2]["repo_type"] == "model"
    model.save(tmp_path / "saved")  # a folder: the same files; the folder itself is left as it was
    push_to_hub(tmp_path / "saved", "me/other")
    assert b'load_model("me/other")' in calls[-1][1]["README.md"]
    assert "path/to/this/folder" in (tmp_path / "saved" / "README.md").read_text()
    with pytest.raises(UserError, match="no config.json"):
        push_to_hub(tmp_path, "me/seg")


def test_model_card_of_a_run(tmp_path, capsys):
    """Every saved folder has a README.md; converting a run of ours quotes its recipe and metrics."""
    from upernet.cli import main

    model = tiny_model("upernet_swin_tiny")
    model.meta.update(dataset="ade20k", class_names=[f"c{i}" for i in range(5)], test_size="2048x512")
    run = tmp_path / "run"
    model.save(run / "model")
    card = (run / "model" / "README.md").read_text()
    assert "# upernet_swin_tiny" in card and "4: c4" in card and "value 0 (\"other\") is ignored" in card
    assert 'upernet.load_model("path/to/this/folder")' in card and "Training recipe" not in card
    (run / "config.yaml").write_text("model:\n  name: upernet_swin_tiny\noptim:\n  lr: 0.00006\n")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"mIoU": 44.5678, "aAcc": 80.0, "per_class": [{"IoU": 1}]}))
    assert main(["convert", str(run), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Training recipe" in card and '"lr": 6e-05' in card
    assert "| mIoU | 44.57 |" in card and "per_class" not in card


def test_revision_reaches_the_download(tmp_path, monkeypatch, capsys):
    """`--revision` of every verb (and `@rev`, and `revision=`) is what snapshot_download is asked for."""
    import huggingface_hub

    from upernet.cli import main

    tiny_model("upernet_convnext_tiny").save(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["info", "--model", "org/name", "--revision", "v2"]) == 0
    assert "org/name@v2" in capsys.readouterr().out
    upernet.load_model("org/name@v3")
    upernet.load_model("org/name", revision="abc")
    assert main(["convert", "org/name", str(tmp_path / "out"), "--revision", "v4"]) == 0
    assert asked == [("org/name", "v2"), ("org/name", "v3"), ("org/name", "abc"), ("org/name", "v4")]
