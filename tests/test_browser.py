"""The dashboard in a real browser: a Streamlit server on the tiny world, driven by Playwright.

Uses Debian's ``/usr/bin/chromium`` (never a downloaded browser). Eight sessions upload photos
at once; hostile files go through the real uploader; every page renders at 1400×1000 and
420×900. Screenshots (``<page>-<size>.png``, the first screen, and ``-full.png``, the whole page)
go to a temporary folder, or to ``$CAPTIONING_SCREENSHOTS`` when set.
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
from PIL import Image

from tests import hostile

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SAMPLE = REPO / "artifacts" / "samples" / "chelsea.jpg"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZES = {"wide": (1400, 1000), "narrow": (420, 900)}
PAGES = {"caption": "", "compare": "compare", "training": "training", "explore": "explore"}
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CAPTION = ".st-key-caption-result h3"
UPLOAD_INPUT = "[data-testid='stFileUploader'] input[type='file']"
ERROR = "[data-testid='stAlertContentError']"
SESSIONS = 8
SERVER_START_S = 120
WAIT_MS = 90_000
MAX_FULL_HEIGHT = 6000

pytestmark = pytest.mark.slow  # a real server and browser on the tiny world

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll the server's health endpoint until it answers, the process dies or time runs out."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if healthy(url):
            return
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
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "dashboard/app.py",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    with log.open("w") as out:  # the address comes from .streamlit/config.toml: loopback only
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
def shots(tmp_path_factory) -> Path:
    chosen = os.environ.get("CAPTIONING_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, size: str = "wide"):
    """A page in a fresh context: its own cookies, hence its own Streamlit session."""
    w, h = SIZES[size]
    context = browser.new_context(viewport={"width": w, "height": h})
    context.set_default_timeout(WAIT_MS)
    return context.new_page()


@pytest.fixture
def page(browser):
    pg = new_page(browser)
    try:
        yield pg
    finally:
        pg.context.close()


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


def to_upload(pg) -> None:
    """Switch the Caption page to Upload and wait for that run to finish."""
    pg.locator(".st-key-caption-source button", has_text="Upload").click()
    pg.locator(UPLOAD_INPUT).wait_for(state="attached")
    wait_idle(pg)
    assert pg.locator(CAPTION).count() == 0


def upload(pg, name: str, data: bytes, mime: str = "image/jpeg") -> None:
    """Give the real upload widget a file (returns once the browser has it)."""
    pg.locator(UPLOAD_INPUT).set_input_files({"name": name, "mimeType": mime, "buffer": data})


def screenshot(pg, folder: Path, name: str, size: str) -> None:
    """The first screen, then the whole page (the viewport grown to the content height)."""
    w, h = SIZES[size]
    pg.screenshot(path=str(folder / f"{name}-{size}.png"))
    full = pg.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    pg.set_viewport_size({"width": w, "height": min(max(int(full), h), MAX_FULL_HEIGHT)})
    pg.wait_for_timeout(500)
    pg.screenshot(path=str(folder / f"{name}-{size}-full.png"))
    pg.set_viewport_size({"width": w, "height": h})


def distinct_photos() -> list[tuple[str, bytes]]:
    """Eight different JPEGs (four photos, each also mirrored): no two share a cache entry."""
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = hostile.photo(name)
        out.append((f"{name}.jpg", hostile.encode(img, "JPEG", quality=90)))
        mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append((f"{name}-mirrored.jpg", hostile.encode(mirrored, "JPEG", quality=90)))
    return out


def test_eight_sessions_caption_at_once_and_the_app_serves_afterwards(server, browser, shots):
    photos = distinct_photos()
    assert len(photos) == SESSIONS
    pages = [new_page(browser) for _ in photos]
    try:
        for pg in pages:
            open_page(pg, server)
            to_upload(pg)
        for pg, (name, data) in zip(pages, photos, strict=True):
            upload(pg, name, data)  # returns at once: all eight are in flight together
        captions = []
        for pg, (name, _) in zip(pages, photos, strict=True):
            pg.locator("[data-testid='stImageCaption']", has_text=name).first.wait_for()
            pg.locator(CAPTION).wait_for()
            wait_idle(pg)
            assert_no_exception(pg)
            captions.append(pg.locator(CAPTION).inner_text().strip())
        assert all(c.startswith("“") and len(c) > 2 for c in captions), captions
        screenshot(pages[0], shots, "caption-upload", "wide")
    finally:
        for pg in pages:
            pg.context.close()
    assert healthy(server)
    after = new_page(browser)  # a new session still gets a caption
    try:
        open_page(after, server)
        after.locator(CAPTION).wait_for()
        assert_no_exception(after)
        assert after.get_by_text("Where the model looks").count() == 1
    finally:
        after.context.close()


HOSTILE_IN_BROWSER = ("empty.jpg", "notes.jpg", "bomb.png", "drawing.jpg", "cmyk.jpg", "dot.png")


def test_hostile_uploads_through_the_real_uploader(server, page):
    cases = {n: (d, e) for n, d, e in hostile.hostile_uploads() if n in HOSTILE_IN_BROWSER}
    assert set(cases) == set(HOSTILE_IN_BROWSER)
    open_page(page, server)
    to_upload(page)
    for name, (data, expect) in cases.items():
        upload(page, name, data)
        photo = page.locator("[data-testid='stImageCaption']", has_text=name)
        photo.or_(page.locator(ERROR, has_text=name)).first.wait_for()  # shown, or refused
        wait_idle(page)
        assert_no_exception(page)
        if expect == "caption":
            page.locator(CAPTION).wait_for()
            assert page.locator(ERROR).count() == 0, name
        else:
            text = page.locator(ERROR).first.inner_text().splitlines()[-1]  # after the icon
            assert text.startswith(f"{name}: ") and expect in text, text
    assert healthy(server)


@pytest.mark.parametrize("size", list(SIZES))
def test_every_page_renders(server, page, size, shots):
    w, h = SIZES[size]
    page.set_viewport_size({"width": w, "height": h})
    for name, path in PAGES.items():
        open_page(page, f"{server}/{path}")
        assert_no_exception(page)
        if name == "caption":
            page.locator(CAPTION).wait_for()
            page.get_by_text("Where the model looks").wait_for()
        if name == "training":
            page.locator(".js-plotly-plot").first.wait_for()
            assert page.locator(".js-plotly-plot").count() == 4
        if name == "compare":
            page.locator(".st-key-compare-model-vgg16-attention").wait_for()
            assert page.locator("[class*='st-key-compare-model-']").count() == 4
            width = page.locator(".st-key-compare-model-resnet50-inject").bounding_box()["width"]
            assert width <= w  # cards fit the window, at 420 px too
        if name == "explore":
            page.locator("[data-testid='stDataFrame']").first.wait_for()
        wait_idle(page)  # the run has drawn everything below the first element waited for
        assert_no_exception(page)
        page.wait_for_timeout(800)  # let charts and images settle before the screenshot
        screenshot(page, shots, name, size)
