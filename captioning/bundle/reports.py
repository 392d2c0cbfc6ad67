"""Read everything a bundle holds, for the CLI and the dashboard, and render it as markdown.

A bundle's files are written by ``captioning.bundle`` (weights, config, metrics records) and
``captioning.evaluate`` / ``captioning.bench`` (predictions, bench.json); this module is the one
place that reads them back: ``config``, ``history.json``, ``metrics.json`` records (with the
default decoding marked), ``predictions_*.csv``, ``bench.json`` and ``card.md``. It also renders
``card.md`` and the results table of ``python -m captioning models --markdown``. No pandas here:
the dashboard turns these plain rows into tables.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from captioning.bundle.catalog import BundleInfo
from captioning.bundle.format import BundleError, bundle_decoding, read_config, tuned_block
from captioning.bundle.records import Setting, decoding_label, read_records
from captioning.core.files import read_json
from captioning.models.bleu import BLEU_KEYS
from captioning.models.decoding import DecodeConfig
from captioning.models.metrics import HEADLINE_KEYS, METRIC_LABELS, MISSING

PREDICTION_FLOATS = ("logprob", *BLEU_KEYS)


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
    return {**r.metrics, "n_images": r.n_images, "beam": r.beam, "length_alpha": r.length_alpha,
            "precision": r.setting.precision, "runtime": r.setting.runtime}  # fmt: skip


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


# ---------------------------------------------------------------- predictions, history, bench


def read_prediction_rows(path: Path) -> list[dict]:
    """The rows of a predictions CSV: ``image, caption`` and float ``logprob, bleu1..4``.

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


def read_history(path: Path) -> list[dict]:
    """``history.json`` of a bundle: one dict per epoch (empty when absent or unreadable)."""
    try:
        data = read_json(path / "history.json")
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [r for r in data if isinstance(r, dict) and "epoch" in r]


def read_bench(path: Path) -> dict | None:
    """A bundle's ``bench.json``, or None when absent or unreadable."""
    try:
        data = read_json(path / "bench.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_card(path: Path) -> str | None:
    try:
        return (path / "card.md").read_text(encoding="utf-8")
    except OSError:
        return None


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


def default_latency(bundle: BundleInfo) -> tuple[float, str] | None:
    """(decode p50 ms at the default beam, runtime) from ``bench.json``, when it has that beam."""
    bench = read_bench(bundle.path)
    beam = str(default_decoding(bundle).beam_size)
    try:
        return float(bench["beams"][beam]["decode_ms"]["p50"]), str(bench.get("runtime", "torch"))
    except (KeyError, TypeError, ValueError):
        return None


def comparison_markdown(bundles: list[BundleInfo], split: str = "test") -> str:
    """One row per bundle at its default decoding: the headline metrics, latency and size."""
    head = ["model", "encoder", "decoder", "decoding", *(METRIC_LABELS[k] for k in HEADLINE_KEYS),
            "decode p50 (ms)", "size (MB)"]  # fmt: skip
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


def _p50(runtime: dict, beam: str, key: str) -> str:
    try:
        return f"{float(runtime['beams'][beam][key]['p50']):.1f}"
    except (KeyError, TypeError, ValueError):
        return MISSING


def _folder_cell(bench: dict, runtime: dict) -> str:
    folder = runtime.get("folder") or {}
    if folder.get("images_per_s") is None:
        return MISSING
    where = "samples" if "samples" in str(bench.get("folder", "")) else "images"
    beam = bench.get("throughput_beam", "?")
    return f"{float(folder['images_per_s']):.1f} ({folder.get('images', '?')} {where}, beam {beam})"


def _machine(bench: dict) -> str:
    """ "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)" from a bench record's CPU fields."""
    cpu = bench.get("cpu_model") if isinstance(bench.get("cpu_model"), dict) else {}
    if not cpu:  # records before cpu_model had only the architecture ("x86_64")
        return f"{bench.get('cpu') or '?'} (CPU model not recorded)"
    model = cpu.get("model") or "?"
    flags = cpu.get("bf16_flags")
    return f"{model} ({', '.join(flags) or 'no native bf16'})" if flags is not None else model


def latency_markdown(bundles: list[BundleInfo]) -> str:
    """One row per bundle and runtime from each ``bench.json`` (`bench --save`): batch-1 p50s of
    encode, decode and JPEG bytes -> caption at beams 1/3/5, the folder rate, and the machine."""
    head = ["model", "runtime", "encode p50 ms", "decode p50 ms, beam 1 / 3 / 5",
            "total p50 ms, beam 1 / 3 / 5", "folder images/s", "measured on"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bundles:
        bench = read_bench(b.path)
        if not bench:
            continue
        where = _machine(bench) + f", {bench.get('threads', '?')} threads, "
        where += str(bench.get("created", "?"))[:10]
        runtimes = bench.get("runtimes") or {bench.get("runtime", "torch"): bench}
        for name, rt in runtimes.items():
            per_beam = [str(k) for k in (1, 3, 5)]
            decode = " / ".join(_p50(rt, k, "decode_ms") for k in per_beam)
            total = " / ".join(_p50(rt, k, "total_ms") for k in per_beam)
            lines.append(
                f"| {b.name} | {name} {rt.get('precision', '')} | {_p50(rt, '3', 'encode_ms')} "
                f"| {decode} | {total} | {_folder_cell(bench, rt)} | {where} |"
            )
    return "\n".join(lines)


def encoder_group(bundle: BundleInfo) -> str:
    """What a bundle's captions come from: its encoder, plus the block it fine-tuned if any.

    ``resnet50`` (frozen) or ``resnet50+layer4`` (``train --finetune layer4``).
    """
    block = tuned_block(bundle.config)
    return f"{bundle.encoder}+{block}" if block else bundle.encoder
