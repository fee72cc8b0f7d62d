"""`upernet serve`'s HTTP API: good uploads in every format, every kind of bad upload (a 4xx with a clear
message, and the server still answers), batching, the bounded queue, and the CLI verb."""
import base64
import io
import struct
import threading
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from conftest import segment_in_one_batch, tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from upernet import Segmenter  # noqa: E402
from upernet.inference.predict import SAMPLE_IMAGE  # noqa: E402
from upernet.serve.app import Limits, create_app  # noqa: E402
from upernet.serve.batching import QueueFull  # noqa: E402
from upernet.serve.server import background_server  # noqa: E402

CLASSES = ["road", "sky", "building", "tree", "car"]


@pytest.fixture(scope="module")
def segmenter():
    model = tiny_model("upernet_convnext_tiny", num_classes=len(CLASSES)).eval()
    model.meta = {"class_names": CLASSES}
    return Segmenter(model, device="cpu", precision="fp32", size="none")


@pytest.fixture(scope="module")
def client(segmenter):
    with TestClient(create_app(segmenter, Limits(max_upload_bytes=200_000, max_pixels=300 * 300), name="tiny")) as c:
        yield c


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def decode_png(text_or_bytes) -> np.ndarray:
    data = base64.b64decode(text_or_bytes) if isinstance(text_or_bytes, str) else text_or_bytes
    return np.array(Image.open(io.BytesIO(data)))


def assert_still_serving(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# ---- good requests --------------------------------------------------------------------------------
def test_health_and_info(client, segmenter):
    assert_still_serving(client)
    info = client.get("/info").json()
    assert info["model"] == "tiny"
    assert info["classes"] == CLASSES
    assert info["palette"] == [list(c) for c in segmenter.meta["palette"]]
    assert info["protocol"]["mode"] == "whole" and info["protocol"]["device"] == "cpu"
    assert info["protocol"]["size"] == "none"
    assert info["limits"]["max_pixels"] == 300 * 300


def test_predict_json_is_the_hugging_face_format(client, segmenter):
    image = photo()
    expected = segmenter(image).labels
    response = client.post("/predict", content=png(image), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    items = response.json()
    assert [item["label"] for item in items] == [CLASSES[c] for c in np.unique(expected)]
    for item in items:
        assert set(item) == {"label", "score", "mask"}
        mask = decode_png(item["mask"])
        assert mask.shape == expected.shape
        np.testing.assert_array_equal(mask == 255, expected == CLASSES.index(item["label"]))


def test_predict_multipart_form_equals_raw_body(client):
    image = png(photo(seed=1))
    raw = client.post("/predict", content=image, headers={"Content-Type": "image/png"}).json()
    form = client.post("/predict", files={"image": ("x.png", image, "image/png")}).json()
    assert form == raw


def test_predict_labels_overlay_and_map(client, segmenter):
    image = photo(40, 56, seed=2)
    expected = segmenter(image)
    body = png(image)
    labels = client.post("/predict?format=labels", content=body, headers={"Content-Type": "image/png"})
    assert labels.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decode_png(labels.content), expected.labels)

    overlay = client.post("/predict?format=overlay&alpha=1&legend=false", content=body,
                          headers={"Content-Type": "image/png"})
    palette = np.asarray(expected.palette, dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(overlay.content), palette[expected.labels])

    found = client.post("/predict?format=map", content=body, headers={"Content-Type": "image/png"}).json()
    assert (found["width"], found["height"], found["dtype"]) == (56, 40, "uint8")
    decoded = np.frombuffer(base64.b64decode(found["labels"]), dtype=np.uint8).reshape(40, 56)
    np.testing.assert_array_equal(decoded, expected.labels)
    shares = {item["label"]: item["share"] for item in found["classes"]}
    assert shares == pytest.approx(expected.areas())
    assert list(shares) == list(expected.areas())  # largest first


def test_jpeg_and_octet_stream(client):
    out = io.BytesIO()
    Image.fromarray(photo(seed=3)).save(out, format="JPEG")
    response = client.post("/predict", content=out.getvalue(), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200 and response.json()


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and "http" not in asset.text
    assert client.get("/sample.png").content == SAMPLE_IMAGE.read_bytes()


# ---- bad requests: a 4xx with a clear message, and the server keeps serving ------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels (a decompression bomb's header, no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_UPLOADS = {
    "not an image": (b"hello, this is text", "image/png", 400, "not an image"),
    "truncated": (png(photo())[:300], "image/png", 400, "truncated or corrupt"),
    "empty": (b"", "image/png", 400, "empty"),
    "wrong content type": (png(photo()), "text/plain", 415, "content type 'text/plain'"),
    "json content type": (b'{"image": 1}', "application/json", 415, "send an image"),
    "too many bytes": (b"\0" * 250_000, "image/png", 413, "over the limit of 200000"),
    "too many pixels": (png(np.zeros((300, 400, 3), np.uint8)), "image/png", 413, "400x300 = 120000 pixels, over the limit"),
    "decompression bomb": (png_header_only(100_000, 100_000), "image/png", 413, "decompression bomb"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_clear_4xx(client, case):
    body, kind, status, message = BAD_UPLOADS[case]
    response = client.post("/predict", content=body, headers={"Content-Type": kind})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert_still_serving(client)


def test_bad_header_sized_image_within_pil_limit(client):
    """A header claiming more than --max-pixels but under PIL's own bomb limit is refused by ours."""
    response = client.post("/predict", content=png_header_only(5000, 4000), headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "5000x4000 = 20000000 pixels" in response.json()["detail"]
    assert_still_serving(client)


@pytest.mark.parametrize("files, status, message", [
    (None, 400, "has 0 files"),
    ({"image": ("notes.txt", b"text", "text/plain")}, 415, "the form file 'notes.txt'"),
    ({"a": ("a.png", png(photo()), "image/png"), "b": ("b.png", png(photo()), "image/png")}, 400, "has 2 files"),
])
def test_bad_multipart_form(client, files, status, message):
    if files is None:  # a form with a text field only
        body = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--B--\r\n'
        response = client.post("/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    else:
        response = client.post("/predict", files=files)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert_still_serving(client)


@pytest.mark.parametrize("query, message", [("format=svg", "format 'svg'"), ("alpha=2", "alpha 2.0")])
def test_bad_options(client, query, message):
    response = client.post(f"/predict?{query}", content=png(photo()), headers={"Content-Type": "image/png"})
    assert response.status_code == 400 and message in response.json()["detail"]
    assert_still_serving(client)


def test_streamed_upload_without_length_is_cut_at_the_limit(segmenter):
    """A chunked body (no Content-Length) is refused once it passes the limit, over a real socket."""
    app = create_app(segmenter, Limits(max_upload_bytes=100_000))

    def chunks():
        for _ in range(50):
            yield b"\0" * 10_000

    with background_server(app) as url, httpx.Client(base_url=url) as http:
        response = http.post("/predict", content=chunks(), headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and "over the limit of 100000 bytes" in response.json()["detail"]
        assert http.get("/health").json()["status"] == "ok"
        good = http.post("/predict", content=png(photo()), headers={"Content-Type": "image/png"})
        assert good.status_code == 200


# ---- batching and the bounded queue -------------------------------------------------------------------
def test_batched_forward_equals_one_by_one(segmenter):
    images = [photo(32, 40, seed=s) for s in range(3)]
    batch_sizes, results = segment_in_one_batch(segmenter, images)
    assert batch_sizes == {3: 1}
    for image, result in zip(images, results):
        np.testing.assert_array_equal(result.labels, segmenter(image).labels)
        assert result.class_names == CLASSES


def test_concurrent_requests_all_answered_and_grouped(segmenter):
    app = create_app(segmenter, Limits(max_queue=32, max_batch=4))
    images = [png(photo(32, 32, seed=s)) for s in range(12)]
    expected = [segmenter(decode_png(b)).labels for b in images]
    answers = [None] * len(images)

    def ask(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            answers[i] = http.post("/predict?format=labels", content=images[i], headers={"Content-Type": "image/png"})

    with background_server(app) as url:
        threads = [threading.Thread(target=ask, args=(i, url)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        passes = httpx.get(f"{url}/health").json()["forward_passes"]
    for response, labels in zip(answers, expected):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), labels)
    assert sum(int(size) * count for size, count in passes.items()) == len(images)
    assert {int(k): v for k, v in passes.items()} == app.state.worker.batch_sizes


def test_full_queue_is_503_and_the_server_recovers(segmenter):
    app = create_app(segmenter, Limits(max_queue=1, max_batch=1))
    worker = app.state.worker
    release = threading.Event()
    run_group = worker.run_group
    worker.run_group = lambda group: (release.wait(30), run_group(group))
    with TestClient(app) as client:
        busy = worker.submit(photo())  # the worker takes it and waits
        while not worker.jobs.empty():
            threading.Event().wait(0.01)
        queued = worker.submit(photo())  # fills the queue
        with pytest.raises(QueueFull):
            worker.submit(photo())
        response = client.post("/predict", content=png(photo()), headers={"Content-Type": "image/png"})
        assert response.status_code == 503 and "busy" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
        assert_still_serving(client)
        release.set()
        assert busy.result(30).labels.shape == queued.result(30).labels.shape == (48, 64)
        assert client.post("/predict", content=png(photo()), headers={"Content-Type": "image/png"}).status_code == 200


def test_multitask_model_answers_with_its_object_task():
    segmenter = Segmenter(tiny_model("upernet_multitask_r50").eval(), device="cpu", precision="fp32")
    image = photo(32, 32)
    expected = segmenter(image).tasks["object"]
    with TestClient(create_app(segmenter)) as client:
        info = client.get("/info").json()
        assert info["classes"] == expected.class_names and len(info["palette"]) == len(expected.class_names)
        labels = client.post("/predict?format=labels", content=png(image), headers={"Content-Type": "image/png"})
        np.testing.assert_array_equal(decode_png(labels.content), expected.labels)


# ---- the CLI verb -----------------------------------------------------------------------------------
def test_cli_serve_runs_uvicorn_with_the_options(tmp_path, monkeypatch):
    import uvicorn

    from upernet.cli import main

    model = tiny_model("upernet_r50", num_classes=3)
    model.save(tmp_path / "model")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    assert main(["serve", "--model", str(tmp_path / "model"), "--port", "8123", "--max-pixels", "1000",
                 "--max-upload-mb", "1", "--device", "cpu", "--size", "96x64"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)  # localhost unless told otherwise
    with TestClient(seen["app"]) as client:
        info = client.get("/info").json()
        assert info["limits"]["max_pixels"] == 1000 and info["limits"]["max_upload_bytes"] == 2 ** 20
        assert info["limits"]["max_batch"] == 1  # on CPU unless asked
        assert info["model"] == str(tmp_path / "model")
        assert info["protocol"]["size"] == "96x64"


def test_cli_serve_without_the_extra_is_one_line(monkeypatch, capsys):
    import builtins

    from upernet.cli import main

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    assert main(["serve", "--model", "upernet_r50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'upernet[serve]'" in err[0]
