"""The dashboard in a real browser: a Streamlit server on the tiny world, driven by Playwright.

Uses Debian's ``/usr/bin/chromium`` (never a downloaded browser). Screenshots of every page, wide
(1400×1000) and narrow (420×900), go to ``screenshots/`` (gitignored): ``<page>-<size>.png`` is
the first screen and ``<page>-<size>-full.png`` the whole page.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "screenshots"
SAMPLE = REPO / "artifacts" / "samples" / "chelsea.jpg"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SIZES = {"wide": (1400, 1000), "narrow": (420, 900)}
PAGES = {"caption": "", "compare": "compare", "training": "training", "explore": "explore"}
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
SERVER_START_S = 120
WAIT_MS = 90_000
MAX_FULL_HEIGHT = 6000

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll the server's health endpoint until it answers, the process dies or time runs out."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"streamlit did not start in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    """``python -m streamlit run dashboard/app.py`` on a free loopback port; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "CAPTIONING_DATA": str(tiny_world.data),
        "CAPTIONING_MODELS": str(tiny_world.models),
        "CAPTIONING_CACHE": str(tiny_world.cache),
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    w, h = SIZES["wide"]
    context = browser.new_context(viewport={"width": w, "height": h})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def wait_idle(pg) -> None:
    """Wait until the script run triggered last has finished."""
    pg.wait_for_selector(IDLE, timeout=WAIT_MS)


def open_page(pg, url: str) -> None:
    pg.goto(url, timeout=WAIT_MS)
    pg.wait_for_selector("h1", timeout=WAIT_MS)
    wait_idle(pg)


def assert_no_exception(pg) -> None:
    exc = pg.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()


def screenshot(pg, name: str, size: str) -> None:
    """The first screen, then the whole page (the viewport grown to the content height)."""
    SHOTS.mkdir(exist_ok=True)
    w, h = SIZES[size]
    pg.screenshot(path=str(SHOTS / f"{name}-{size}.png"))
    full = pg.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    pg.set_viewport_size({"width": w, "height": min(max(int(full), h), MAX_FULL_HEIGHT)})
    pg.wait_for_timeout(500)
    pg.screenshot(path=str(SHOTS / f"{name}-{size}-full.png"))
    pg.set_viewport_size({"width": w, "height": h})


def test_upload_shows_caption_and_attention(server, page):
    open_page(page, server)
    page.locator(".st-key-caption-source button", has_text="Upload").click()
    uploader = page.locator("[data-testid='stFileUploader'] input[type='file']")
    uploader.wait_for(state="attached", timeout=WAIT_MS)
    uploader.set_input_files(str(SAMPLE))
    page.get_by_text("chelsea.jpg", exact=True).first.wait_for(timeout=WAIT_MS)
    page.locator(".st-key-caption-result h3").wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    caption = page.locator(".st-key-caption-result h3").inner_text().strip()
    assert caption.startswith("“") and len(caption) > 2, caption
    assert page.get_by_text("Where the model looks").count() == 1  # default: an attention model
    screenshot(page, "caption-upload", "wide")


def test_broken_upload_shows_error(server, page):
    open_page(page, server)
    page.locator(".st-key-caption-source button", has_text="Upload").click()
    uploader = page.locator("[data-testid='stFileUploader'] input[type='file']")
    uploader.wait_for(state="attached", timeout=WAIT_MS)
    uploader.set_input_files(
        {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"this is not a photo"}
    )
    alert = page.locator("[data-testid='stAlertContentError']")
    alert.wait_for(timeout=WAIT_MS)
    assert "broken.jpg" in alert.inner_text()
    wait_idle(page)
    assert_no_exception(page)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_page_renders(server, page, size):
    w, h = SIZES[size]
    page.set_viewport_size({"width": w, "height": h})
    for name, path in PAGES.items():
        open_page(page, f"{server}/{path}")
        assert_no_exception(page)
        if name == "training":
            page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT_MS)
            assert page.locator(".js-plotly-plot").count() == 4
        if name == "compare":
            page.locator(".st-key-compare-model-vgg16-attention").wait_for(timeout=WAIT_MS)
            assert page.locator("[class*='st-key-compare-model-']").count() == 4
        if name == "explore":
            page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(800)  # let charts and images settle before the screenshot
        screenshot(page, name, size)
