"""The pipelined batch path: a bounded pool of threads decodes images while batches are encoded.

``prefetch(sources, batch_size)`` yields ``Batch``es in input order. Worker threads run
``load_pixels`` (decode, reduce in uint8, resize to the encoders' input) on the images of the
next ``ahead`` batches while the caller encodes and beam-searches the current one, so the cores
never wait on I/O and at most ``(ahead + 1) * batch_size`` decoded images exist at once. Images
that fail to load are reported in their batch (``errors``), never raised.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from captioning.data.images import ImageLoadError, load_image
from captioning.models.encoders import INPUT_SIZE, preprocess

MAX_WORKERS = 4


def load_pixels(src, **load_kw) -> torch.Tensor:
    """An image source (path, bytes, stream, PIL) -> [3, 224, 224] float RGB in [0, 1].

    The one loader of the captioning input: large images are reduced in uint8 while decoding.
    ``load_kw`` (``name``, ``max_pixels``) go to ``load_image``. Raises ImageLoadError.
    """
    return preprocess(load_rgb(src, **load_kw))


def load_rgb(src, **load_kw) -> np.ndarray:
    """An image source -> the reduced image as uint8 RGB [H, W, 3], before the final resize.

    ``load_pixels(src)`` is ``preprocess(load_rgb(src))``: this is its first half, for
    callers that move images between processes (4x fewer bytes than the float pixels).
    """
    image = load_image(src, reduce_to=INPUT_SIZE, **load_kw)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def default_workers() -> int:
    """Decoding threads: one per core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@dataclass
class Batch:
    """Consecutive sources; ``pixels`` holds the ones that loaded, in order."""

    sources: list  # every source of this batch, in input order
    pixels: torch.Tensor | None  # [n_loaded, 3, 224, 224]; None when none loaded
    errors: dict[int, ImageLoadError] = field(default_factory=dict)  # position -> why
    wait_seconds: float = 0.0  # how long the consumer waited for this batch to finish loading

    @property
    def loaded(self) -> list:
        return [s for i, s in enumerate(self.sources) if i not in self.errors]

    def __len__(self) -> int:
        return len(self.sources)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _collect(sources: list, futures: list[Future]) -> Batch:
    t0 = time.perf_counter()
    pixels, errors = [], {}
    for i, fut in enumerate(futures):
        try:
            pixels.append(fut.result())
        except ImageLoadError as e:
            errors[i] = e
    stacked = torch.stack(pixels) if pixels else None
    return Batch(sources, stacked, errors, time.perf_counter() - t0)


def prefetch(
    sources: Iterable,
    batch_size: int = 16,
    *,
    workers: int | None = None,
    ahead: int = 2,
    load: Callable[[Any], torch.Tensor] = load_pixels,
) -> Iterator[Batch]:
    """Yield batches of ``load(source)`` results, decoding up to ``ahead`` batches in advance.

    ``load`` must raise ImageLoadError for a bad image (anything else propagates). Closing the
    generator early cancels the pending work.
    """
    if batch_size < 1 or ahead < 0:
        raise ValueError("batch_size must be >= 1 and ahead >= 0")
    chunks = _chunks(sources, batch_size)
    pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="load")
    pending: deque[tuple[list, list[Future]]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, [pool.submit(load, s) for s in chunk]))

    try:
        for _ in range(ahead + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            yield _collect(chunk, futures)  # the next `ahead` batches load meanwhile
            submit_next()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
