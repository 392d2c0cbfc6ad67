"""Scaling out: ``batch`` (Ray Data into Parquet), ``serve`` (HTTP API) and ``bench-serve``."""

from __future__ import annotations

import argparse
import json

from captioning.cli.args import (
    CommandParsers,
    add_decoding,
    add_device,
    add_model,
    add_precision,
    add_runtime,
    beam_arg,
    config_from,
    decode_overrides,
    nonneg_float,
    positive_int,
)


def cmd_batch(args: argparse.Namespace) -> int:
    from captioning.serving.ray_batch import BatchConfig, run_batch

    if args.runtime == "torch" and "int8" in args.precision:  # before any actor starts
        raise ValueError("int8 runs on OpenVINO; use --runtime openvino (or auto)")
    cfg = config_from(BatchConfig, args, overrides=decode_overrides(args))
    report = run_batch(cfg)
    print(json.dumps(report.to_dict()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from captioning.serving.app import ServeConfig, serve

    serve(config_from(ServeConfig, args))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from captioning.bundle.reports import default_model
    from captioning.serving.loadtest import LoadConfig, bench_serve, format_report

    extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cfg = LoadConfig(
        model=args.model or default_model(),
        url=args.url,
        levels=tuple(args.clients),
        requests=args.requests,
        seconds=args.seconds,
        beam=args.beam,
        server_args=[*extra, "--precision", args.precision, "--runtime", args.runtime],
    )
    report = bench_serve(cfg)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def add_parsers(commands: CommandParsers) -> None:
    _add_batch(
        commands.command(
            "batch",
            cmd_batch,
            "Caption every image of INPUT (a folder, a text file of paths, or a Parquet/CSV file "
            "with a 'path' column) into Parquet shards in --out, one row per image; unreadable "
            "files get a row with the error. Re-running skips the paths already in --out.",
        )
    )
    _add_serve(
        commands.command(
            "serve",
            cmd_serve,
            "Serve a bundle over HTTP (FastAPI on uvicorn). Concurrent requests are micro-batched.",
        )
    )
    _add_bench_serve(
        commands.command(
            "bench-serve",
            cmd_bench_serve,
            "Start `serve` on a free loopback port (or use --url) and post the sample photos "
            "from 1, 8 and 32 concurrent clients, bounded by --requests and --seconds per level.",
        )
    )


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="folder, text file of paths, or .parquet/.csv with 'path'")
    add_model(p)
    p.add_argument("--out", required=True, help="folder for the Parquet shards")
    p.add_argument(
        "--address",
        help="Ray cluster: HOST:PORT of its head, auto, or ray://HOST:10001 (default: a local "
        "Ray on this machine's cores)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        help="captioning actors (default: one per cluster CPU, memory permitting)",
    )
    add_decoding(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call")
    add_precision(p)
    add_runtime(p)
    add_device(p)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's log lines, warnings and Ray Data's progress bars, and keep a local "
        "Ray's logs in its temp dir (default: one progress bar, Ray's errors, the summary)",
    )


def _add_serve(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=positive_int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="(default: 16)")
    p.add_argument(
        "--max-wait-ms", type=nonneg_float, default=5.0, help="batching window (default: 5)"
    )
    p.add_argument(
        "--max-body-mb", type=nonneg_float, default=20.0, help="request-size limit (default: 20)"
    )
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued requests before 503")
    p.add_argument("--root-path", default="", help="path prefix behind a reverse proxy")
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    add_precision(p)
    add_runtime(p)


def _add_bench_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="bundle to serve (default: the best single model on dev, as for `caption`)",
    )
    p.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--clients", type=positive_int, nargs="+", default=[1, 8, 32], help="(default: 1 8 32)"
    )
    p.add_argument("--requests", type=positive_int, default=96, help="per level (default: 96)")
    p.add_argument("--seconds", type=nonneg_float, default=60.0, help="per level (default: 60)")
    p.add_argument("--beam", type=beam_arg, default=None, help="(default: the bundle's)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="server's (default: 16)")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0, help="server's (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_precision(p)
    add_runtime(p)
