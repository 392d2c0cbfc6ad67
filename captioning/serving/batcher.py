"""Micro-batching: concurrent requests with the same beam size and prefix are captioned together.

The first waiting request opens a batch; requests with its beam size and prefix join for up to
``max_wait_s`` or until ``max_batch``. One worker thread decodes the batch's images, encodes and
beam-searches them together, so the event loop stays free for other requests (and ``/healthz``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from captioning.data.images import ImageLoadError
from captioning.runtime.pixels import load_pixels
from captioning.serving.errors import ApiError


@dataclass
class _Job:
    data: bytes
    name: str
    beam: int
    future: asyncio.Future
    prefix: str = ""  # words the caption starts with
    labels: int = 0  # the classifier's top-K labels to add (0: none)
    queued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, str]:
        """What a batch shares: its decoding."""
        return self.beam, self.prefix


class MicroBatcher:
    """Groups concurrent requests into batches and runs them in one worker thread.

    Requests with another beam size or prefix than the open batch's wait for the next batch. While a
    batch runs, new requests queue up, so under load batches fill without waiting.
    ``captioner`` needs ``caption_pixels(pixels [N, 3, 224, 224], beam_size=...)``.
    """

    def __init__(
        self, captioner: Any, max_batch: int, max_wait_s: float, max_queue: int, **load_kw: Any
    ) -> None:
        self.cap = captioner
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.load_kw = load_kw  # e.g. max_pixels for load_pixels
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._pending: deque[_Job] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner")
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.requests = 0

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() + len(self._pending)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop batching; requests still waiting get 503 ``shutting_down``."""
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._pending, *_drain(self._queue)]:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "shutting_down", "server is stopping"))
        self._executor.shutdown(wait=True)

    async def submit(
        self, data: bytes, name: str, beam: int, prefix: str = "", labels: int = 0
    ) -> dict:
        """Queue one image; returns its caption dict (or raises ImageLoadError / ApiError).
        ``labels`` > 0 adds the classifier's top-K ImageNet labels (``Captioner.labels``)."""
        if self.depth >= self.max_queue:
            raise ApiError(503, "overloaded", f"{self.depth} requests already queued; retry later")
        loop = asyncio.get_running_loop()
        job = _Job(data, name, beam, loop.create_future(), prefix, labels)
        await self._queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            key = self._pending[0].key
            await self._gather(key, loop.time() + self.max_wait_s)
            batch = self._take(key)
            if not batch:  # every client of this decoding went away
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # the model failed: fail this batch, keep serving
                failed = ApiError(500, "inference_failed", f"{type(e).__name__}: {e}")
                results = [failed] * len(batch)
            self.batches += 1
            self.requests += len(batch)
            _settle(batch, results)

    async def _gather(self, key: tuple, deadline: float) -> None:
        """Wait for requests until ``max_batch`` of ``key`` are pending or ``deadline`` passes."""
        loop = asyncio.get_running_loop()
        while self._count(key) < self.max_batch:
            self._pending.extend(_drain(self._queue))
            timeout = deadline - loop.time()
            if self._count(key) >= self.max_batch or timeout <= 0:
                return
            try:
                self._pending.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                return

    def _count(self, key: tuple) -> int:
        return sum(1 for j in self._pending if j.key == key)

    def _take(self, key: tuple) -> list[_Job]:
        """Up to ``max_batch`` pending jobs of ``key`` whose clients still wait."""
        batch, keep = [], deque()
        for job in self._pending:
            if job.key == key and len(batch) < self.max_batch:
                if not job.future.done():  # done: the client disconnected
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
            try:  # the captioning input's one loader, as the `caption` command uses
                pixels.append(load_pixels(job.data, name=job.name, **self.load_kw))  # [3, 224, 224]
                where.append(i)
            except ImageLoadError as e:
                out[i] = e
        if not pixels:
            return out
        t1 = time.perf_counter()
        first = batch[0]
        results = self.cap.caption_pixels(
            torch.stack(pixels), beam_size=first.beam, prefix=first.prefix or None
        )
        t2 = time.perf_counter()
        image_ms = (t1 - t0) * 1000 / len(batch)
        for i, res in zip(where, results, strict=True):
            out[i] = {
                "caption": res.text,
                "logprob": round(res.score, 4),
                "confidence": round(res.confidence, 4),
                "prefix": res.prefix,
                "nbest": [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest],
                "beam": batch[i].beam,
                "batch_size": len(pixels),
                "timings": {
                    "queue_ms": round((t0 - batch[i].queued) * 1000, 2),
                    "image_ms": round(image_ms, 2),
                    "encode_ms": round(res.timings.get("encode_ms", 0.0), 2),
                    "decode_ms": round(res.timings.get("decode_ms", 0.0), 2),
                    "batch_ms": round((t2 - t0) * 1000, 2),
                },
            }
            if batch[i].labels:  # the classifier's opinion, on the same worker thread
                labels = self.cap.labels(batch[i].data, batch[i].labels)
                out[i]["labels"] = labels.to_dict()
        return out


def _settle(batch: list[_Job], results: list[dict | Exception]) -> None:
    """Hand each job its result or error (unless its client went away)."""
    for job, res in zip(batch, results, strict=True):
        if job.future.done():
            continue
        if isinstance(res, Exception):
            job.future.set_exception(res)
        else:
            job.future.set_result(res)


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items
