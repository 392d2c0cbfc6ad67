"""``python -m captioning bench-serve``: a load test of the HTTP API on loopback.

Starts ``python -m captioning serve`` on a free loopback port (or targets ``url``), then for each
concurrency level runs that many asyncio + httpx clients posting the shipped sample photos, bounded
by a number of requests and a time limit per level. Reports p50/p99 latency, requests/s and
errors per level, and the speed-up of the highest level over one client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from captioning.core.paths import SAMPLES_DIR

if TYPE_CHECKING:
    import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadConfig:
    model: str = "resnet50-attention"
    url: str | None = None  # None: start a server on a free loopback port
    levels: tuple[int, ...] = (1, 8, 32)
    requests: int = 96  # per level, at most
    seconds: float = 60.0  # per level, at most
    warmup: int = 4
    beam: int | None = None  # None: the bundle's default
    timeout: float = 120.0  # per request
    startup_timeout: float = 180.0
    server_args: list[str] = field(default_factory=list)  # extra `serve` options

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ValueError("concurrency levels must be positive integers")
        if self.requests < 1 or self.seconds <= 0:
            raise ValueError("requests and seconds must be positive")
        if self.url and urlsplit(self.url).hostname not in LOOPBACK:
            raise ValueError(f"--url {self.url}: the load test runs on loopback only")


def sample_images() -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of each shipped sample photo."""
    files = sorted(SAMPLES_DIR.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no sample photos in {SAMPLES_DIR}")
    return [(f.name, f.read_bytes()) for f in files]


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(model: str, extra: list[str], startup_timeout: float) -> Iterator[str]:
    """``python -m captioning serve`` on a free loopback port; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "captioning", "serve", "--model", model, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: never blocks the server
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning", *extra],
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        try:
            _wait_ready(url, proc, log, startup_timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: IO[str], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            lines = log.read().strip().splitlines()
            raise RuntimeError(
                f"server exited at start-up: {lines[-1] if lines else proc.returncode}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout:.0f} s")
        time.sleep(0.5)


async def run_level(
    url: str,
    clients: int,
    images: list[tuple[str, bytes]],
    n_requests: int,
    seconds: float,
    beam: int | None,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict:
    """``clients`` concurrent loops sharing a budget of ``n_requests`` and ``seconds``.

    ``transport``: httpx's own (TCP) by default; e.g. ``httpx.ASGITransport(app)`` to load an
    app in this process.
    """
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    batch_sizes: list[int] = []
    issued = 0
    params = {"beam": beam} if beam else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t_start = time.perf_counter()
    deadline = t_start + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < n_requests and time.perf_counter() < deadline:
            name, data = images[(issued + i) % len(images)]
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    f"{url}/v1/caption",
                    files={"file": (name, data, "image/jpeg")},
                    params=params,
                )
            except httpx.HTTPError as e:
                key = type(e).__name__
                errors[key] = errors.get(key, 0) + 1
                continue
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
                batch_sizes.append(r.json().get("batch_size", 1))
            else:
                key = f"HTTP {r.status_code}"
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - t_start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "clients": clients,
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
    }


async def _run_all(url: str, cfg: LoadConfig) -> tuple[dict, list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=cfg.timeout) as http:
        served = (await http.get(f"{url}/v1/models")).json()[0]
    images = sample_images()
    await run_level(url, 1, images, cfg.warmup, cfg.seconds, cfg.beam, cfg.timeout)  # warm-up
    levels = [
        await run_level(url, c, images, cfg.requests, cfg.seconds, cfg.beam, cfg.timeout)
        for c in cfg.levels
    ]
    return served, levels


def bench_serve(cfg: LoadConfig) -> dict:
    """Run every level against ``cfg.url`` or a server started here; returns the report."""
    if cfg.url:
        served, levels = asyncio.run(_run_all(cfg.url.rstrip("/"), cfg))
        target = cfg.url
    else:
        with local_server(cfg.model, cfg.server_args, cfg.startup_timeout) as url:
            served, levels = asyncio.run(_run_all(url, cfg))
        target = "local"
    base = levels[0]["requests_per_s"] if levels[0]["clients"] == 1 else None
    top = levels[-1]
    return {
        "model": served.get("name"),
        "runtime": served.get("runtime"),
        "precision": served.get("precision"),
        "server": target,
        "beam": cfg.beam or served.get("decode_defaults", {}).get("beam_size"),
        "cpus": os.cpu_count(),
        "levels": levels,
        "speedup_top_vs_1": round(top["requests_per_s"] / base, 2) if base else None,
    }


def format_report(rep: dict) -> str:
    """``bench_serve``'s report as a table, one line per concurrency level."""
    lines = [
        f"{rep['model']} on {rep['runtime']} ({rep['precision']}), beam {rep['beam']}",
        f"{'clients':>7s} {'ok':>5s} {'errors':>6s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'batch':>6s}",
    ]
    for lv in rep["levels"]:
        lines.append(
            f"{lv['clients']:7d} {lv['ok']:5d} {lv['errors']:6d} {lv['requests_per_s']:7.2f} "
            f"{lv['p50_ms']:8.1f} {lv['p99_ms']:8.1f} {lv['mean_batch'] or 0:6.2f}"
        )
    if rep["speedup_top_vs_1"] is not None:
        lines.append(
            f"throughput at {rep['levels'][-1]['clients']} clients: "
            f"{rep['speedup_top_vs_1']}x one client"
        )
    return "\n".join(lines)
