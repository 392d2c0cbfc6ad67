"""Latency and throughput of a bundle on this machine: its runtimes and precisions in one run.

``bench(model)`` measures ``SIDE_BY_SIDE``: torch (the reference, at the given precision; auto =
bf16 + channels_last on CPUs with native bf16, else fp32) and OpenVINO at fp32, bf16 and int8,
each setting loaded once. The setting ``Captioner.load(model)`` picks with its defaults
(precision and runtime auto) is flagged ``auto``; a setting that cannot load (e.g. a precision
this installation lacks) is listed under ``skipped`` with the reason. An explicit runtime or
precision, or ``settings``, measures only what it names.

At beams 1, 3 and 5 each setting captions JPEG bytes at batch 1 (after a warm-up), the settings
alternating image by image so all see the same load. Each run is timed in stages: ``load_ms``
(bytes -> pixels), ``encode_ms`` (encoder), ``decode_ms`` (beam search) and ``total_ms``
(bytes -> caption); p50 and p90 of each. A yardstick (``Yardstick``: torchvision's ResNet50,
fp32, batch 1) runs in the same rounds; ``vs_yardstick`` is a setting's total p50 over the
yardstick's p50, its cost in units of a fixed workload on the same cores under the same load.
Then the pipelined folder path (``Captioner.caption_stream``) gives images/s per setting.
``ratios`` are speed-ups of each setting over torch (torch's time / its time; for throughput
its rate / torch's).

Each setting runs as ``caption`` and ``serve`` run it (``as_served``): an all-OpenVINO one with
torch at one thread, so torch's idle threads do not take the cores from OpenVINO's.

A run is flagged ``noisy`` when a total's (or the yardstick's) p90/p50 exceeds ``NOISY_P90_P50``
or the load average exceeds the thread count: other work was competing for the cores, so compare
the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning.bundle.latency import machine_label, setting_label
from captioning.core.files import atomic_write_json
from captioning.core.machine import (
    FIXED_PRECISIONS,
    cpu_description,
    torch_threads,
)
from captioning.core.paths import SAMPLES_DIR
from captioning.data.images import iter_image_files
from captioning.inference.bench_settings import Loaded, Setting, load_settings, plan
from captioning.inference.captioner import Captioner
from captioning.runtime.pixels import load_pixels

SAMPLES = SAMPLES_DIR
BENCH_FORMAT = "captioning-bench"
BENCH_VERSION = 3
BEAMS = (1, 3, 5)
STAGES = ("load_ms", "encode_ms", "decode_ms", "total_ms")
NOISY_P90_P50 = 1.5  # a total's p90 / p50 above this means the run was disturbed
YARDSTICK = "torchvision resnet50 fp32, batch 1"


# ---------------------------------------------------------------- timing


def sample_jpegs() -> list[bytes]:
    """The JPEG bytes of the shipped sample photos (or of noise pictures when there are none)."""
    files = sorted(SAMPLES.glob("*.jpg"))
    if files:
        return [f.read_bytes() for f in files]
    import io

    rng = np.random.default_rng(0)  # no samples: noise pictures still time the same work
    out = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def _pcts(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
    }


class Yardstick:
    """A fixed workload timed beside the captioners: torchvision's ResNet50 (random weights),
    fp32, one [1, 3, 224, 224] input, under ``torch.inference_mode``."""

    def __init__(self) -> None:
        from torchvision.models import resnet50

        self.model = resnet50(weights=None).eval()
        self.x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        self.times: list[float] = []

    def run(self) -> float:
        """One forward pass, in ms."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model(self.x)
        return (time.perf_counter() - t0) * 1000

    def summary(self) -> dict:
        """``{"model", "p50_ms", "p90_ms"}`` of the recorded runs."""
        p = _pcts(self.times)
        return {"model": YARDSTICK, "p50_ms": p["p50"], "p90_ms": p["p90"]}


def as_served(cap: Captioner) -> contextlib.AbstractContextManager:
    """Run ``cap`` as ``caption`` and ``serve`` do (``dedicate_cores``): an all-OpenVINO
    captioner with torch at one thread, any other with torch's threads."""
    return torch_threads(1) if cap.runtime == "openvino" else contextlib.nullcontext()


def _time_one(cap: Captioner, data: bytes, beam: int) -> dict[str, float]:
    """One bytes -> caption run, timed per stage (ms)."""
    with as_served(cap):
        t0 = time.perf_counter()
        pixels = load_pixels(data)[None]  # [1, 3, 224, 224]
        t1 = time.perf_counter()
        res = cap.caption_pixels(pixels, beam_size=beam)[0]
        t2 = time.perf_counter()
    return {
        "load_ms": (t1 - t0) * 1000,
        "encode_ms": res.timings["encode_ms"],
        "decode_ms": res.timings["decode_ms"],
        "total_ms": (t2 - t0) * 1000,
    }


def latency(
    caps: Sequence[Captioner],
    images: Sequence[bytes],
    beams: Sequence[int] = BEAMS,
    runs: int = 20,
    warmup: int = 3,
    yardstick: Yardstick | None = None,
) -> list[dict]:
    """Batch-1 p50/p90 per stage for each captioner and beam; the captioners (and the
    ``yardstick``, which records its own times) alternate."""
    out: list[dict] = [{} for _ in caps]
    n = len(caps) + (yardstick is not None)
    for beam in beams:
        times = [{s: [] for s in STAGES} for _ in caps]
        for i in range(warmup + runs):
            data = images[i % len(images)]
            for j in range(n) if i % 2 == 0 else reversed(range(n)):
                if j == len(caps):
                    ms = yardstick.run()
                    if i >= warmup:
                        yardstick.times.append(ms)
                    continue
                t = _time_one(caps[j], data, beam)
                if i >= warmup:
                    for s in STAGES:
                        times[j][s].append(t[s])
        for j in range(len(caps)):
            out[j][str(beam)] = {s: _pcts(times[j][s]) for s in STAGES}
    return out


def folder_throughput(
    cap: Captioner, files: Sequence, beam: int, batch_size: int = 16, workers: int | None = None
) -> dict:
    """images/s of the pipelined folder path (start-up and a warm-up batch excluded)."""
    with as_served(cap):
        for _ in cap.caption_stream(
            files[:batch_size], beam, batch_size=batch_size, workers=workers
        ):
            pass
        t0 = time.perf_counter()
        n = sum(1 for _ in cap.caption_stream(files, beam, batch_size=batch_size, workers=workers))
        secs = time.perf_counter() - t0
    return {"images": n, "seconds": round(secs, 2), "images_per_s": round(n / secs, 2)}


def folder_files(folder: Path | None, n: int) -> list:
    """``n`` images of ``folder`` (default: the sample photos, repeated up to ``n``)."""
    files = iter_image_files([folder]) if folder else sorted(SAMPLES.glob("*.jpg"))
    if not files:
        jpegs = sample_jpegs()
        return [jpegs[i % len(jpegs)] for i in range(n)]
    return [files[i % len(files)] for i in range(n)] if folder is None else files[:n]


# ---------------------------------------------------------------- figures


def _spread(what: str, p50: float, p90: float) -> str | None:
    if p50 > 0 and p90 / p50 > NOISY_P90_P50:
        return f"{what}: total p90/p50 = {p90 / p50:.2f} (> {NOISY_P90_P50})"
    return None


def noise(result: dict, threads: int, loads: Sequence[float]) -> list[str]:
    """Why a bench result should not be trusted as absolute figures (empty when quiet)."""
    spreads = [
        _spread(f"{name} beam {beam}", st["total_ms"]["p50"], st["total_ms"]["p90"])
        for name, r in result["runtimes"].items()
        for beam, st in r["beams"].items()
    ]
    if ys := result.get("yardstick"):
        spreads.append(_spread("yardstick", ys["p50_ms"], ys["p90_ms"]))
    reasons = [r for r in spreads if r]
    peak = max(loads) if loads else 0.0
    if peak > threads:
        reasons.append(f"load average {peak:.1f} > {threads} threads")
    return reasons


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(torch_r: dict, other: dict) -> dict:
    """Speed-ups of ``other`` over torch (>1: ``other`` is faster), per beam and stage."""
    out: dict = {}
    for beam, t in torch_r["beams"].items():
        o = other["beams"][beam]
        out[beam] = {s: _ratio(t[s]["p50"], o[s]["p50"]) for s in STAGES}
    out["throughput"] = _ratio(other["folder"]["images_per_s"], torch_r["folder"]["images_per_s"])
    return out


def vs_yardstick(beams: dict, yardstick_p50: float) -> dict:
    """beam -> total p50 / yardstick p50 (below 1: a caption costs less than the yardstick)."""
    return {beam: _ratio(st["total_ms"]["p50"], yardstick_p50) for beam, st in beams.items()}


def _entry(x: Loaded, beams: dict, folder: dict, yardstick_p50: float) -> dict:
    return {
        "setting": x.label,
        "runtime": x.cap.runtime,
        "precision": x.cap.precision_label,
        "encoder": x.cap.encoder_label,
        "auto": x.auto,
        "beams": beams,
        "folder": folder,
        "vs_yardstick": vs_yardstick(beams, yardstick_p50),
    }


def _speedups(per: dict) -> dict | None:
    """Each setting's ``ratios`` over the first torch setting (None without one or alone)."""
    base = next((k for k in per if k.startswith("torch ")), None)
    if base is None or len(per) < 2:
        return None
    return {k: ratios(per[base], r) for k, r in per.items() if k != base}


def bench(
    model: str | Path,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    settings: Sequence[str | Setting] = (),
    beams: Sequence[int] = BEAMS,
    runs: int = 20,
    warmup: int = 3,
    folder: Path | None = None,
    folder_images: int = 64,
    folder_beam: int | None = None,
    batch_size: int = 16,
) -> dict:
    """Benchmark one bundle: with runtime and precision auto and no ``settings``, torch and
    OpenVINO fp32/bf16/int8 side by side; otherwise the one setting (or ``settings``) asked.
    The top level repeats the setting ``auto`` picks (else the first measured)."""
    loads = [os.getloadavg()[0]]
    wanted, side_by_side = plan(runtime, precision, settings)
    loaded, skipped = load_settings(model, wanted, side_by_side)
    caps = [x.cap for x in loaded]
    yardstick = Yardstick()
    lat = latency(caps, sample_jpegs(), beams, runs, warmup, yardstick)
    ys = yardstick.summary()
    files = folder_files(folder, folder_images)
    head_x = next((x for x in loaded if x.auto), loaded[0])
    folder_beam = folder_beam or head_x.cap.defaults.beam_size
    per = {}
    for x, beams_r in zip(loaded, lat, strict=True):
        rate = folder_throughput(x.cap, files, folder_beam, batch_size)
        per[x.label] = _entry(x, beams_r, rate, ys["p50_ms"])
    loads.append(os.getloadavg()[0])
    head = per[head_x.label]
    threads = torch.get_num_threads()
    out = {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "model": caps[0].name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_description(),  # bench figures are comparable only on the same CPU
        "threads": threads,
        "runs": runs,
        "images": "artifacts/samples JPEG bytes" if SAMPLES.is_dir() else "noise JPEGs",
        "folder": str(folder) if folder else "artifacts/samples, repeated",
        # the setting `auto` picks, in the layout readers of version 1 know
        "runtime": head["runtime"],
        "precision": head["precision"],
        "beams": head["beams"],
        "batch_size": batch_size,
        "throughput_img_s": head["folder"]["images_per_s"],
        "throughput_beam": folder_beam,
        "yardstick": ys,
        "runtimes": per,
        "skipped": skipped,
        "ratios": _speedups(per),
        "loadavg": [round(x, 2) for x in loads],
    }
    reasons = noise(out, threads, loads)
    out["noisy"] = bool(reasons)
    out["noise"] = reasons
    return out


def save_bench(bundle: Path, result: dict) -> Path:
    """Write ``bench.json`` into the bundle (``captioning.bundle.latency.read_bench`` reads it)."""
    path = Path(bundle) / "bench.json"
    atomic_write_json(path, result)
    return path


# ---------------------------------------------------------------- text


def _names(res: dict) -> dict[str, str]:
    """Each setting's row name: what ran, e.g. "openvino bf16 (auto)"."""
    return {k: setting_label(k, r) for k, r in res["runtimes"].items()}


def _table(res: dict) -> list[str]:
    """A row per setting and beam: p50/p90 of each stage and the ratio to the yardstick."""
    names = _names(res)
    w = max(len("setting"), *map(len, names.values()))
    head = f"{'setting':{w}s} {'beam':>4s} " + " ".join(
        f"{s.removesuffix('_ms') + ' p50':>11s} {'p90':>6s}" for s in STAGES
    )
    lines = [head + f" {'x yardstick':>11s}"]
    for k, r in res["runtimes"].items():
        for beam, st in r["beams"].items():
            cells = " ".join(f"{st[s]['p50']:11.1f} {st[s]['p90']:6.1f}" for s in STAGES)
            vs = (r.get("vs_yardstick") or {}).get(beam)
            lines.append(f"{names[k]:{w}s} {beam:>4s} {cells} {'-' if vs is None else vs:>11}")
    return lines


def format_bench(res: dict) -> str:
    """A plain-text report of a ``bench`` result: the CPU, a row per setting and beam (the one
    ``auto`` picks marked), the yardstick, folder rates, skipped settings and speed-ups."""
    lines = [
        f"{res['model']} on {machine_label(res)}, {res['threads']} threads, {res['runs']} runs "
        "after warm-up (ms per image, batch 1, bytes -> caption)",
        *_table(res),
    ]
    if ys := res.get("yardstick"):
        lines.append(
            f"yardstick ({ys['model']}): p50 {ys['p50_ms']:.1f} ms, p90 {ys['p90_ms']:.1f} ms; "
            "x yardstick = total p50 / yardstick p50"
        )
    names = _names(res)
    for k, r in res["runtimes"].items():
        f = r["folder"]
        lines.append(
            f"folder, {names[k]}: {f['images_per_s']} images/s ({f['images']} images, beam "
            f"{res['throughput_beam']}, batch {res['batch_size']})"
        )
    lines += [f"skipped {note}" for note in res.get("skipped", [])]
    for k, q in (res.get("ratios") or {}).items():
        beams = {b: by for b, by in q.items() if b != "throughput"}
        totals = ", ".join(f"{by['total_ms']}x at beam {b}" for b, by in beams.items())
        folder = q["throughput"]
        lines.append(f"speed-up over torch of {names[k]}: total {totals}; folder {folder}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- encoder precision


def precision_report(encoder: str, images: list[Image.Image], batch: int = 32) -> dict:
    """fp32 (reference) against bf16 + channels_last on the same images: feature drift, speed."""
    from captioning.models.encoders import build_encoder, preprocess

    x = torch.stack([preprocess(im) for im in images])  # [N, 3, 224, 224]
    out: dict = {
        "encoder": encoder,
        "images": len(images),
        "batch": batch,
        "threads": torch.get_num_threads(),
    }
    feats = {}
    for prec in FIXED_PRECISIONS:
        enc = build_encoder(encoder, prec)
        enc.encode(x[:2])  # warm-up
        t0 = time.perf_counter()
        grids = [enc.encode(x[i : i + batch]).grid for i in range(0, len(x), batch)]
        secs = time.perf_counter() - t0
        feats[prec] = torch.cat(grids)  # [N, L, C]
        out[f"{prec}_images_per_s"] = round(len(x) / secs, 2)
    ref, fast = feats["fp32"].flatten(1), feats["bf16"].flatten(1)
    cos = torch.nn.functional.cosine_similarity(ref, fast, dim=1)
    rel = (fast - ref).norm(dim=1) / ref.norm(dim=1)
    out.update(
        grid_cosine_min=round(float(cos.min()), 5),
        grid_cosine_mean=round(float(cos.mean()), 5),
        grid_rel_error_mean=round(float(rel.mean()), 5),
        speedup=round(out["bf16_images_per_s"] / out["fp32_images_per_s"], 2),
    )
    return out
