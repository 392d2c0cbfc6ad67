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
from captioning.inference.captioner import PrefixError
from captioning.inference.labels import MAX_LABELS
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
MAX_PREFIX_CHARS = 200  # a prefix is a few words; longer text is refused before tokenising

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
    prefix: Annotated[
        str | None,
        Query(max_length=MAX_PREFIX_CHARS, description="words the caption must start with"),
    ] = None,
    labels: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_LABELS,
            description="add the encoder's own top-K ImageNet labels, a second opinion from "
            "its classifier (ResNet50 has one; VGG16's weights carry no classifier head)",
        ),
    ] = None,
) -> dict:
    """Send the image as a multipart ``file`` field (with optional ``beam``, ``prefix`` and
    ``labels`` fields) or as the raw request body."""
    t0 = time.perf_counter()
    data, name, form = await read_image(request)
    cap = svc.captioner
    beam = beam or _form_int(form, "beam", svc.cfg.max_beam) or cap.defaults.beam_size
    if beam > svc.cfg.max_beam:
        raise ApiError(422, "bad_beam", f"beam {beam} is over the limit {svc.cfg.max_beam}")
    prefix = (prefix or _form_text(form, "prefix") or "").strip()
    try:
        cap.prefix_ids(prefix, cap.decode_config(beam))
    except PrefixError as e:
        raise ApiError(422, "bad_prefix", str(e)) from None
    labels = labels or _form_int(form, "labels", MAX_LABELS) or 0
    try:
        res = await svc.batcher.submit(data, name, beam, prefix, labels)
    except ImageLoadError as e:
        raise ApiError(422, "bad_image", str(e)) from None
    res["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return {**res, "model": cap.name, "runtime": svc.runtime}


async def read_image(request: Request) -> tuple[bytes, str, FormData | None]:
    """(image bytes, a name for messages, the other form fields) from multipart or a raw
    body (no form)."""
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
        data, name = await upload.read(), upload.filename or "upload"
    else:
        data, name, form = await request.body(), "upload", None
    if not data:
        raise ApiError(400, "no_image", "empty request body: send an image")
    return data, name, form


def _form_int(form: FormData | None, field: str, high: int) -> int | None:
    """The multipart integer ``field``, if any; 422 ``bad_<field>`` unless in 1..``high``."""
    raw = form.get(field) if form is not None else None
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        detail = f"form field {field} must be an integer 1..{high}, got {raw!r}"
        raise ApiError(422, f"bad_{field}", detail)
    return value


def _form_text(form: FormData | None, field: str) -> str | None:
    """The multipart text ``field``, if any; 422 ``bad_<field>`` when over MAX_PREFIX_CHARS."""
    raw = form.get(field) if form is not None else None
    if not isinstance(raw, str):
        return None
    if len(raw) > MAX_PREFIX_CHARS:
        detail = f"form field {field} is {len(raw)} characters; at most {MAX_PREFIX_CHARS}"
        raise ApiError(422, f"bad_{field}", detail)
    return raw


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
