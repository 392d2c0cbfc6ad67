"""Evaluate a bundle on a Flickr8k split: corpus metrics, per-image smoothed BLEU, predictions CSV.

Protocol: the split's images, all their references, corpus BLEU-1..4 (no smoothing), CIDEr-D,
METEOR and ROUGE-L on identical tokenisation; the beam size is part of every record.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from captioning.bundle import Captioner, record_metrics
from captioning.data import Flickr8k, load_flickr8k
from captioning.features import FeatureCache, extract
from captioning.fileio import atomic_write_text
from captioning.metrics import evaluate_captions, format_table, sentence_bleu_smoothed

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "meteor", "rougeL")


@dataclass
class Evaluation:
    split: str
    beam: int
    metrics: dict  # METRIC_KEYS + n_images, beam, split
    predictions: list[dict]  # image, caption, logprob, bleu1..4 (smoothed sentence BLEU)


def split_features(cap: Captioner, ds: Flickr8k, names: list[str], cache_root: Path | None):
    """Features from the cache when present (extracting any missing ones first)."""
    cache = FeatureCache.for_encoder(cap.encoder, cache_root)
    cached = cache.cached_names()  # one manifest read, not one per image
    missing = [n for n in names if n not in cached]
    if missing:
        extract(cap.encoder, [(n, ds.image_path(n)) for n in missing], cache)
    feats = cache.load(names, with_grid=cap.uses_grid)  # rows in cache order
    rows = feats.rows(names)
    return (feats.grid if cap.uses_grid else feats.pooled).index_select(0, rows)  # in names order


def evaluate(
    cap: Captioner,
    ds: Flickr8k,
    split: str,
    beam: int,
    *,
    limit: int = 0,
    cache_root: Path | None = None,
    batch: int = 100,
    meteor: bool = True,
    **decode_overrides,
) -> Evaluation:
    names = ds.splits[split][:limit] if limit else ds.splits[split]
    feats = split_features(cap, ds, names, cache_root)
    cfg = cap.decode_config(beam, **decode_overrides)
    hyps, logps = {}, {}
    for i in tqdm(range(0, len(names), batch), desc=f"decode {split} beam {beam}", unit="batch"):
        chunk = names[i : i + batch]
        for name, nbest in zip(chunk, cap.decode_features(feats[i : i + batch], cfg), strict=True):
            hyps[name] = cap.vocab.decode(nbest[0].tokens)
            logps[name] = nbest[0].logprob
    refs = {n: ds.captions[n] for n in names}
    metrics = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in evaluate_captions(hyps, refs, meteor=meteor).items()
    }
    metrics.update(
        n_images=len(names),
        beam=beam,
        split=split,
        length_alpha=cfg.length_alpha,
        precision=cap.encoder.precision.label,
    )
    preds = []
    for n in names:
        s = sentence_bleu_smoothed(hyps[n], refs[n])
        preds.append(
            {
                "image": n,
                "caption": hyps[n],
                "logprob": round(logps[n], 4),
                **{k: round(v, 2) for k, v in s.items()},
            }
        )
    return Evaluation(split, beam, metrics, preds)


def write_predictions(path: Path, preds: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(
        buf,
        fieldnames=["image", "caption", "logprob", "bleu1", "bleu2", "bleu3", "bleu4"],
        lineterminator="\n",
    )
    w.writeheader()
    w.writerows(preds)
    atomic_write_text(path, buf.getvalue())


def cmd_evaluate(args: argparse.Namespace) -> int:
    cap = Captioner.load(args.model, args.precision)
    ds = load_flickr8k(args.data)
    t0 = time.perf_counter()
    overrides = {} if args.length_alpha is None else {"length_alpha": args.length_alpha}
    beam = args.beam or cap.defaults.beam_size
    ev = evaluate(
        cap,
        ds,
        args.split,
        beam,
        limit=args.limit,
        cache_root=Path(args.cache) if args.cache else None,
        meteor=args.meteor,
        **overrides,
    )
    out = Path(args.out) if args.out else cap.path
    if args.out or not args.limit:  # partial runs leave the bundle's prediction files alone
        suffix = f"_limit{args.limit}" if args.limit else ""
        write_predictions(out / f"predictions_{args.split}_beam{beam}{suffix}.csv", ev.predictions)
    if args.record and out == cap.path:
        # a --limit run is recorded apart (e.g. "dev_first50"), for reproduction tests
        key = f"{args.split}_first{args.limit}" if args.limit else args.split
        record_metrics(cap.path, key, beam, ev.metrics)
    label = f"{cap.name} {args.split} beam={beam} n={ev.metrics['n_images']}"
    print(format_table({label: ev.metrics}))
    if ev.metrics.get("meteor_error"):
        print(f"METEOR unavailable: {ev.metrics['meteor_error']}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        print(
            json.dumps(
                {
                    k: ev.metrics.get(k)
                    for k in (*METRIC_KEYS, "n_images", "beam", "split", "length_alpha")
                }
            )
        )
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a bundle on the dev or test split",
        description="Corpus BLEU-1..4, CIDEr-D, METEOR and ROUGE-L of a bundle on "
        "a Flickr8k split; writes predictions_<split>_beam<K>.csv.",
    )
    p.add_argument("--model", required=True, help="bundle name or path")
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--beam", type=int, default=None, help="default: the bundle's")
    p.add_argument(
        "--length-alpha",
        type=float,
        default=None,
        help="length normalisation (default: the bundle's)",
    )
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    p.add_argument("--out", help="where predictions go (default: the bundle)")
    p.add_argument("--cache", help="feature cache root")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    p.add_argument(
        "--no-record", dest="record", action="store_false", help="do not write metrics.json"
    )
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (Java)")
    p.set_defaults(func=cmd_evaluate)
    register_tune_cli(sub)


def tune_decoding(
    cap: Captioner,
    ds: Flickr8k,
    beams=(1, 3, 5),
    alphas=(0.0, 0.5, 1.0),
    cache_root: Path | None = None,
) -> tuple[dict, list[dict]]:
    """Pick beam size and length normalisation by dev BLEU-4 (ties: the smaller beam)."""
    rows = []
    for beam in beams:
        for alpha in alphas if beam > 1 else (0.0,):
            ev = evaluate(
                cap, ds, "dev", beam, cache_root=cache_root, meteor=False, length_alpha=alpha
            )
            rows.append(
                {
                    "beam": beam,
                    "length_alpha": alpha,
                    **{k: round(ev.metrics[k], 2) for k in ("bleu1", "bleu4", "cider")},
                }
            )
    best = max(rows, key=lambda r: (r["bleu4"], -r["beam"]))
    return best, rows


def cmd_tune_decoding(args: argparse.Namespace) -> int:
    from captioning.bundle import set_decode_defaults

    cap = Captioner.load(args.model, args.precision)
    ds = load_flickr8k(args.data)
    best, rows = tune_decoding(
        cap,
        ds,
        beams=args.beams,
        alphas=args.alphas,
        cache_root=Path(args.cache) if args.cache else None,
    )
    print(f"{'beam':>4s} {'alpha':>5s} {'BLEU-1':>7s} {'BLEU-4':>7s} {'CIDEr-D':>7s}  (dev)")
    for r in rows:
        mark = "  <- best" if r is best else ""
        print(
            f"{r['beam']:4d} {r['length_alpha']:5.1f} {r['bleu1']:7.2f} {r['bleu4']:7.2f} "
            f"{r['cider']:7.2f}{mark}"
        )
    if args.apply:
        set_decode_defaults(cap.path, beam_size=best["beam"], length_alpha=best["length_alpha"])
        print(
            f"{cap.name}: default decoding is now beam {best['beam']}, alpha {best['length_alpha']}"
        )
    print(json.dumps({"best": best, "grid": rows}))
    return 0


def register_tune_cli(sub) -> None:
    p = sub.add_parser(
        "tune-decoding",
        help="choose beam size and length norm. on dev",
        description="Evaluate beams 1/3/5 x length normalisation 0/0.5/1 on the "
        "dev split and pick the best BLEU-4 (never looks at test).",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("--cache", help="feature cache root")
    p.add_argument("--apply", action="store_true", help="store the choice in the bundle")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.set_defaults(func=cmd_tune_decoding)
