"""``python -m captioning bench``: latency and throughput of a bundle on this machine.

Per-image latency at batch 1 for beams 1, 3 and 5 (p50/p90 of encode, decode and total, after a
warm-up), and batch throughput in images/s. Everything runs under ``torch.inference_mode`` with
the captioner loaded once, so the encoder forward pass is the floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning.bundle import Captioner
from captioning.fileio import atomic_write_json

SAMPLES = Path(__file__).resolve().parent.parent / "artifacts" / "samples"


def _images() -> list[Image.Image]:
    files = sorted(SAMPLES.glob("*.jpg"))
    if files:
        return [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(0)  # no samples: noise pictures still time the same work
    return [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(4)]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def bench(
    cap: Captioner, beams=(1, 3, 5), runs: int = 20, warmup: int = 3, batch: int = 16
) -> dict:
    imgs = _images()
    out: dict = {
        "model": cap.name,
        "precision": cap.encoder.precision.label,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "runs": runs,
        "beams": {},
    }
    for beam in beams:
        for i in range(warmup):
            cap.caption(imgs[i % len(imgs)], beam_size=beam)
        enc, dec, tot = [], [], []
        for i in range(runs):
            t0 = time.perf_counter()
            res = cap.caption(imgs[i % len(imgs)], beam_size=beam)
            tot.append((time.perf_counter() - t0) * 1000)
            enc.append(res.timings["encode_ms"])
            dec.append(res.timings["decode_ms"])
        out["beams"][str(beam)] = {
            name: {"p50": round(_pct(xs, 50), 1), "p90": round(_pct(xs, 90), 1)}
            for name, xs in (("encode_ms", enc), ("decode_ms", dec), ("total_ms", tot))
        }
    batch_imgs = [imgs[i % len(imgs)] for i in range(batch)]
    cap.caption_batch(batch_imgs[:2])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        cap.caption_batch(batch_imgs)
        times.append(time.perf_counter() - t0)
    out["batch_size"] = batch
    out["throughput_img_s"] = round(batch / statistics.median(times), 2)
    out["throughput_beam"] = cap.defaults.beam_size
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    cap = Captioner.load(args.model, args.precision)
    res = bench(cap, runs=args.runs)
    if args.save:
        atomic_write_json(cap.path / "bench.json", res)
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{cap.name}  precision {res['precision']}, {res['threads']} threads, "
        f"{res['runs']} runs after warm-up (ms per image, batch 1)"
    )
    print(
        f"{'beam':>4s} {'encode p50':>11s} {'p90':>6s} {'decode p50':>11s} {'p90':>6s} "
        f"{'total p50':>10s} {'p90':>6s}"
    )
    for beam, r in res["beams"].items():
        print(
            f"{beam:>4s} {r['encode_ms']['p50']:11.1f} {r['encode_ms']['p90']:6.1f} "
            f"{r['decode_ms']['p50']:11.1f} {r['decode_ms']['p90']:6.1f} "
            f"{r['total_ms']['p50']:10.1f} {r['total_ms']['p90']:6.1f}"
        )
    print(
        f"throughput: {res['throughput_img_s']} images/s (batch {res['batch_size']}, "
        f"beam {res['throughput_beam']})"
    )
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency (p50/p90) and throughput of a bundle",
        description="Benchmark a bundle on this machine.",
    )
    p.add_argument("--model", required=True, help="bundle name or path")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", action="store_true", help="write bench.json into the bundle")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.set_defaults(func=cmd_bench)
