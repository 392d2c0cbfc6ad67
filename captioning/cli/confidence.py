"""``confidence``: how well each confidence form ranks captions by quality, on dev."""

from __future__ import annotations

import argparse

from captioning.cli.args import (
    CommandParsers,
    add_cache,
    add_data,
    add_precision,
    add_runtime,
    cache_root,
)


def cmd_confidence(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import list_bundles, resolve_bundle
    from captioning.inference.confidence_study import read_study

    if args.show:
        paths = [resolve_bundle(m) for m in args.model] or [b.path for b in list_bundles()]
        studies = [s for s in (read_study(p) for p in paths) if s is not None]
        if not studies:
            print("no bundle has a confidence study yet: run `captioning confidence --data DIR`")
            return 1
        print(_table(studies))
        return 0
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import list_bundles, resolve_bundle
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.confidence_study import study, write_study

    ds = load_dataset(args.data)
    paths = [resolve_bundle(m) for m in args.model] or [b.path for b in list_bundles()]
    studies = []
    for path in paths:
        cap = Captioner.load(path, args.precision, runtime=args.runtime)
        result = study(cap, ds, args.split, cache_root=cache_root(args))
        print(f"wrote {write_study(path, result)}")
        studies.append(result)
    print(_table(studies))
    return 0


def _table(studies) -> str:
    """A markdown table: per bundle, each form's Spearman with CIDEr-D and BLEU-4."""
    from captioning.inference.confidence_study import best_form
    from captioning.models.confidence import CONFIDENCE_FORM, FORMS

    head = ["bundle", "setting", *(f"{f} ρ CIDEr-D / BLEU-4" for f in FORMS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in studies:
        cells = [f"{s.spearman[f]['cider']:.3f} / {s.spearman[f]['bleu4']:.3f}" for f in FORMS]
        lines.append(f"| {s.model} | {s.setting} | " + " | ".join(cells) + " |")
    mean = {f: sum(s.spearman[f]["cider"] for s in studies) / len(studies) for f in FORMS}
    means = ", ".join(f"{f} {v:.3f}" for f, v in mean.items())
    lines += [
        "",
        f"Mean ρ with CIDEr-D over {len(studies)} bundles: {means}. Best: "
        f"{best_form(studies)}; captions carry {CONFIDENCE_FORM}.",
    ]
    return "\n".join(lines)


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command(
        "confidence",
        cmd_confidence,
        "Caption a split at each bundle's default decoding and report how each confidence "
        "form (mean word probability, geometric mean, weakest word) correlates with per-image "
        "CIDEr-D and BLEU-4 (Spearman). Writes confidence.json into each bundle; --show prints "
        "the stored results without captioning.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="bundle name or path; repeat for several (default: every bundle)",
    )
    p.add_argument("--split", default="dev", help="split to study (default: dev)")
    p.add_argument("--show", action="store_true", help="print the stored results only")
    add_data(p)
    add_cache(p)
    add_precision(p)
    add_runtime(p)
