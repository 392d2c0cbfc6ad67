"""The dashboard in a real browser: a Streamlit server on the tiny world, driven by Playwright.

Uses Debian's ``/usr/bin/chromium`` (never a downloaded browser). The server's models are the
tiny world's four bundles and a soup of two runs. Eight sessions upload photos at once; hostile
files go through the real uploader; every page renders at 1400×1000 and 420×900 without
growing wider than the window; the Training page's key, charts and summary and the Explore
page's disagreements are laid out to be read at both sizes. Screenshots (``<page>-<size>.png``,
the first screen, and ``-full.png``, the whole page) go to a temporary folder, or to
``$CAPTIONING_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from captioning.bundle.soup import make_soup
from dashboard import charts
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
SOUP = "resnet50-attention-soup"  # of resnet50-attention and a second run, "run-b"
BUNDLES = ["resnet50-inject", "resnet50-attention", SOUP, "vgg16-inject", "vgg16-attention"]
KEY_ENTRY = f".st-key-training-key .{charts.KEY_CLASS}"
SUMMARY = ".st-key-training-summary [data-testid='stDataFrame']"
GAP_CARD = "[class*='st-key-gap-pair-']"

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
def models(tiny_world, tmp_path_factory) -> Path:
    """The tiny world's bundles and ``SOUP``: resnet50-attention averaged with a second run of
    it (a copy whose history scores 10 % lower), so the soup has two member lines."""
    root = tmp_path_factory.mktemp("browser-world")
    out = root / "models"
    shutil.copytree(tiny_world.models, out, ignore=shutil.ignore_patterns("train_state"))
    run_b = root / "run-b"
    shutil.copytree(out / "resnet50-attention", run_b)
    history = json.loads((run_b / "history.json").read_text())
    for epoch in history:
        epoch.update({k: v * 0.9 for k, v in epoch.items() if k.startswith("dev_")})
    (run_b / "history.json").write_text(json.dumps(history))
    make_soup(out / SOUP, [str(out / "resnet50-attention"), str(run_b)])
    return out


@contextlib.contextmanager
def dashboard(tiny_world, models: Path, log: Path) -> Iterator[str]:
    """``python -m streamlit run dashboard/app.py`` on the bundles in ``models`` and the tiny
    world's data, on a free loopback port; yields its URL and stops it afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "CAPTIONING_DATA": str(tiny_world.data),
        "CAPTIONING_MODELS": str(models),
        "CAPTIONING_CACHE": str(tiny_world.cache),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py"]
    cmd += ["--server.port", str(port), "--server.headless", "true"]
    cmd += ["--browser.gatherUsageStats", "false"]
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
def server(tiny_world, models, tmp_path_factory):
    """The dashboard on the tiny world plus a soup (``models``); yields its URL."""
    with dashboard(tiny_world, models, tmp_path_factory.mktemp("streamlit") / "server.log") as url:
        yield url


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
            assert page.locator("[class*='st-key-compare-model-']").count() == len(BUNDLES)
            width = page.locator(".st-key-compare-model-resnet50-inject").bounding_box()["width"]
            assert width <= w  # cards fit the window, at 420 px too
        if name == "explore":
            page.locator("[data-testid='stDataFrame']").first.wait_for()
        wait_idle(page)  # the run has drawn everything below the first element waited for
        assert_no_exception(page)
        page.wait_for_timeout(800)  # let charts and images settle before the screenshot
        assert_fits_the_window(page, name)
        screenshot(page, shots, name, size)


def assert_fits_the_window(pg, name: str) -> None:
    """Nothing makes the page wider than the window (no sideways scrolling of the page)."""
    width, window = pg.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    assert width <= window, f"{name}: the page is {width} px wide in a {window} px window"


def box(pg, selector: str, k: int = 0) -> dict:
    """The bounding box of the ``k``-th element ``selector`` matches."""
    return pg.locator(selector).nth(k).bounding_box()


def overlap(a: dict, b: dict) -> bool:
    """Whether two bounding boxes intersect."""
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def summary_rows(pg) -> int:
    """Rows the Training summary draws (its header excluded); asserts it needs no inner
    scrolling, so every row is on screen."""
    table = pg.locator(SUMMARY)
    table.scroll_into_view_if_needed()  # the grid draws its rows once on screen
    table.locator("table tr").nth(1).wait_for(state="attached")
    inner = table.evaluate(
        "e => [e.querySelector('.dvn-scroller').scrollHeight, "
        "e.querySelector('.dvn-scroller').clientHeight]"
    )
    assert inner[0] <= inner[1], f"the summary scrolls inside: {inner}"
    return table.evaluate("e => e.querySelectorAll('table tr').length") - 1


@pytest.mark.parametrize("size", list(SIZES))
def test_training_key_names_each_bundle_and_the_soups_runs_on_demand(server, page, size, shots):
    w, h = SIZES[size]
    page.set_viewport_size({"width": w, "height": h})
    open_page(page, f"{server}/training")
    page.locator(".js-plotly-plot").first.wait_for()
    key = page.locator(KEY_ENTRY)
    key.last.wait_for()  # the key is HTML, drawn once the markdown renderer has loaded
    assert [k.strip() for k in key.all_inner_texts()] == BUNDLES  # one line per bundle
    assert page.locator(".js-plotly-plot .legendtext").count() == 0  # one key, no legends
    key_box = box(page, ".st-key-training-key")
    plots = page.locator(".js-plotly-plot")
    for k in range(plots.count()):
        plot = plots.nth(k).bounding_box()
        assert key_box["y"] + key_box["height"] <= plot["y"]  # above every chart
        assert plot["height"] <= h  # a chart fits the screen, at 420 px too
        assert not overlap(key_box, box(page, ".js-plotly-plot .xtitle", k))
    assert summary_rows(page) == len(BUNDLES)

    page.locator(".st-key-training-members label").click()
    wait_idle(page)
    members = [f"{SOUP} · resnet50-attention", f"{SOUP} · run-b"]
    page.locator(KEY_ENTRY, has_text=members[1]).wait_for()
    entries = [k.strip() for k in key.all_inner_texts()]
    assert entries == [*BUNDLES[:2], *members, *BUNDLES[3:]]  # the soup's runs in its place
    assert page.locator(".js-plotly-plot .legendtext").count() == 0
    page.wait_for_timeout(800)
    assert summary_rows(page) == len(BUNDLES) + 1
    assert_no_exception(page)
    assert_fits_the_window(page, "training")
    screenshot(page, shots, "training-members", size)


@pytest.mark.parametrize("size", list(SIZES))
def test_explore_disagreements_name_both_models_and_show_whole_captions(server, page, size, shots):
    w, h = SIZES[size]
    page.set_viewport_size({"width": w, "height": h})
    open_page(page, f"{server}/explore")
    page.get_by_role("tab", name="Where the models disagree").click()
    cards = page.locator(GAP_CARD)
    cards.first.wait_for()
    assert cards.count() >= 2
    for k in range(cards.count()):
        for family in ("resnet50-", "vgg16-"):  # each side's model, in bold (HTML markdown)
            cards.nth(k).locator("strong", has_text=family).wait_for()
        text = cards.nth(k).inner_text()
        decoder = "inject" if "inject decoder" in text else "attention"
        assert f"resnet50-{decoder}" in text and f"vgg16-{decoder}" in text, text
        for caption in cards.nth(k).locator("p", has_text="“").all():  # each side's caption
            fits = caption.evaluate("e => e.scrollWidth <= e.clientWidth")
            assert fits, caption.inner_text()
            assert caption.inner_text().strip().endswith("”")  # whole, not cut
    cards.first.locator("button").click()
    wait_idle(page)
    page.locator("[data-testid='stImage']").first.wait_for()
    assert page.get_by_text("Reference captions").count() >= 1
    assert_no_exception(page)
    assert_fits_the_window(page, "explore")
    page.wait_for_timeout(800)
    screenshot(page, shots, "explore-disagreements", size)
