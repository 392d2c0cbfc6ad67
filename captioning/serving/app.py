"""HTTP API on FastAPI + uvicorn: ``POST /v1/caption``, ``GET /v1/models``, ``GET /healthz``.

``create_app(ServeConfig(model=...))`` builds the app (the routers of ``routes``, one
``Service`` in ``app.state``); ``serve(cfg)`` runs it on uvicorn. Concurrent requests are
micro-batched (``batcher``) in one worker thread, so the event loop (and ``/healthz``) stays
responsive under load. Bad images, bad parameters, oversized bodies and overload become
4xx/503 JSON errors ``{"error": code, "detail": message}``, and the OpenAPI schema says so.
``/docs`` (Swagger UI, the interactive reference) and ``/redoc`` load their scripts and styles
from the server itself (``docs``); ``/openapi.json`` is the schema both read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from captioning import __version__
from captioning.inference.captioner import dedicate_cores
from captioning.serving.batcher import MicroBatcher
from captioning.serving.config import ServeConfig
from captioning.serving.docs import add_docs
from captioning.serving.errors import ApiError, error_response, validation_error
from captioning.serving.limits import BodySizeLimit
from captioning.serving.loading import load_captioner
from captioning.serving.routes import ROUTERS, Service
from captioning.serving.schemas import ErrorResponse

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(cfg: ServeConfig, captioner: Any = None) -> FastAPI:
    """The FastAPI app; loads ``cfg.model`` at start-up unless a ``captioner`` is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cap = captioner or load_captioner(cfg.model, cfg.precision, cfg.runtime)
        _warm_up(cap)
        batcher = MicroBatcher(
            cap, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, max_pixels=cfg.max_pixels
        )
        await batcher.start()
        app.state.service = Service(cfg, cap, batcher, cap.runtime)
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="captioning",
        version=__version__,
        summary="Image captions from a Flickr8k-trained model bundle.",
        lifespan=lifespan,
        root_path=cfg.root_path,
        docs_url=None,  # add_docs serves both pages from local assets
        redoc_url=None,
    )
    for router in ROUTERS:
        app.include_router(router)
    add_docs(app)
    _errors_in_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)
    return app


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    """An ``ApiError`` as its JSON response."""
    return error_response(exc.status, exc.code, exc.detail)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A parameter FastAPI refused (``?beam=abc``): 422 ``bad_beam``/``bad_request`` naming
    the parameter, the value given and what it accepts."""
    err = validation_error(exc.errors(), getattr(request.scope.get("route"), "dependant", None))
    return error_response(err.status, err.code, err.detail)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: 500 ``internal`` naming it."""
    return error_response(500, "internal", f"{type(exc).__name__}: {exc}")


_ERROR_REF = "#/components/schemas/ErrorResponse"
_VALIDATION_REF = "#/components/schemas/HTTPValidationError"
_BAD_PARAMETER = "a parameter is not valid (the detail names it, the value given, what it accepts)"


def _errors_in_openapi(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI schema advertise every 422 as ``ErrorResponse``, the JSON that
    ``invalid_request`` answers with, in place of FastAPI's ``HTTPValidationError``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _validation_as_error_response(build())
        return app.openapi_schema

    app.openapi = openapi


def _validation_as_error_response(schema: dict[str, Any]) -> None:
    json_422 = {"application/json": {"schema": {"$ref": _ERROR_REF}}}
    replaced = False
    for item in schema.get("paths", {}).values():
        for op in item.values():
            responses = op.get("responses", {}) if isinstance(op, dict) else {}
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref") == _VALIDATION_REF:
                responses["422"] = {"description": _BAD_PARAMETER, "content": json_422}
                replaced = True
    if not replaced:
        return
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
    for name in ("HTTPValidationError", "ValidationError"):  # the second is the first's item
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)


def _warm_up(cap: Any) -> None:
    """One caption at start-up, so the first request does not pay for lazy initialisation."""
    from PIL import Image

    cap.caption(Image.new("RGB", (224, 224), (128, 128, 128)), beam_size=1)


def serve(cfg: ServeConfig) -> None:
    """Run the API on uvicorn (one process: the model and the batcher live in it)."""
    import uvicorn

    cap = load_captioner(cfg.model, cfg.precision, cfg.runtime)  # a bad bundle fails here, briefly
    dedicate_cores(cap)  # this process serves only it
    uvicorn.run(
        create_app(cfg, captioner=cap),
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=10,
    )
