"""``caption`` on many images with several processes on one machine.

Each worker process loads the bundle once, with its share of the cores, and captions chunks of
the input on the pipelined path (``Captioner.caption_stream``); the chunks go to whichever
worker is free, and the results come back in input order. Why processes and not threads: the
compiled decoder step barely speeds up from one thread to two, while two processes overlap it;
on 2 cores two one-thread workers caption resnet50-attention about 10% faster than one
two-thread process once started (docs/performance.md; Ray's ``batch`` uses the same plan).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from captioning.data.images import ImageLoadError
from captioning.inference.captioner import CaptionResult

SPAWN = multiprocessing.get_context("spawn")  # fork would copy torch's and OpenVINO's threads
IMAGES_PER_PROC = 128  # the default plan starts a worker per this many images (start-up ~2 s)
WORKER_MEMORY = 1.5 * 2**30  # and per this much available memory (a worker peaks at ~1.2 GB)
POLL_S = 1.0  # how often the parent checks that its workers are alive


@dataclass
class WorkerSpec:
    """What every worker loads and how it captions."""

    model: str
    precision: str = "auto"
    runtime: str = "auto"
    threads: int = 1
    beam: int | None = None
    batch_size: int = 16
    overrides: dict = field(default_factory=dict)  # decoding overrides (length_alpha, ...)


class WorkerError(RuntimeError):
    """A worker could not load the bundle or failed while captioning."""


def available_memory() -> float | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_procs(n_images: int, cpus: int, memory: float | None = None) -> int:
    """Worker processes for ``n_images``: one per CPU, one per ``IMAGES_PER_PROC`` images and
    one per ``WORKER_MEMORY`` of ``memory`` at most; 1 means caption in this process."""
    procs = min(cpus, n_images // IMAGES_PER_PROC)
    if memory is not None:
        procs = min(procs, int(memory // WORKER_MEMORY))
    return max(1, procs)


def _worker(spec: WorkerSpec, tasks, results) -> None:
    """Process entry: load the bundle, then caption chunks until the ``None`` sentinel."""
    try:
        import torch

        torch.set_num_threads(spec.threads)
        from captioning.inference.captioner import Captioner, dedicate_cores

        cap = Captioner.load(spec.model, spec.precision, runtime=spec.runtime)
        dedicate_cores(cap)  # a worker process runs only this captioner
        for chunk_id, paths in iter(tasks.get, None):
            out: list[CaptionResult | str] = []
            stream = cap.caption_stream(
                paths, spec.beam, batch_size=spec.batch_size, **spec.overrides
            )
            for _, res in stream:  # an ImageLoadError travels as its message
                bad = isinstance(res, ImageLoadError)
                out.append(str(res) if bad else replace(res, attention=None))
            results.put(("done", chunk_id, out))
    except BaseException as e:  # noqa: BLE001 (reported to the parent, which raises it)
        results.put(("failed", os.getpid(), f"{type(e).__name__}: {e}"))


def caption_parallel(
    spec: WorkerSpec, files: Sequence[str | Path], procs: int, chunk: int | None = None
) -> Iterator[tuple[str | Path, CaptionResult | ImageLoadError]]:
    """Caption ``files`` with ``procs`` worker processes; yields (file, result or
    ImageLoadError) in input order, as ``Captioner.caption_stream`` does. Results carry no
    attention maps. Raises WorkerError when a worker fails or dies."""
    chunk = chunk or 4 * spec.batch_size
    chunks = [list(files[i : i + chunk]) for i in range(0, len(files), chunk)]
    tasks, results = SPAWN.Queue(), SPAWN.Queue()
    for i, c in enumerate(chunks):
        tasks.put((i, [str(p) for p in c]))
    for _ in range(procs):
        tasks.put(None)
    job = (spec, tasks, results)
    workers = [SPAWN.Process(target=_worker, args=job, daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    try:
        next_id = 0
        done: dict[int, list] = {}
        while next_id < len(chunks):
            kind, key, payload = _receive(results, workers)
            if kind == "failed":
                raise WorkerError(f"a caption worker failed: {payload}")
            done[key] = payload
            while next_id in done:
                for path, item in zip(chunks[next_id], done.pop(next_id), strict=True):
                    yield path, ImageLoadError(item) if isinstance(item, str) else item
                next_id += 1
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
        tasks.close()
        results.close()


def _receive(results, workers) -> tuple:
    """The next message; raises WorkerError when every worker has ended without sending it."""
    while True:
        try:
            return results.get(timeout=POLL_S)
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                codes = [w.exitcode for w in workers]
                killed = any((c or 0) < 0 for c in codes)
                why = "killed: out of memory?" if killed else "see their errors above"
                raise WorkerError(
                    f"the caption workers ended early (exit codes "
                    f"{', '.join(map(str, codes))}; {why})"
                ) from None
