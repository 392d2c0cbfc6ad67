"""Speed on this machine: ``bench`` (a bundle) and ``bench-precision`` (fp32 vs bf16 encoder)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioning.cli.args import (
    RUNTIME_CHOICES,
    CommandParsers,
    add_data,
    add_encoder,
    add_model,
    add_precision,
    add_runtime,
    beam_arg,
    positive_int,
)


def setting_arg(text: str) -> str:
    """A bench setting, ``RUNTIME[-PRECISION]`` (``torch``, ``openvino-int8``, ``auto``)."""
    from captioning.core.machine import PRECISIONS

    runtime, _, precision = text.partition("-")
    if runtime not in RUNTIME_CHOICES or precision not in ("", *PRECISIONS):
        raise argparse.ArgumentTypeError(
            f"expected RUNTIME[-PRECISION] with RUNTIME one of {', '.join(RUNTIME_CHOICES)} and "
            f"PRECISION one of {', '.join(PRECISIONS)}, got {text!r}"
        )
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import resolve_bundle
    from captioning.inference.bench import bench, format_bench, save_bench

    if args.settings and (args.runtime, args.precision) != ("auto", "auto"):
        raise ValueError("--settings names runtimes and precisions; drop --runtime/--precision")
    res = bench(
        args.model,
        runtime=args.runtime,
        precision=args.precision,
        settings=args.settings or (),
        runs=args.runs,
        folder=Path(args.folder) if args.folder else None,
        folder_images=args.folder_images,
        folder_beam=args.folder_beam,
    )
    for note in res["skipped"] if args.json else ():  # the text report lists them
        print(f"skipped {note}", file=sys.stderr)
    for reason in res["noise"]:
        print(f"warning: noisy run, {reason}; compare ratios within this run", file=sys.stderr)
    if args.save:
        path = save_bench(resolve_bundle(args.model), res)
        print(f"wrote {path}" + (" (flagged noisy)" if res["noisy"] else ""), file=sys.stderr)
    print(json.dumps(res) if args.json else format_bench(res))
    return 0


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset
    from captioning.data.images import load_image
    from captioning.inference.bench import precision_report

    ds = load_dataset(args.data)
    names = ds.splits["dev"][: args.n]
    res = precision_report(args.encoder, [load_image(ds.image_path(n)) for n in names])
    print(json.dumps(res))
    return 0


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command("bench", cmd_bench, "Benchmark a bundle on this machine.")
    add_model(p)
    p.add_argument("--runs", type=positive_int, default=20, help="(default: 20)")
    p.add_argument("--folder", help="images for the throughput run (default: the samples)")
    p.add_argument(
        "--folder-images", type=positive_int, default=64, help="throughput images (default: 64)"
    )
    p.add_argument(
        "--folder-beam", type=beam_arg, default=None, help="throughput beam (default: the bundle's)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--save", action="store_true", help="write bench.json into the bundle")
    add_precision(p)
    add_runtime(p)
    p.add_argument(
        "--settings",
        nargs="+",
        type=setting_arg,
        metavar="SETTING",
        help="measure these side by side instead, each RUNTIME[-PRECISION], e.g. `torch "
        "openvino-int8`; a precision left out is auto (default: torch, openvino-fp32, "
        "openvino-bf16 and openvino-int8, or the one --runtime/--precision name)",
    )

    p = commands.command(
        "bench-precision",
        cmd_bench_precision,
        "Compare the bf16 + channels_last fast path with the fp32 reference on dev images: "
        "grid cosine, relative error, images/s.",
    )
    add_encoder(p)
    add_data(p)
    p.add_argument("--n", type=positive_int, default=64, help="number of dev images (default: 64)")
