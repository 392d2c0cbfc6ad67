"""Latency and throughput of a bundle on this machine, torch against OpenVINO in one run.

``bench(model)`` loads the bundle once per runtime and, at beams 1, 3 and 5, captions JPEG bytes
at batch 1 (after a warm-up), alternating the runtimes image by image so both see the same load.
Each run is timed in stages: ``load_ms`` (bytes -> pixels), ``encode_ms`` (encoder),
``decode_ms`` (beam search) and ``total_ms`` (bytes -> caption); p50 and p90 of each. Then the
pipelined folder path (``Captioner.caption_stream``) gives images/s. ``ratios`` are speed-ups
of OpenVINO over torch (torch time / OpenVINO time; for throughput OpenVINO / torch).

A run is flagged ``noisy`` when a total's p90/p50 exceeds ``NOISY_P90_P50`` or the load average
exceeds the thread count: other work was competing for the cores, so compare the ratios of one
run, not absolute figures across runs.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning.core.files import atomic_write_json
from captioning.core.machine import FIXED_PRECISIONS, cpu_description
from captioning.core.paths import SAMPLES_DIR
from captioning.data.images import iter_image_files
from captioning.inference.captioner import Captioner
from captioning.runtime.pixels import load_pixels

SAMPLES = SAMPLES_DIR
BENCH_FORMAT = "captioning-bench"
BENCH_VERSION = 2
BEAMS = (1, 3, 5)
STAGES = ("load_ms", "encode_ms", "decode_ms", "total_ms")
NOISY_P90_P50 = 1.5  # a total's p90 / p50 above this means the run was disturbed


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


def _time_one(cap: Captioner, data: bytes, beam: int) -> dict[str, float]:
    """One bytes -> caption run, timed per stage (ms)."""
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
) -> list[dict]:
    """Batch-1 p50/p90 per stage for each captioner and beam; the captioners alternate."""
    out: list[dict] = [{} for _ in caps]
    for beam in beams:
        times = [{s: [] for s in STAGES} for _ in caps]
        for i in range(warmup + runs):
            data = images[i % len(images)]
            order = range(len(caps)) if i % 2 == 0 else reversed(range(len(caps)))
            for j in order:
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
    for _ in cap.caption_stream(files[:batch_size], beam, batch_size=batch_size, workers=workers):
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


def noise(result: dict, threads: int, loads: Sequence[float]) -> list[str]:
    """Why a bench result should not be trusted as absolute figures (empty when quiet)."""
    reasons = []
    for rt, r in result["runtimes"].items():
        for beam, stages in r["beams"].items():
            tot = stages["total_ms"]
            if tot["p50"] > 0 and tot["p90"] / tot["p50"] > NOISY_P90_P50:
                reasons.append(
                    f"{rt} beam {beam}: total p90/p50 = {tot['p90'] / tot['p50']:.2f} "
                    f"(> {NOISY_P90_P50})"
                )
    peak = max(loads) if loads else 0.0
    if peak > threads:
        reasons.append(f"load average {peak:.1f} > {threads} threads")
    return reasons


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(torch_r: dict, ov_r: dict) -> dict:
    """Speed-ups of OpenVINO over torch (>1: OpenVINO is faster)."""
    out: dict = {}
    for beam, t in torch_r["beams"].items():
        o = ov_r["beams"][beam]
        out[beam] = {s: _ratio(t[s]["p50"], o[s]["p50"]) for s in STAGES}
    out["throughput"] = _ratio(ov_r["folder"]["images_per_s"], torch_r["folder"]["images_per_s"])
    return out


def bench(
    model: str | Path,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    beams: Sequence[int] = BEAMS,
    runs: int = 20,
    warmup: int = 3,
    folder: Path | None = None,
    folder_images: int = 64,
    folder_beam: int | None = None,
    batch_size: int = 16,
) -> dict:
    """Benchmark one bundle. ``runtime="auto"`` compares torch with OpenVINO (when installed)
    and reports the runtime ``auto`` picks at the top level; torch/openvino measure only that."""
    from captioning.runtime.openvino import resolve_runtime

    loads = [os.getloadavg()[0]]
    chosen = resolve_runtime(runtime)
    names = ["torch", "openvino"] if runtime == "auto" and chosen == "openvino" else [chosen]
    caps = [Captioner.load(model, precision, runtime=rt) for rt in names]
    images = sample_jpegs()
    lat = latency(caps, images, beams, runs, warmup)
    files = folder_files(folder, folder_images)
    folder_beam = folder_beam or caps[-1].defaults.beam_size
    per_rt = {}
    for cap, beams_r in zip(caps, lat, strict=True):
        per_rt[cap.runtime] = {
            "runtime": cap.runtime,
            "precision": cap.encoder_label,
            "beams": beams_r,
            "folder": folder_throughput(cap, files, folder_beam, batch_size),
        }
    loads.append(os.getloadavg()[0])
    head = per_rt[caps[-1].runtime]  # the runtime `auto` picks comes last
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
        # the headline runtime, in the layout readers of version 1 know
        "runtime": head["runtime"],
        "precision": head["precision"],
        "beams": head["beams"],
        "batch_size": batch_size,
        "throughput_img_s": head["folder"]["images_per_s"],
        "throughput_beam": folder_beam,
        "runtimes": per_rt,
        "ratios": ratios(per_rt["torch"], per_rt["openvino"])
        if {"torch", "openvino"} <= set(per_rt)
        else None,
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


def format_bench(res: dict) -> str:
    """A plain-text table of a ``bench`` result."""
    lines = [
        f"{res['model']}  {res['threads']} threads, {res['runs']} runs after warm-up "
        "(ms per image, batch 1, bytes -> caption)"
    ]
    head = f"{'runtime':16s} {'beam':>4s} " + " ".join(
        f"{s.removesuffix('_ms') + ' p50':>11s} {'p90':>6s}" for s in STAGES
    )
    lines.append(head)
    for rt, r in res["runtimes"].items():
        for beam, st in r["beams"].items():
            cells = " ".join(f"{st[s]['p50']:11.1f} {st[s]['p90']:6.1f}" for s in STAGES)
            lines.append(f"{rt + ' ' + r['precision']:16s} {beam:>4s} {cells}")
    for rt, r in res["runtimes"].items():
        f = r["folder"]
        lines.append(
            f"folder, {rt}: {f['images_per_s']} images/s ({f['images']} images, beam "
            f"{res['throughput_beam']}, batch {res['batch_size']})"
        )
    if res.get("ratios"):
        for beam, q in res["ratios"].items():
            if beam == "throughput":
                lines.append(f"openvino / torch throughput: {q}x")
            else:
                parts = ", ".join(f"{s.removesuffix('_ms')} {v}x" for s, v in q.items())
                lines.append(f"speed-up of openvino at beam {beam}: {parts}")
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
