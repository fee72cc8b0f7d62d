"""The web page of `upernet serve`, end to end in headless Chromium (Debian's /usr/bin/chromium driven by
Playwright; `.ci/run` installs it): upload the built-in sample, wait for the overlay, compare the legend
with what `Segmenter` finds, hover for the class name, move the opacity slider, show a bad file's
message, drop a file, and check that the browser asked nothing of any other host. The screenshot is kept in the test's tmp folder."""
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import tiny_model  # noqa: E402

from upernet import Segmenter  # noqa: E402
from upernet.inference.predict import SAMPLE_IMAGE  # noqa: E402
from upernet.serve.app import create_app  # noqa: E402
from upernet.serve.server import background_server  # noqa: E402

CHROMIUM = os.environ.get("UPERNET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
CLASSES = ["road", "sky", "building", "tree", "car", "person"]


def inner_points(labels: np.ndarray, margin: int = 3) -> dict[str, tuple[int, int]]:
    """Per class present, a pixel (y, x) whose whole (2 margin + 1)^2 neighbourhood is that class."""
    windows = sliding_window_view(labels, (2 * margin + 1, 2 * margin + 1))
    uniform = (windows == windows[..., margin:margin + 1, margin:margin + 1]).all(axis=(-1, -2))
    points = {}
    for y, x in zip(*np.nonzero(uniform)):
        points.setdefault(CLASSES[labels[y + margin, x + margin]], (int(y) + margin, int(x) + margin))
    return points


@pytest.mark.slow
def test_page_segments_the_sample(tmp_path):
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does), or set UPERNET_CHROMIUM")
    model = tiny_model("upernet_convnext_tiny", num_classes=len(CLASSES), seed=3).eval()
    model.meta = {"class_names": CLASSES}
    model.save(tmp_path / "model")
    segmenter = Segmenter(tmp_path / "model", device="cpu", precision="fp32")
    expected = segmenter(SAMPLE_IMAGE)
    found = list(expected.areas())
    assert len(found) >= 2, "the tiny model should find several classes in the sample for this test to mean much"

    requests, errors = [], []
    with background_server(create_app(segmenter, name="tiny street model")) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/")
            page.wait_for_selector("#model:has-text('tiny street model')")
            page.set_input_files("#file", str(SAMPLE_IMAGE))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)

            # the legend: the classes predict finds, largest first, with their area share
            rows = page.locator("#legend li")
            assert rows.evaluate_all("rows => rows.map(r => r.dataset.label)") == found
            shares = rows.locator(".share").all_inner_texts()
            assert shares == [f"{100 * share:.1f}%" for share in expected.areas().values()]

            # the overlay: a canvas of the image's size over the photo
            size = page.evaluate("[document.getElementById('mask').width, document.getElementById('mask').height]")
            assert size == [expected.labels.shape[1], expected.labels.shape[0]]
            assert page.evaluate("document.getElementById('photo').naturalWidth") == expected.labels.shape[1]

            # the class under the pointer is the label there: one point well inside each class present
            box = page.locator("#mask").bounding_box()
            height, width = expected.labels.shape
            for name, (y, x) in inner_points(expected.labels).items():
                page.mouse.move(box["x"] + (x + 0.5) * box["width"] / width,
                                box["y"] + (y + 0.5) * box["height"] / height)
                assert page.locator("#tooltip").inner_text() == name, (x, y)
                assert page.locator("#pointer strong").inner_text() == name

            # the opacity slider
            page.locator("#opacity").fill("20")
            assert page.evaluate("getComputedStyle(document.getElementById('mask')).opacity") == "0.2"
            page.locator("#opacity").fill("55")

            screenshot = tmp_path / "serve-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            assert screenshot.stat().st_size > 10_000

            # a bad file: the message shows, and the page still works after it
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("body[data-state=error]")
            assert "not an image" in page.locator("#status").inner_text()
            page.click("#sample")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            assert rows.evaluate_all("rows => rows.map(r => r.dataset.label)") == found

            # dropping a file on the drop zone segments it too
            dropped = page.evaluate_handle("""async () => {
                const blob = await (await fetch('/sample.png')).blob();
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
                return transfer;
            }""")
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            page.wait_for_selector("#status:has-text('dropped.png')", timeout=60_000)
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            assert rows.evaluate_all("rows => rows.map(r => r.dataset.label)") == found
        finally:
            browser.close()
    assert not errors, f"JavaScript errors: {errors}"
    elsewhere = [u for u in requests if urlparse(u).hostname != "127.0.0.1" and not u.startswith(("blob:", "data:"))]
    assert not elsewhere, f"the page asked other hosts: {elsewhere}"
    assert any(u.endswith("/predict?format=map") for u in requests)
    assert Path(screenshot).exists()
