"""`cdv2 app` in a real browser: Playwright drives Debian's Chromium against the app served on
127.0.0.1 with the built-in demo model (shipped in the package, so no fixtures are needed). The result shown must equal `Colorizer.colorize` for the same
settings and seed; bad uploads show an error and the app keeps serving; two sessions both finish.
Also saves docs/app.png (the screenshot in the README)."""
from __future__ import annotations

import inspect
import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import REPO

gr = pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SIZE = 64  # the built-in model's training size
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path):
    sketch = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(sketch)
    d.ellipse((8, 8, 40, 40), outline="black", width=2)
    d.rectangle((28, 26, 56, 56), outline="black", width=2)
    ref = Image.new("RGB", (96, 80), (225, 235, 215))
    ImageDraw.Draw(ref).ellipse((10, 10, 50, 50), fill=(30, 160, 60))
    ImageDraw.Draw(ref).rectangle((45, 35, 85, 75), fill=(150, 40, 160))
    paths = {"sketch": folder / "sketch.png", "reference": folder / "reference.png"}
    sketch.save(paths["sketch"])
    ref.save(paths["reference"])
    (folder / "not_an_image.png").write_text("this is text, not a PNG")
    Image.new("RGB", (1, 1), "white").save(folder / "one_pixel.png")
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cdv2.app.serve import SAMPLERS, SCHEDULES, Server
    from cdv2.app.ui import App
    from cdv2.demo import load_demo_colorizer

    col = load_demo_colorizer()
    app = App(col, samplers=SAMPLERS, schedules=SCHEDULES, size_range=(64, 1536), default_size=SIZE,
              output_dir=str(tmp_path_factory.mktemp("app_out")))
    srv = Server(app)
    port = _free_port()
    srv.launch(port=port, block=False)
    yield srv, f"http://127.0.0.1:{port}"
    srv.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


def _set_number(page, key, value):
    box = page.locator(f"#cdv2-{key} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _upload(page, key, path):
    page.locator(f"#cdv2-{key} input[type=file]").set_input_files(str(path))
    page.locator(f"#cdv2-{key} img").first.wait_for(timeout=30_000)


def _open(browser, url, inputs):
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(url)
    page.locator("#cdv2-generate").wait_for(timeout=60_000)
    if inputs:
        _upload(page, "sketch", inputs["sketch"])
        _upload(page, "reference", inputs["reference"])
    _set_number(page, "seed", 7)
    _set_number(page, "steps", STEPS)
    return page


def _generate_and_read(page, url) -> Image.Image:
    page.locator("#cdv2-generate").click()
    img = page.locator("#cdv2-gallery img").first
    img.wait_for(timeout=300_000)
    src = img.get_attribute("src")
    data = page.request.get(src if src.startswith("http") else url.rstrip("/") + "/" + src.lstrip("/")).body()
    return Image.open(io.BytesIO(data))


def test_result_in_browser_equals_api(server, browser, tmp_path):
    srv, url = server
    inputs = _images(tmp_path)
    page = _open(browser, url, inputs)
    shown = _generate_and_read(page, url)
    page.locator("#cdv2-status").get_by_text("seed 7").wait_for(timeout=30_000)
    page.screenshot(path=str(REPO / "docs" / "app.png"), full_page=True)

    # every other setting at the app's defaults, which are the Colorizer's (the authors' app's)
    col = srv.app.colorizer
    extra = {"sketch_preprocessor": "invert"} if "sketch_preprocessor" in inspect.signature(col.colorize).parameters else {}
    expected = col.colorize(Image.open(inputs["sketch"]), Image.open(inputs["reference"]), steps=STEPS, seed=7,
                            size=(SIZE, SIZE), **extra)[0]
    np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected))
    meta = json.loads(shown.info["cdv2"])  # the settings travel inside the PNG
    assert meta["seed"] == 7 and meta["steps"] == STEPS and meta["sampler"] == "diffuser_dpm"


def test_bad_uploads_show_an_error_and_the_app_keeps_serving(server, browser, tmp_path):
    srv, url = server
    inputs = _images(tmp_path)
    page = _open(browser, url, None)
    _upload(page, "sketch", tmp_path / "one_pixel.png")
    _upload(page, "reference", inputs["reference"])
    page.locator("#cdv2-generate").click()
    page.get_by_text("too small", exact=False).first.wait_for(timeout=120_000)
    _upload(page, "sketch", inputs["sketch"])  # fixed in the same session: generation works
    assert _generate_and_read(page, url).size == (SIZE, SIZE)

    # a text file where an image goes: a visible error, and the server keeps serving others
    bad = _open(browser, url, inputs)
    bad.locator("#cdv2-background input[type=file]").set_input_files(str(tmp_path / "not_an_image.png"))
    bad.locator("#cdv2-generate").click()
    bad.get_by_text("error", exact=False).first.wait_for(timeout=120_000)
    assert bad.locator("#cdv2-gallery img").count() == 0
    fresh = _open(browser, url, inputs)
    assert _generate_and_read(fresh, url).size == (SIZE, SIZE)


def test_two_sessions_queue_and_both_finish(server, browser, tmp_path):
    srv, url = server
    inputs = _images(tmp_path)
    pages = [_open(browser, url, inputs) for _ in range(2)]
    for p in pages:
        p.locator("#cdv2-generate").click()
    for p in pages:
        p.locator("#cdv2-gallery img").first.wait_for(timeout=300_000)
        assert "seed 7" in p.locator("#cdv2-status").inner_text()
