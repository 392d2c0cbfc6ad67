"""HTTP API on FastAPI + uvicorn: ``POST /v1/caption``, ``GET /v1/models``, ``GET /healthz``.

``create_app(ServeConfig(model=...))`` builds the app (routers below, one ``Service`` in
``app.state``); ``serve(cfg)`` runs it on uvicorn. Concurrent requests are micro-batched: a
``MicroBatcher`` collects requests with the same beam size for up to ``max_wait_ms`` (or until
``max_batch``), then decodes the images, encodes and beam-searches them together in one worker
thread, so the event loop (and ``/healthz``) stays responsive under load. Bad images, oversized
bodies and overload become 4xx/503 JSON errors ``{"error": code, "detail": message}``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from captioning import __version__
from captioning.data.images import DEFAULT_MAX_PIXELS, ImageLoadError
from captioning.models.decoding import MAX_BEAM
from captioning.runtime.pixels import load_pixels
from captioning.serving.ray_batch import load_captioner

MB = 1 << 20


@dataclass
class ServeConfig:
    """What ``python -m captioning serve`` runs."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str = "auto"
    runtime: str = "auto"
    max_batch: int = 16  # requests encoded and decoded together
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_mb: float = 20.0  # request-size limit (413 above it)
    max_queue: int = 256  # requests waiting at most; more get 503
    max_beam: int = MAX_BEAM
    max_pixels: int = DEFAULT_MAX_PIXELS
    root_path: str = ""  # the path prefix when served behind a reverse proxy
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_beam < 1:
            raise ValueError("max_batch, max_queue and max_beam must be at least 1")
        if self.max_wait_ms < 0 or self.max_body_mb <= 0:
            raise ValueError("max_wait_ms must be >= 0 and max_body_mb > 0")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error the client caused (or overload); becomes ``{"error", "detail"}`` JSON."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"request body over the limit of {limit / MB:g} MB")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by Content-Length, else while reading)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _error(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                return
            if too_big:
                e = BodyTooLarge(self.max_bytes)
                await _error(e.status, e.code, e.detail)(scope, receive, send)
                return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # chunked upload without Content-Length
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------- micro-batching


@dataclass
class _Job:
    data: bytes
    name: str
    beam: int
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Groups concurrent requests into batches and runs them in one worker thread.

    The first waiting request opens a batch; requests with the same beam size join it for up to
    ``max_wait_s`` or until ``max_batch``. Requests with another beam wait for the next batch.
    While a batch runs, new requests queue up, so under load batches fill without waiting.
    """

    def __init__(self, captioner, max_batch: int, max_wait_s: float, max_queue: int, **load_kw):
        self.cap, self.max_batch, self.max_wait_s, self.max_queue = (
            captioner,
            max_batch,
            max_wait_s,
            max_queue,
        )
        self.load_kw = load_kw  # e.g. max_pixels for load_image
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._pending: deque[_Job] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner")
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.requests = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._pending)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._pending, *_drain(self._queue)]:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "server is stopping"))
        self._executor.shutdown(wait=True)

    async def submit(self, data: bytes, name: str, beam: int) -> dict:
        """Queue one image; returns its caption dict (or raises ImageLoadError / ApiError)."""
        if self.depth >= self.max_queue:
            raise ApiError(503, "overloaded", f"{self.depth} requests already queued; retry later")
        job = _Job(data, name, beam, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            beam = self._pending[0].beam
            deadline = loop.time() + self.max_wait_s
            while self._count(beam) < self.max_batch:
                self._pending.extend(_drain(self._queue))
                if self._count(beam) >= self.max_batch:
                    break
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    self._pending.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            batch = self._take(beam)
            if not batch:  # every client of this beam went away
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # the model failed: fail this batch, keep serving
                results = [ApiError(500, "inference_failed", f"{type(e).__name__}: {e}")] * len(
                    batch
                )
            self.batches += 1
            self.requests += len(batch)
            for job, res in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(res, Exception):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    def _count(self, beam: int) -> int:
        return sum(1 for j in self._pending if j.beam == beam)

    def _take(self, beam: int) -> list[_Job]:
        batch, keep = [], deque()
        for job in self._pending:
            if job.beam == beam and len(batch) < self.max_batch:
                if not job.future.done():  # cancelled: the client disconnected
                    batch.append(job)
            else:
                keep.append(job)
        self._pending = keep
        return batch

    def _run(self, batch: list[_Job]) -> list[dict | Exception]:
        """In the worker thread: decode every image, then caption the good ones together."""
        t0 = time.perf_counter()
        out: list[dict | Exception] = [None] * len(batch)  # type: ignore[list-item]
        pixels, where = [], []
        for i, job in enumerate(batch):
            try:  # the captioning input's one loader, as `caption` uses
                pixels.append(load_pixels(job.data, name=job.name, **self.load_kw))
                where.append(i)
            except ImageLoadError as e:
                out[i] = e
        t1 = time.perf_counter()
        if pixels:
            results = self.cap.caption_pixels(torch.stack(pixels), beam_size=batch[0].beam)
            t2 = time.perf_counter()
            n = len(pixels)
            for i, res in zip(where, results, strict=True):
                job = batch[i]
                out[i] = {
                    "caption": res.text,
                    "logprob": round(res.score, 4),
                    "nbest": [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest],
                    "beam": job.beam,
                    "batch_size": n,
                    "timings": {
                        "queue_ms": round((t0 - job.queued) * 1000, 2),
                        "image_ms": round((t1 - t0) * 1000 / len(batch), 2),
                        "encode_ms": round(res.timings.get("encode_ms", 0.0), 2),
                        "decode_ms": round(res.timings.get("decode_ms", 0.0), 2),
                        "batch_ms": round((t2 - t0) * 1000, 2),
                    },
                }
        return out


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items


# ---------------------------------------------------------------- the service and its routers


@dataclass
class Service:
    cfg: ServeConfig
    captioner: Any
    batcher: MicroBatcher
    runtime: str
    started: float = field(default_factory=time.time)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


class Hypothesis(BaseModel):
    caption: str
    logprob: float = Field(description="log-probability (sum over words and <end>)")


class CaptionResponse(BaseModel):
    caption: str
    logprob: float
    nbest: list[Hypothesis]
    model: str
    runtime: str
    beam: int
    batch_size: int = Field(description="images captioned together with this one")
    timings: dict[str, float] = Field(
        description="queue_ms (waiting for a batch), image_ms (decoding the upload), encode_ms "
        "and decode_ms (this image's share of the batch), batch_ms, total_ms (in the server)"
    )


class ErrorResponse(BaseModel):
    error: str
    detail: str


class ModelInfo(BaseModel):
    name: str
    encoder: str
    decoder: str
    runtime: str
    precision: str
    decode_defaults: dict
    max_beam: int
    test_metrics: dict | None = None
    members: list[dict] | None = None  # an ensemble's: name and weight of each member bundle


class Health(BaseModel):
    status: str
    model: str
    queued: int
    batches: int
    requests: int
    uptime_s: float


_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "no image in the request"),
        (413, "request body over the size limit"),
        (422, "not a usable image (the detail names the cause), or a bad parameter"),
        (503, "too many requests queued"),
    )
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

captions = APIRouter(prefix="/v1", tags=["captions"])
models = APIRouter(prefix="/v1", tags=["models"])
health = APIRouter(tags=["health"])


@captions.post(
    "/caption",
    response_model=CaptionResponse,
    responses=_ERRORS,
    openapi_extra=_BODY,
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
    data, name, form_beam = await _read_image(request)
    beam = beam or form_beam or svc.captioner.defaults.beam_size
    if beam > svc.cfg.max_beam:
        raise ApiError(422, "bad_beam", f"beam {beam} is over the limit {svc.cfg.max_beam}")
    try:
        res = await svc.batcher.submit(data, name, beam)
    except ImageLoadError as e:
        raise ApiError(422, "bad_image", str(e)) from None
    res["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return {**res, "model": svc.captioner.name, "runtime": svc.runtime}


async def _read_image(request: Request) -> tuple[bytes, str, int | None]:
    """(image bytes, a name for messages, beam from the form) from multipart or a raw body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except ApiError:
            raise
        except Exception as e:  # malformed multipart
            raise ApiError(400, "bad_request", f"cannot parse the multipart body ({e})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, "no_image", "multipart body has no file field (send it as 'file')")
        data = await upload.read()
        name = upload.filename or "upload"
        raw_beam = form.get("beam")
        try:
            form_beam = int(raw_beam) if isinstance(raw_beam, str) and raw_beam else None
        except ValueError:
            raise ApiError(422, "bad_beam", f"beam must be an integer, got {raw_beam!r}") from None
        if form_beam is not None and form_beam < 1:
            raise ApiError(422, "bad_beam", "beam must be at least 1")
    else:
        data, name, form_beam = await request.body(), "upload", None
    if not data:
        raise ApiError(400, "no_image", "empty request body: send an image")
    return data, name, form_beam


@models.get("/models", response_model=list[ModelInfo], summary="The model this server runs")
async def list_models(svc: ServiceDep) -> list[dict]:
    from captioning.bundle.reports import bundle_info, default_summary

    cap = svc.captioner
    cfg = cap.config
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
            "members": [{"name": m["name"], "weight": m["weight"]} for m in cfg["members"]]
            if "members" in cfg
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


# ---------------------------------------------------------------- the app


def create_app(cfg: ServeConfig, captioner=None) -> FastAPI:
    """The FastAPI app; loads ``cfg.model`` at start-up unless a ``captioner`` is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
    )
    app.include_router(captions)
    app.include_router(models)
    app.include_router(health)
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    return app


def _warm_up(cap) -> None:
    """One caption at start-up, so the first request does not pay for lazy initialisation."""
    from PIL import Image

    cap.caption(Image.new("RGB", (224, 224), (128, 128, 128)), beam_size=1)


def serve(cfg: ServeConfig) -> None:
    """Run the API on uvicorn (one process: the model and the batcher live in it)."""
    import uvicorn

    cap = load_captioner(cfg.model, cfg.precision, cfg.runtime)  # a bad bundle fails here, briefly
    uvicorn.run(
        create_app(cfg, captioner=cap),
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=10,
    )
