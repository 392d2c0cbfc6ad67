"""The HTTP API's reference pages offline: ``/docs`` (Swagger UI) and ``/redoc`` load every
asset from the server itself, with and without a ``--root-path`` prefix.

The fast tests read the pages' HTML in-process; the slow ones open them in Debian's
``/usr/bin/chromium`` (driven by Playwright, never a downloaded browser) against uvicorn while
every request to a host other than the server's loopback address is aborted.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette 1.x: "install httpx2 instead"; httpx works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from captioning.serving.docs import ASSETS_URL  # noqa: E402
from captioning.serving.loadtest import free_port  # noqa: E402
from tests.test_serve_errors import tone_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
PREFIX = "/captioning"
LOOPBACK = {"127.0.0.1", "localhost"}
KINDS = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
OPERATIONS = [("post", "/v1/caption"), ("get", "/v1/models"), ("get", "/healthz")]
WAIT_MS = 60_000


def referenced_urls(html: str) -> list[str]:
    """Every URL a docs page loads: ``src``/``href`` attributes, Swagger UI's ``url:`` and
    ReDoc's ``spec-url``."""
    found = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html)
    return found + re.findall(r"\burl: '([^']+)'", html)


@pytest.mark.parametrize("root_path", ["", PREFIX])
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_load_only_the_servers_own_assets(tmp_path, root_path, page):
    app, _ = tone_app(tmp_path, root_path=root_path)
    with TestClient(app) as client:
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = referenced_urls(r.text)
        assert f"{root_path}/openapi.json" in urls
        assert not re.search(r"https?://", r.text), "the page names an outside host"
        assets = [u for u in urls if not u.endswith("/openapi.json")]
        assert assets and all(u.startswith(f"{root_path}{ASSETS_URL}/") for u in assets)
        for url in assets:
            got = client.get(url)  # the full path, as a proxy that keeps the prefix sends it
            assert got.status_code == 200, url
            (kind,) = [k for ext, k in KINDS.items() if url.endswith(ext)]
            assert kind in got.headers["content-type"] and len(got.content) > 1000, url
            if root_path:  # a proxy that strips the prefix sends the path without it
                assert client.get(url.removeprefix(root_path)).content == got.content, url
        spec = client.get(f"{root_path}/openapi.json").json()
        assert {path for _, path in OPERATIONS} <= set(spec["paths"])
        if root_path:
            assert spec["servers"] == [{"url": root_path}]  # "Try it out" goes through it


def test_swagger_ui_is_version_5_and_reads_openapi_3_1(tmp_path):
    app, _ = tone_app(tmp_path)
    with TestClient(app) as client:
        js = client.get(f"{ASSETS_URL}/swagger-ui-bundle.js").text
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
        # Swagger UI 4 refuses an OpenAPI 3.1 schema; 5 renders it
        assert re.search(r'"5\.\d+\.\d+"', js) and "SwaggerUIBundle" in js


def test_unknown_assets_and_the_oauth2_redirect_page(tmp_path):
    app, _ = tone_app(tmp_path)
    with TestClient(app) as client:
        missing = client.get(f"{ASSETS_URL}/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        escape = client.get(f"{ASSETS_URL}/..%2F__init__.py")
        assert escape.status_code == 404
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "oauth2" in redirect.text
        paths = client.get("/openapi.json").json()["paths"]
        assert not {"/docs", "/redoc", f"{ASSETS_URL}/{{name}}"} & set(paths)


# ---------------------------------------------------------------- a real browser, offline


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture(scope="module", params=["", PREFIX], ids=["no-root-path", "root-path"])
def server(request, tmp_path_factory):
    """uvicorn serving the API (on the stand-in model) on a free loopback port; yields the
    URL the pages are opened at."""
    import uvicorn

    app, _ = tone_app(tmp_path_factory.mktemp("docs"), root_path=request.param)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}{request.param}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def offline_page(browser):
    """A page whose requests to any host but loopback are aborted; returns it with the
    aborted requests (resource type and URL) and the failed local responses."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    aborted: list[tuple[str, str]] = []
    failed: list[str] = []

    def only_loopback(route):
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            aborted.append((route.request.resource_type, route.request.url))
            route.abort()

    page.route("**/*", only_loopback)
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else 0)
    return page, aborted, failed


@pytest.mark.slow
def test_swagger_ui_renders_and_tries_an_operation_offline(browser, server):
    page, aborted, failed = offline_page(browser)
    try:
        page.goto(f"{server}/docs", wait_until="load")
        for method, path in OPERATIONS:
            block = page.locator(f".opblock-{method}:has([data-path='{path}'])")
            block.wait_for(state="visible", timeout=WAIT_MS)
            assert block.locator(".opblock-summary-method").inner_text() == method.upper()
        assert page.locator(".info .title").inner_text().startswith("captioning")

        health = page.locator(".opblock-get:has([data-path='/healthz'])")  # "Try it out"
        health.locator(".opblock-summary").click()
        health.locator("button.try-out__btn").click()
        health.locator("button.execute").click()
        status = health.locator(".live-responses-table tbody .response-col_status").first
        status.wait_for(state="visible", timeout=WAIT_MS)
        assert status.inner_text().strip() == "200"
        assert '"status": "ok"' in health.locator(".live-responses-table").inner_text()
        assert failed == [], failed
        assert aborted == [], f"the page asked outside hosts for {aborted}"
    finally:
        page.context.close()


@pytest.mark.slow
def test_redoc_renders_offline(browser, server):
    page, aborted, failed = offline_page(browser)
    try:
        page.goto(f"{server}/redoc", wait_until="load")
        for summary in ("Caption one image", "The model this server runs", "Liveness"):
            heading = page.locator("h2", has_text=summary).first
            heading.wait_for(state="visible", timeout=WAIT_MS)
        assert failed == [], failed
        # ReDoc's "API docs by Redocly" footer links its logo from outside: that image
        # is all the page asks outside hosts for, and it renders without it
        assert {kind for kind, _ in aborted} <= {"image"}, aborted
    finally:
        page.context.close()
