"""``caption``: caption image files and folders with a bundle, in this process or in workers."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from captioning.cli.args import (
    CommandParsers,
    add_decoding,
    add_device,
    add_model,
    add_precision,
    add_runtime,
    decode_overrides,
    on_device,
    positive_int,
)


def labels_arg(text: str) -> int:
    """``--labels K``: an integer 1..MAX_LABELS."""
    from captioning.inference.labels import MAX_LABELS

    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 1 <= k <= MAX_LABELS:
        raise argparse.ArgumentTypeError(f"must be an integer 1..{MAX_LABELS}, got {text!r}")
    return k


def cmd_caption(args: argparse.Namespace) -> int:
    from captioning.bundle.reports import default_model
    from captioning.data.images import iter_image_files

    precision, runtime = on_device(args)
    args.model = args.model or default_model()
    overrides = decode_overrides(args)
    if not args.json:  # text and CSV print the best caption only: a pool of one ends sooner
        overrides["n_best"] = 1
    files = iter_image_files(args.images)
    if not files:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    procs = _caption_procs(args, len(files))
    if procs > 1:
        name, stream = _worker_stream(args, files, procs, precision, runtime, overrides)
    else:
        from captioning.inference.captioner import Captioner, dedicate_cores

        cap = Captioner.load(args.model, precision, runtime=runtime)
        dedicate_cores(cap)  # this process runs only it
        cfg = cap.decode_config(args.beam, **overrides)  # a bad setting fails before any image
        cap.prefix_ids(args.prefix, cfg)  # so does a word outside the vocabulary
        # the pipelined path: threads decode the next batches while this one is captioned
        stream = cap.caption_stream(
            files, args.beam, batch_size=args.batch_size, prefix=args.prefix, **overrides
        )
        name = cap.name
    skipped = _print_captions(args, stream, len(files), name)
    if skipped:
        print(f"{skipped} of {len(files)} files skipped", file=sys.stderr)
    return 1 if skipped else 0


def _worker_stream(args, files: list[Path], procs: int, precision, runtime: str, overrides: dict):
    """(bundle name, (path, result) stream) from ``procs`` worker processes, each loading the
    bundle; this process only checks it."""
    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.format import bundle_decoding, read_config
    from captioning.core.machine import usable_cpus
    from captioning.data.vocab import Vocabulary
    from captioning.inference.captioner import prefix_word_ids
    from captioning.serving.procs import WorkerSpec, caption_parallel

    path = resolve_bundle(args.model)
    cfg = bundle_decoding(read_config(path), args.beam, **overrides)  # a bad setting fails here
    prefix_word_ids(Vocabulary.load(path / "vocab.json"), path.name, args.prefix, cfg)
    if args.prefix:  # the workers' caption_stream takes it with the decoding
        overrides = {**overrides, "prefix": args.prefix}
    threads = max(1, usable_cpus() // procs)
    spec = WorkerSpec(str(path), precision, runtime, threads, args.beam, args.batch_size, overrides)
    return path.name, caption_parallel(spec, files, procs)


def _print_captions(args: argparse.Namespace, stream: Iterable, total: int, name: str) -> int:
    """Print each (path, result) as text, JSON or CSV; the number of unreadable files."""
    from tqdm.auto import tqdm

    from captioning.data.images import ImageLoadError

    labeller = _labeller(args)
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(
            ["image", "caption", "logprob", "confidence", *(["labels"] * bool(labeller))]
        )
    skipped = 0
    bar = tqdm(stream, total=total, unit="img", desc=f"caption {name}", disable=total < 2)
    for path, res in bar:
        if isinstance(res, ImageLoadError):
            tqdm.write(f"skipped: {res}", file=sys.stderr)
            skipped += 1
            continue
        labels = labeller(path) if labeller else None
        if args.json:
            rec = {
                "image": str(path),
                "caption": res.text,
                "logprob": round(res.score, 4),
                "confidence": round(res.confidence, 4),
                "nbest": [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest],
                "encode_ms": round(res.timings["encode_ms"], 1),
                "decode_ms": round(res.timings["decode_ms"], 1),
            }
            if labels is not None:
                rec["labels"] = labels.to_dict()
            print(json.dumps(rec))
        elif writer:
            extra = [_labels_text(labels)] if labels is not None else []
            writer.writerow(
                [str(path), res.text, f"{res.score:.4f}", f"{res.confidence:.4f}", *extra]
            )
        else:
            tqdm.write(f"{path}: {res.text}", file=sys.stdout)  # above the progress bar
            if labels is not None:
                tqdm.write(f"  {labels.source}: {_labels_text(labels)}", file=sys.stdout)
    return skipped


def _labeller(args: argparse.Namespace):
    """``path -> ClassifierLabels`` for ``--labels K`` (None without it): the bundle's encoder's
    own ImageNet opinion, computed in this process."""
    if not args.labels:
        return None
    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.format import read_config
    from captioning.inference.labels import bundle_encoders, classifier_labels

    encoders = bundle_encoders(resolve_bundle(args.model), read_config(resolve_bundle(args.model)))
    return lambda path: classifier_labels(encoders, path, args.labels)


def _labels_text(labels) -> str:
    """``Egyptian cat 0.76; tiger cat 0.15`` or why there are no labels."""
    if labels.unavailable:
        return labels.unavailable
    return "; ".join(f"{name} {p:.2f}" for name, p in labels.top)


def _caption_procs(args: argparse.Namespace, n_images: int) -> int:
    """``--procs``, or the plan for ``n_images`` on this machine (1 on a GPU)."""
    from captioning.core.machine import resolve_device, usable_cpus
    from captioning.serving.procs import available_memory, plan_procs

    if resolve_device(args.device) != "cpu":
        return 1
    if args.procs is not None:
        return args.procs
    return plan_procs(n_images, usable_cpus(), available_memory())


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command("caption", cmd_caption, "Caption images with a model bundle.")
    p.add_argument("images", nargs="+", help="image files or folders")
    add_model(p, default_help="the best single model on dev")
    add_decoding(p)
    p.add_argument(
        "--prefix",
        default=None,
        help='words every caption starts with, e.g. "a cat"; beam search continues from them '
        "(a word outside the bundle's vocabulary is refused by name)",
    )
    p.add_argument(
        "--labels",
        type=labels_arg,
        default=0,
        metavar="K",
        help="also print the encoder's own top-K ImageNet labels, a second opinion from its "
        "classifier (ResNet50 has one; VGG16's weights carry no classifier head)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image")
    fmt.add_argument(
        "--csv", action="store_true", help="CSV with image,caption,logprob,confidence[,labels]"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per model call (default: 16)"
    )
    p.add_argument(
        "--procs",
        type=positive_int,
        default=None,
        help="worker processes, each loading the bundle with its share of the cores (default: "
        "one per core and per 128 images, within the available memory; 1 = this process)",
    )
    add_precision(p)
    add_runtime(p)
    add_device(p)
