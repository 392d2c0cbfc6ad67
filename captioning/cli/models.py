"""The bundles on disk: ``models`` lists them, ``ensemble`` and ``soup`` combine them."""

from __future__ import annotations

import argparse
from pathlib import Path

from captioning.cli.args import (
    PROG,
    TUNE_METRIC_CHOICES,
    CommandParsers,
    add_cache,
    add_data,
    add_decoding,
    add_members,
    add_precision,
    cache_root,
    decode_overrides,
    positive_int,
)

SCORING_FLAGS = ("beam", "length_alpha", "no_repeat_ngram")  # how greedy candidates are scored


def cmd_models(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import list_bundles
    from captioning.bundle.latency import latency_markdown
    from captioning.bundle.reports import comparison_markdown, results_markdown
    from captioning.core.paths import models_dir_default

    bundles = list_bundles(Path(args.models_dir) if args.models_dir else None)
    if args.markdown:
        print(results_markdown(bundles, args.split))
    elif args.compare:
        print(comparison_markdown(bundles, args.split))
    elif args.latency:
        print(latency_markdown(bundles))
    elif not bundles:
        print(
            f"no bundles in {args.models_dir or models_dir_default()}; train one with "
            f"`{PROG} train`"
        )
    else:
        _print_bundles(bundles, args.split)
    return 0


def _print_bundles(bundles: list, split: str) -> None:
    """One line per bundle: its encoder, decoder and scores at its default decoding."""
    from captioning.bundle.records import decoding_label
    from captioning.bundle.reports import default_decoding, default_result

    print(
        f"{'name':24s} {'encoder':14s} {'decoder':9s} {split + ' BLEU-1':>11s} {'BLEU-4':>7s} "
        f"{'CIDEr-D':>7s}  default decoding"
    )
    for b in bundles:
        m = default_result(b, split)
        label = decoding_label(default_decoding(b))
        if m:
            print(
                f"{b.name:24s} {b.encoder:14s} {b.decoder:9s} {m.get('bleu1'):11.1f} "
                f"{m.get('bleu4'):7.1f} {m.get('cider'):7.1f}  {label}"
            )
        else:
            missing = f"(not evaluated on {split} at the default)"
            print(f"{b.name:24s} {b.encoder:14s} {b.decoder:9s} {missing:>27s}  {label}")


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import find_bundle
    from captioning.bundle.ensemble import make_ensemble
    from captioning.core.machine import git_commit
    from captioning.core.paths import models_dir_default

    if args.out:
        out = Path(args.out)
    else:  # beside the first member, named after all of them
        first = find_bundle(args.members[0])
        home = first.parent if first else models_dir_default()
        out = home / "-".join(Path(m).name for m in args.members)
    cfg = make_ensemble(out, args.members, args.weights, commit=git_commit(), force=args.force)
    parts = ", ".join(f"{m['name']} ({m['weight']:g})" for m in cfg["members"])
    print(f"wrote {out}: an ensemble of {parts}")
    print(
        f"next: choose its decoding on dev (`{PROG} tune-decoding --model {out} --apply`), "
        f"then `{PROG} evaluate --model {out} --split test --record`"
    )
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import resolve_bundles
    from captioning.bundle.soup import make_soup
    from captioning.core.machine import git_commit

    out = Path(args.out)
    if not args.greedy:
        given = [f for f in SCORING_FLAGS if getattr(args, f) is not None]
        given += ["limit"] if args.limit else []
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags}: only with --greedy (they set how candidates are scored)")
    resolve_bundles(args.members)  # one error naming every missing member, before any work
    if not args.greedy:
        cfg = make_soup(out, args.members, args.weights, commit=git_commit(), force=args.force)
    else:
        cfg = _greedy_soup(args, out)
        if cfg is None:
            return 0
    parts = ", ".join(f"{m['name']} ({m['weight']:g})" for m in cfg["soup"]["members"])
    print(f"wrote {out}: the weighted mean of {parts}")
    print(
        f"next: choose its decoding on dev (`{PROG} tune-decoding --model {out} --apply`), "
        f"then `{PROG} evaluate --model {out} --split dev --record`"
    )
    return 0


def _greedy_soup(args: argparse.Namespace, out: Path) -> dict | None:
    """``soup --greedy``: write the soup of the members that help on dev; its config, or None
    when no soup beats the best member alone."""
    from captioning.bundle.soup import greedy_soup
    from captioning.core.machine import git_commit
    from captioning.data import load_dataset
    from captioning.inference.soup_score import dev_scorer, member_decoding

    ds = load_dataset(args.data)
    decoding = member_decoding(args.members[0], args.beam, **decode_overrides(args))
    scorer = dev_scorer(
        ds,
        decoding,
        args.metric,
        precision=args.precision,
        limit=args.limit,
        cache_root=cache_root(args),
    )
    cfg, trials = greedy_soup(
        out,
        args.members,
        scorer.score,
        args.weights,
        label=scorer.label,
        discard=scorer.discard,
        commit=git_commit(),
        force=args.force,
    )
    print(f"greedy soup by {scorer.label}:")
    for t in trials:
        print(
            f"  {t['member']:<32s} alone {t['alone']:8.4f}   soup {t['soup']:8.4f}   "
            + ("kept" if t["kept"] else "left out")
        )
    if cfg is None:
        print(f"no soup beats {trials[0]['member']} alone: nothing written")
    return cfg


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command("models", cmd_models)
    p.add_argument("--models-dir", help="(default: $CAPTIONING_MODELS or artifacts/models)")
    p.add_argument(
        "--markdown", action="store_true", help="a results table, one row per recorded setting"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="a markdown table, one row per bundle at its default decoding: BLEU-1/4, CIDEr-D, "
        "distinct and trigram-repeating captions, decode latency (bench.json) and size",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="a markdown table from each bundle's bench.json: encode, decode and total p50 at "
        "beams 1/3/5 per runtime, the folder rate and the machine it was measured on",
    )
    p.add_argument("--split", choices=("dev", "test"), default="test", help="(default: test)")

    p = commands.command(
        "ensemble",
        cmd_ensemble,
        "Write a bundle that captions with several bundles at once: one beam search over the "
        "weighted mean of their word probabilities, each member on its own encoder. It holds no "
        "weights, only its members' names (bundles in the same models directory) and their "
        "sha256, and refuses to load if a member changes.",
    )
    add_members(p, "the new bundle (default: MODELS_DIR/<member names joined by ->)")
    _add_soup(
        commands.command(
            "soup",
            cmd_soup,
            "Write a bundle whose weights are the weighted mean of its members' (decoder, and "
            "the fine-tuned encoder block when they have one): one model, as large and as fast "
            "as each member. The members must be the same model (encoder, decoder config, "
            "block, vocabulary), best fine-tuned from the same start. The soup has no scores "
            "yet: choose its decoding with tune-decoding --apply and score it with evaluate "
            "--record.",
        )
    )


def _add_soup(p: argparse.ArgumentParser) -> None:
    add_members(p, "the new bundle's directory", required=True)
    p.add_argument(
        "--greedy",
        action="store_true",
        help="greedy soup: score each member alone on dev, then add them best first, keeping "
        "each only if the soup's dev --metric does not drop (candidates are scored on torch)",
    )
    p.add_argument(
        "--metric",
        choices=TUNE_METRIC_CHOICES,
        default="cider",
        metavar="METRIC",
        help="with --greedy: the dev metric, cider or bleu4 (default: cider)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=0,
        help="with --greedy: score on the first N dev images only (default: all)",
    )
    add_decoding(p)
    add_data(p)
    add_cache(p)
    add_precision(p)
