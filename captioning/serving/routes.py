"""The API's routers: ``POST /v1/caption``, ``GET /v1/models`` and ``GET /healthz``.

Every endpoint reads the ``Service`` (config, captioner, micro-batcher) from ``app.state``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import FormData, UploadFile

from captioning.bundle.reports import bundle_info, default_summary
from captioning.data.images import ImageLoadError
from captioning.serving.batcher import MicroBatcher
from captioning.serving.config import ServeConfig
from captioning.serving.errors import ApiError
from captioning.serving.schemas import (
    CAPTION_BODY,
    CAPTION_ERRORS,
    CaptionResponse,
    Health,
    ModelInfo,
)


@dataclass
class Service:
    """What the endpoints share: the config, the loaded captioner and its micro-batcher."""

    cfg: ServeConfig
    captioner: Any
    batcher: MicroBatcher
    runtime: str
    started: float = field(default_factory=time.time)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

captions = APIRouter(prefix="/v1", tags=["captions"])
models = APIRouter(prefix="/v1", tags=["models"])
health = APIRouter(tags=["health"])
ROUTERS = (captions, models, health)


@captions.post(
    "/caption",
    response_model=CaptionResponse,
    responses=CAPTION_ERRORS,
    openapi_extra=CAPTION_BODY,
    summary="Caption one image",
)
async def caption(
    request: Request,
    svc: ServiceDep,
    beam: Annotated[
        int | None, Query(ge=1, description="beam size (default: the bundle's)")
    ] = None,
) -> dict:
    """Send the image as a multipart ``file`` field or as the raw request body."""
    t0 = time.perf_counter()
    data, name, form_beam = await read_image(request)
    beam = beam or form_beam or svc.captioner.defaults.beam_size
    if beam > svc.cfg.max_beam:
        raise ApiError(422, "bad_beam", f"beam {beam} is over the limit {svc.cfg.max_beam}")
    try:
        res = await svc.batcher.submit(data, name, beam)
    except ImageLoadError as e:
        raise ApiError(422, "bad_image", str(e)) from None
    res["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return {**res, "model": svc.captioner.name, "runtime": svc.runtime}


async def read_image(request: Request) -> tuple[bytes, str, int | None]:
    """(image bytes, a name for messages, beam from the form) from multipart or a raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form()
        except ApiError:  # the body is over the size limit
            raise
        except Exception as e:  # malformed multipart
            raise ApiError(400, "bad_request", f"cannot parse the multipart body ({e})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, "no_image", "multipart body has no file field (send it as 'file')")
        data, name, form_beam = await upload.read(), upload.filename or "upload", _form_beam(form)
    else:
        data, name, form_beam = await request.body(), "upload", None
    if not data:
        raise ApiError(400, "no_image", "empty request body: send an image")
    return data, name, form_beam


def _form_beam(form: FormData) -> int | None:
    """The multipart ``beam`` field, if any; 422 ``bad_beam`` unless a positive integer."""
    raw = form.get("beam")
    try:
        beam = int(raw) if isinstance(raw, str) and raw else None
    except ValueError:
        raise ApiError(422, "bad_beam", f"beam must be an integer, got {raw!r}") from None
    if beam is not None and beam < 1:
        raise ApiError(422, "bad_beam", "beam must be at least 1")
    return beam


@models.get("/models", response_model=list[ModelInfo], summary="The model this server runs")
async def list_models(svc: ServiceDep) -> list[dict]:
    cap = svc.captioner
    cfg = cap.config
    members = cfg.get("members")  # an ensemble's member bundles
    return [
        {
            "name": cap.name,
            "encoder": cfg["encoder"],
            "decoder": cfg["decoder"],
            "runtime": svc.runtime,
            "precision": cap.precision_label,
            "decode_defaults": cfg.get("decode_defaults", {}),
            "max_beam": svc.cfg.max_beam,
            "test_metrics": default_summary(bundle_info(cap.path), "test"),
            "members": [{"name": m["name"], "weight": m["weight"]} for m in members]
            if members is not None
            else None,
        }
    ]


@health.get("/healthz", response_model=Health, summary="Liveness and queue depth")
async def healthz(svc: ServiceDep) -> dict:
    return {
        "status": "ok",
        "model": svc.captioner.name,
        "queued": svc.batcher.depth,
        "batches": svc.batcher.batches,
        "requests": svc.batcher.requests,
        "uptime_s": round(time.time() - svc.started, 1),
    }
