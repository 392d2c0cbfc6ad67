"""Read everything a bundle holds, for the CLI and the dashboard, and render it as markdown.

A bundle's files are written by ``captioning.bundle`` (weights, config, metrics records) and
``captioning.inference`` (predictions, ``bench.json``); this module reads them back: the
``metrics.json`` records (with the default decoding marked), ``predictions_*.csv``, and the
order, best bundle and ensemble members the dashboard shows. ``captioning.bundle.history``
reads ``history.json`` and ``captioning.bundle.latency`` reads ``bench.json`` (both re-exported
here). It renders the tables of ``python -m captioning models --markdown / --compare /
--latency``; ``captioning.bundle.card`` renders ``card.md``. No pandas here: the dashboard turns
these plain rows into tables.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioning.bundle.catalog import BundleInfo, list_bundles, resolve_bundle
from captioning.bundle.format import (
    BLOCK_FILE,
    REQUIRED_FILES,
    BundleError,
    bundle_decoding,
    is_ensemble,
    read_config,
    tuned_block,
)
from captioning.bundle.history import read_history as read_history
from captioning.bundle.latency import default_latency
from captioning.bundle.latency import latency_markdown as latency_markdown
from captioning.bundle.latency import read_bench as read_bench
from captioning.bundle.records import Setting, decoding_label, read_records
from captioning.core.paths import models_dir_default
from captioning.models.bleu import BLEU_KEYS
from captioning.models.decoders import ATTENTION_KINDS, DECODER_KINDS
from captioning.models.decoding import DecodeConfig
from captioning.models.metrics import (
    DIVERSITY_KEYS,
    HEADLINE_KEYS,
    METRIC_LABELS,
    MISSING,
    diversity_stats,
)

PREDICTION_FLOATS = ("logprob", "confidence", "cider", *BLEU_KEYS)


# ---------------------------------------------------------------- metrics records


@dataclass
class Result:
    """One metrics record of one bundle: the setting, the scores and whether it is the default."""

    model: str
    setting: Setting
    n_images: int
    metrics: dict  # METRIC_LABELS keys (None when not computed), meteor_error
    predictions: Path | None  # the CSV of this setting, if written
    default: bool

    @property
    def beam(self) -> int:
        return self.setting.decoding.beam_size

    @property
    def length_alpha(self) -> float:
        return self.setting.decoding.length_alpha

    def get(self, key: str):
        return self.metrics.get(key)


def results(bundle: BundleInfo) -> list[Result]:
    """Every recorded evaluation of ``bundle`` (sorted by split, subset, beam, α)."""
    out = []
    for r in bundle.records:
        pred = bundle.path / r["predictions"] if r.get("predictions") else None
        out.append(
            Result(
                bundle.name,
                Setting.from_dict(r),
                int(r["n_images"]),
                dict(r.get("metrics") or {}),
                pred if pred is not None and pred.is_file() else None,
                bool(r.get("default")),
            )
        )
    return out


def default_result(bundle: BundleInfo, split: str = "test") -> Result | None:
    """The record of ``split`` (whole split) made with the bundle's default decoding, if any."""
    return next(
        (
            r
            for r in results(bundle)
            if r.default and r.setting.split == split and not r.setting.limit
        ),
        None,
    )


def default_summary(bundle: BundleInfo, split: str = "test") -> dict | None:
    """The default record of ``split`` as one flat dict (None when not recorded).

    Keys: its metrics, ``n_images``, ``beam``, ``length_alpha``, ``precision``, ``runtime``.
    """
    r = default_result(bundle, split)
    if r is None:
        return None
    return {
        **r.metrics,
        "n_images": r.n_images,
        "beam": r.beam,
        "length_alpha": r.length_alpha,
        "precision": r.setting.precision,
        "runtime": r.setting.runtime,
    }


def bundle_info(path: Path) -> BundleInfo:
    """``BundleInfo`` of one bundle directory (``list_bundles`` reads a whole models dir)."""
    cfg = read_config(path)
    try:
        records = read_records(path)
    except BundleError:
        records = []
    return BundleInfo(path.name, path, cfg["encoder"], cfg["decoder"], cfg, records)


def default_decoding(bundle: BundleInfo) -> DecodeConfig:
    """The bundle's default decoding (``DecodeConfig`` defaults for missing fields)."""
    return bundle_decoding(bundle.config)


# ---------------------------------------------------------------- predictions


def read_prediction_rows(path: Path) -> list[dict]:
    """The rows of a predictions CSV: ``image, caption`` and float ``logprob, confidence,
    cider, bleu1..4`` (files without confidence or CIDEr-D columns give NaN there).

    Missing or unparsable numbers become NaN; an unreadable file gives no rows.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if rows and not {"image", "caption", *BLEU_KEYS} <= set(rows[0]):
        return []
    out = []
    for row in rows:
        rec = {"image": row["image"], "caption": row.get("caption") or ""}
        for k in PREDICTION_FLOATS:
            try:
                rec[k] = float(row.get(k) or "nan")
            except ValueError:
                rec[k] = float("nan")
        out.append(rec)
    return out


def prediction_sets(bundle: BundleInfo) -> list[tuple[Result, list[dict]]]:
    """Each whole-split record that has a predictions file, with its rows."""
    return [
        (r, read_prediction_rows(r.predictions))
        for r in results(bundle)
        if r.predictions is not None and not r.setting.limit
    ]


def default_scores(bundle: BundleInfo, split: str = "test") -> dict | None:
    """``default_summary`` with every diversity share (``DIVERSITY_KEYS``, 0-100) filled in.

    A share the record lacks is computed from its predictions file: the captions it scored.
    """
    summary = default_summary(bundle, split)
    result = default_result(bundle, split)
    if summary is None or result is None or result.predictions is None:
        return summary
    missing = [k for k in DIVERSITY_KEYS if summary.get(k) is None]
    captions = [r["caption"] for r in read_prediction_rows(result.predictions)] if missing else []
    if captions:
        stats = diversity_stats(captions)
        summary |= {k: stats[k] for k in missing}
    return summary


# ---------------------------------------------------------------- markdown


def _cells(metrics: dict, keys: list[str]) -> str:
    return " | ".join(
        MISSING if metrics.get(k) is None else f"{float(metrics[k]):.1f}" for k in keys
    )


def _columns(rows: list[Result]) -> list[str]:
    """The metrics any of ``rows`` has, in ``METRIC_LABELS`` order (BLEU-1..4 always)."""
    return [k for k in METRIC_LABELS if k in BLEU_KEYS or any(k in r.metrics for r in rows)]


def results_markdown(bundles: list[BundleInfo], split: str = "test") -> str:
    """Every bundle's records on ``split`` (whole split), one row per setting; * = default."""
    rows = [
        r for b in bundles for r in results(b) if r.setting.split == split and not r.setting.limit
    ]
    keys = _columns(rows)
    head = ["model", "decoding", "precision", "runtime", *(METRIC_LABELS[k] for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " *" if r.default else ""
        s = r.setting
        lines.append(
            f"| {r.model} | {decoding_label(s.decoding)}{mark} | {s.precision} | {s.runtime} "
            f"| {_cells(r.metrics, keys)} |"
        )
    return "\n".join(lines)


def bundle_megabytes(path: Path) -> float:
    """Size on disk of a bundle's files (weights, config, records, predictions), in MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def comparison_markdown(bundles: list[BundleInfo], split: str = "test") -> str:
    """One row per bundle at its default decoding: the headline metrics, latency and size."""
    head = [
        "model",
        "encoder",
        "decoder",
        "decoding",
        *(METRIC_LABELS[k] for k in HEADLINE_KEYS),
        "decode p50 (ms)",
        "size (MB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bundles:
        r = default_result(b, split)
        cells = (
            _cells(r.metrics, list(HEADLINE_KEYS))
            if r
            else " | ".join(MISSING for _ in HEADLINE_KEYS)
        )
        lat = default_latency(b)
        lat_cell = f"{lat[0]:.1f} ({lat[1]})" if lat else MISSING
        lines.append(
            f"| {b.name} | {encoder_group(b)} | {b.decoder} "
            f"| {decoding_label(default_decoding(b))} "
            f"| {cells} | {lat_cell} | {bundle_megabytes(b.path):.1f} |"
        )
    return "\n".join(lines)


def encoder_group(bundle: BundleInfo) -> str:
    """What a bundle's captions come from: its encoder, plus the block it fine-tuned if any.

    ``resnet50`` (frozen) or ``resnet50+layer4`` (``train --finetune layer4``).
    """
    block = tuned_block(bundle.config)
    return f"{bundle.encoder}+{block}" if block else bundle.encoder


# ---------------------------------------------------------------- order, best bundle, members


def display_key(bundle: BundleInfo) -> tuple:
    """Where a bundle goes when bundles are shown side by side: single models before ensembles,
    then by ``encoder_group`` (``resnet50``, ``resnet50+layer4``, ``vgg16``), then by decoder
    (``DECODER_KINDS`` order: inject, merge, attention, updown; any other after), then name."""
    kinds = DECODER_KINDS
    rank = kinds.index(bundle.decoder) if bundle.decoder in kinds else len(kinds)
    return (is_ensemble(bundle.config), encoder_group(bundle), rank, bundle.decoder, bundle.name)


def order_bundles(bundles: Iterable[BundleInfo]) -> list[BundleInfo]:
    """``bundles`` sorted by ``display_key``."""
    return sorted(bundles, key=display_key)


def best_bundle(bundles: Sequence[BundleInfo], split: str = "dev") -> BundleInfo:
    """The bundle with the best CIDEr-D on ``split`` at its default decoding.

    Dev, never test, chooses (the evaluation protocol). Bundles without that record come last;
    among equals an attention decoder goes first, then ``display_key`` order. ValueError when
    ``bundles`` is empty.
    """
    if not bundles:
        raise ValueError("no bundles to choose from")

    def rank(b: BundleInfo) -> tuple:
        cider = (default_summary(b, split) or {}).get("cider")
        return (
            cider is not None,
            cider if cider is not None else 0.0,
            b.decoder in ATTENTION_KINDS,
        )

    return max(order_bundles(bundles), key=rank)  # max keeps the first of equal ranks


def best_single_bundle(bundles: Sequence[BundleInfo], split: str = "dev") -> BundleInfo:
    """``best_bundle`` among the single models (no ensembles): what the Caption page, the
    ``caption`` command and ``bench-serve`` start with. ValueError when there is none."""
    singles = [b for b in bundles if not is_ensemble(b.config)]
    if not singles:
        raise ValueError("no single-model bundles to choose from")
    return best_bundle(singles, split)


def default_model(models_dir: Path | None = None) -> str:
    """The name of the best single model on dev in ``models_dir`` (default: the models folder,
    ``$CAPTIONING_MODELS`` or ``artifacts/models``); ValueError when it holds none."""
    root = models_dir or models_dir_default()
    try:
        return best_single_bundle(list_bundles(root)).name
    except ValueError:
        raise ValueError(f"no model bundles in {root}; pass --model NAME_OR_PATH") from None


def member_paths(bundle: BundleInfo) -> list[Path]:
    """The bundles an ensemble averages, in its order, as found beside it (none for a single
    model); a member that is not there is left out (loading the ensemble names it)."""
    out = []
    for member in bundle.config.get("members", []) if is_ensemble(bundle.config) else []:
        try:
            out.append(resolve_bundle(member["name"], bundle.path.parent))
        except BundleError:
            continue
    return out


def weight_files(bundle: BundleInfo) -> list[Path]:
    """The files that change when the bundle's weights do: config, decoder, vocabulary and
    fine-tuned block (those that exist) of the bundle and, for an ensemble, of each member."""
    names = (*REQUIRED_FILES, BLOCK_FILE)
    return [d / n for d in (bundle.path, *member_paths(bundle)) for n in names if (d / n).is_file()]


def attending_member(bundle: BundleInfo) -> str | None:
    """The ensemble member whose attention the ensemble's captions carry: its first member with
    an attention decoder (None for a single model, or when no member attends)."""
    for path in member_paths(bundle):
        try:
            decoder = read_config(path)["decoder"]
        except BundleError:
            continue
        if decoder in ATTENTION_KINDS:
            return path.name
    return None


def member_names(bundle: BundleInfo) -> list[str]:
    """The names of the bundles an ensemble averages (empty for a single model)."""
    return [m["name"] for m in bundle.config["members"]] if is_ensemble(bundle.config) else []
