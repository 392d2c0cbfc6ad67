"""Scoring a bundle: ``evaluate`` and ``tune-decoding``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from captioning.cli.args import (
    CALIBRATE_CHOICES,
    TUNE_METRIC_CHOICES,
    CommandParsers,
    add_cache,
    add_data,
    add_decoding,
    add_device,
    add_model,
    add_precision,
    add_runtime,
    beam_arg,
    cache_root,
    decode_overrides,
    nonneg_float,
    nonneg_int,
    on_device,
    positive_int,
)

EVAL_OUT = Path("runs") / "eval"  # plain `evaluate` writes here (git-ignored), never a bundle


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.evaluate import evaluate, save_evaluation
    from captioning.models.metrics import format_table

    precision, runtime = on_device(args)
    ds = load_dataset(args.data)  # a data error before the model loads
    cap = Captioner.load(args.model, precision, runtime=runtime)
    t0 = time.perf_counter()
    ev = evaluate(
        cap,
        ds,
        args.split,
        args.beam,
        limit=args.limit,
        cache_root=cache_root(args),
        meteor=args.meteor,
        **decode_overrides(args),
    )
    target = cap.path if args.record else Path(args.out) if args.out else EVAL_OUT / cap.name
    print(format_table({f"{cap.name} {ev.setting.label}": ev.metrics}))
    if ev.metrics.get("meteor_error"):
        print(f"METEOR unavailable: {ev.metrics['meteor_error']}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    for line in save_evaluation(ev, target):
        print(line)
    if not args.record:
        print(f"(the bundle {cap.name} is unchanged; --record writes the result into it)")
    if args.json:
        print(json.dumps(ev.summary))
    return 0


def cmd_tune_decoding(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.tune import tune_decoding
    from captioning.models.metrics import HEADLINE_KEYS, METRIC_LABELS

    ds = load_dataset(args.data)  # a data error before the model loads
    cap = Captioner.load(args.model, args.precision, runtime=args.runtime)
    best, rows = tune_decoding(
        cap,
        ds,
        beams=args.beams,
        alphas=args.alphas,
        cache_root=cache_root(args),
        ngrams=args.no_repeat_ngrams,
        metric=args.metric,
    )
    head = " ".join(f"{METRIC_LABELS[k]:>14s}" for k in HEADLINE_KEYS)
    print(f"{'beam':>4s} {'alpha':>5s} {'ngram':>5s} {head} (dev)")
    for r in rows:
        mark = f"  <- best {args.metric}" if r is best else ""
        vals = (r[k] for k in HEADLINE_KEYS)
        print(
            f"{r['beam']:4d} {r['length_alpha']:5.1f} {r['no_repeat_ngram']:5d} "
            + " ".join(f"{v:14.2f}" for v in vals)
            + mark
        )
    if args.apply:
        _apply_decoding(cap, best, args.metric)
    print(json.dumps({"best": best, "grid": rows}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import os

    from captioning.core.settings import DATA_ENV
    from captioning.data import load_dataset
    from captioning.inference.calibrate import calibrate, format_verdicts

    ds = load_dataset(args.data)
    if args.data:  # int8 calibrates on the recorded train photos of this data set
        os.environ[DATA_ENV] = str(args.data)
    rows = calibrate(args.model, ds, args.precisions, cache_root=cache_root(args), force=args.force)
    print(format_verdicts(args.model, rows))
    if args.json:
        print(json.dumps([{**vars(v), "admissible": v.admissible} for v in rows]))
    return 0


def _apply_decoding(cap, best: dict, metric: str) -> None:
    """Store the chosen decoding as the bundle's default and rewrite its card."""
    from captioning.bundle.card import write_card
    from captioning.bundle.records import set_decode_defaults
    from captioning.models.metrics import METRIC_LABELS

    chosen = {k: best[k] for k in ("length_alpha", "no_repeat_ngram")}
    set_decode_defaults(cap.path, f"dev {METRIC_LABELS[metric]}", beam_size=best["beam"], **chosen)
    card = write_card(cap.path)
    print(
        f"{cap.name}: default decoding is now beam {best['beam']}, alpha "
        f"{best['length_alpha']}, no_repeat_ngram {best['no_repeat_ngram']} "
        f"(wrote {cap.path / 'config.json'}, {card})"
    )


def add_parsers(commands: CommandParsers) -> None:
    _add_evaluate(
        commands.command(
            "evaluate",
            cmd_evaluate,
            "Corpus BLEU-1..4, CIDEr-D, METEOR and ROUGE-L of a bundle on a Flickr8k split. "
            f"Writes predictions and metrics.json to --out (default: {EVAL_OUT}/MODEL); --record "
            "writes them into the bundle instead, under the full decoding setting.",
        )
    )
    _add_calibrate(
        commands.command(
            "calibrate",
            cmd_calibrate,
            "The quality gate of the faster precisions: evaluate the fp32 torch reference and "
            "each OpenVINO precision on the full dev split at the bundle's default decoding, "
            "record them in the bundle, and say which are admissible (CIDEr-D within 0.5 and "
            "BLEU-4 within 0.3 of the reference, no repeated trigram). --precision auto runs "
            "at the fastest admissible one.",
        )
    )
    _add_tune_decoding(
        commands.command(
            "tune-decoding",
            cmd_tune_decoding,
            "Evaluate every beam x length normalisation x no_repeat_ngram on the dev split and "
            "pick the best by --metric (never looks at test).",
        )
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_data(p)
    p.add_argument("--split", choices=("dev", "test"), default="dev", help="(default: dev)")
    add_decoding(p)
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help=f"output directory (default: {EVAL_OUT}/MODEL)")
    where.add_argument(
        "--record",
        action="store_true",
        help="record into the bundle: metrics.json (this setting's row), predictions, card.md",
    )
    add_cache(p)
    p.add_argument(
        "--limit",
        type=positive_int,
        default=0,
        help="only the first N images of the split (default: all)",
    )
    add_precision(p)
    add_runtime(p)
    add_device(p)
    p.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (Java)")


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_data(p)
    add_cache(p)
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=CALIBRATE_CHOICES,
        default=list(CALIBRATE_CHOICES),
        help="OpenVINO precisions to judge (default: all)",
    )
    p.add_argument("--force", action="store_true", help="re-evaluate recorded settings")
    p.add_argument("--json", action="store_true", help="last stdout line: the verdicts as JSON")


def _add_tune_decoding(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_data(p)
    add_cache(p)
    p.add_argument("--apply", action="store_true", help="store the choice in the bundle")
    p.add_argument("--beams", type=beam_arg, nargs="+", default=[1, 3, 5], help="(default: 1 3 5)")
    p.add_argument(
        "--alphas",
        type=nonneg_float,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="(default: 0 0.5 1)",
    )
    p.add_argument(
        "--no-repeat-ngrams",
        type=nonneg_int,
        nargs="+",
        default=[0, 3],
        help="n-gram blocking sizes to try, 0 = off (default: 0 3)",
    )
    p.add_argument(
        "--metric",
        choices=TUNE_METRIC_CHOICES,
        default="cider",
        metavar="METRIC",
        help="dev metric to maximise: cider or bleu4 (default: cider, as training selects "
        "checkpoints)",
    )
    add_precision(p)
    add_runtime(p)
