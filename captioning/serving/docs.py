"""The API's reference pages, served without any CDN: ``/docs`` (Swagger UI) and ``/redoc``.

Swagger UI's and ReDoc's JavaScript, CSS and favicon are the files of the installed
``fastapi-offline`` package, served at ``/static/docs/NAME``, so the pages work on a machine
with no internet access (ReDoc's footer links the Redocly logo from its site: that image is
all either page asks an outside host for, and the page renders without it). Every URL a page
names carries the request's ``root_path``, so they also work behind a reverse proxy that
serves the API under a prefix (``--root-path``), whether or not the proxy strips it: the
assets are a route, matched like the API's own paths (a ``StaticFiles`` mount finds no file
when the proxy strips the prefix). ``/docs`` is the interactive reference (requests can be
sent from it); ``/redoc`` is the same schema as one long read-only page. Both read
``/openapi.json``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from captioning.serving.errors import ApiError

ASSETS_URL = "/static/docs"
ASSETS_PACKAGE = "fastapi_offline"  # its static/: swagger-ui-bundle.js, swagger-ui.css, ...
DOCS_URL, REDOC_URL = "/docs", "/redoc"
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"


def add_docs(app: FastAPI) -> None:
    """Add the assets, ``/docs``, its OAuth2 redirect page and ``/redoc`` to ``app``
    (built with ``docs_url=None, redoc_url=None``; ``app.openapi_url`` stays as it is)."""
    if app.openapi_url is None:
        raise ValueError("the reference pages need the app's openapi_url")
    openapi_url = app.openapi_url
    oauth2_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"
    files = asset_files()

    async def asset(name: str) -> FileResponse:
        if name not in files:
            raise ApiError(404, "not_found", f"no docs asset {name!r}")
        return FileResponse(files[name])

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_url,
            swagger_js_url=f"{root}{ASSETS_URL}/{SWAGGER_JS}",
            swagger_css_url=f"{root}{ASSETS_URL}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/{REDOC_JS}",
            redoc_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}",
            with_google_fonts=False,  # the browser's fonts, none from an outside host
        )

    app.add_api_route(f"{ASSETS_URL}/{{name}}", asset, include_in_schema=False)
    app.add_api_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_api_route(oauth2_url, swagger_ui_redirect, include_in_schema=False)
    app.add_api_route(REDOC_URL, redoc, include_in_schema=False)


def asset_files() -> dict[str, Path]:
    """``name -> path`` of the pages' assets in the installed ``fastapi-offline``."""
    try:
        folder = resources.files(ASSETS_PACKAGE) / "static"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "/docs and /redoc serve Swagger UI and ReDoc from the fastapi-offline package: "
            "pip install -r requirements.txt"
        ) from None
    files = {p.name: Path(str(p)) for p in folder.iterdir() if p.is_file()}
    missing = {SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON} - set(files)
    if missing:
        raise FileNotFoundError(f"{ASSETS_PACKAGE} lacks {sorted(missing)} in {folder}")
    return files


def _root(request: Request) -> str:
    """The path prefix the API is served under ("" when none), without a trailing slash."""
    return request.scope.get("root_path", "").rstrip("/")
