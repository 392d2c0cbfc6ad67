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
    register_precision_cli(sub)


def precision_report(encoder: str, images: list[Image.Image], batch: int = 32) -> dict:
    """fp32 (reference) against bf16 + channels_last on the same images: feature drift, speed."""
    from captioning.encoders import build_encoder, preprocess

    x = torch.stack([preprocess(im) for im in images])  # [N, 3, 224, 224]
    out: dict = {
        "encoder": encoder,
        "images": len(images),
        "batch": batch,
        "threads": torch.get_num_threads(),
    }
    feats = {}
    for prec in ("fp32", "bf16"):
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


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from captioning.data import load_flickr8k
    from captioning.images import load_image

    ds = load_flickr8k(args.data)
    names = ds.splits["dev"][: args.n]
    res = precision_report(args.encoder, [load_image(ds.image_path(n)) for n in names])
    print(json.dumps(res))
    return 0


def register_precision_cli(sub) -> None:
    p = sub.add_parser(
        "bench-precision",
        help="fp32 vs bf16 encoder: feature drift and speed",
        description="Compare the bf16 + channels_last fast path with the fp32 "
        "reference on dev images: grid cosine, relative error, images/s.",
    )
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("--n", type=int, default=64, help="number of dev images")
    p.set_defaults(func=cmd_bench_precision)
