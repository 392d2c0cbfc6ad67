"""A bundle's evaluation records: ``metrics.json``, one record per setting.

A setting (``Setting``) is everything that made a number except the weights: split (and subset),
decoding, precision and runtime. ``add_record`` replaces the record of the same setting, so
re-running an evaluation never doubles a row; ``mark_defaults`` flags the records made with the
bundle's default decoding (what tables and cards show first).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

from captioning.bundle.format import DECODING_CHOSEN_KEY, DEFAULT_RUNTIME, BundleError, read_config
from captioning.bundle.gate import GATED_RUNTIME, fastest_admissible
from captioning.core.files import atomic_write_json, read_json
from captioning.models.decoding import DecodeConfig

METRICS_FORMAT = "captioning-metrics"
METRICS_VERSION = 2


# ---------------------------------------------------------------- records


@dataclass
class Setting:
    """Everything that made an evaluation number, except the weights: its identity."""

    split: str
    decoding: DecodeConfig
    precision: str  # resolved, e.g. "bf16+cl"
    runtime: str = DEFAULT_RUNTIME
    limit: int = 0  # only the first N images of the split; 0 = all of it

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "limit": self.limit,
            "decoding": asdict(self.decoding),
            "precision": self.precision,
            "runtime": self.runtime,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        try:
            decoding = DecodeConfig(**d["decoding"])
            return cls(d["split"], decoding, d["precision"], d["runtime"], int(d["limit"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"malformed metrics record {d!r}: {e}") from None

    @property
    def label(self) -> str:
        """``test beam 5 α 0.5 bf16+cl torch`` plus any other non-default decoding field."""
        sub = f" first {self.limit}" if self.limit else ""
        return f"{self.split}{sub} {decoding_label(self.decoding)} {self.precision} {self.runtime}"

    def predictions_name(self) -> str:
        """A file name unique to this setting (records store it; nothing parses it)."""
        sub = f"_first{self.limit}" if self.limit else ""
        d = self.decoding
        extra = "".join(f"_{k}{v}" for k, v in _non_default_fields(d).items())
        return (
            f"predictions_{self.split}{sub}_beam{d.beam_size}_alpha{d.length_alpha:g}{extra}"
            f"_{self.precision}_{self.runtime}.csv"
        )


def _non_default_fields(d: DecodeConfig) -> dict:
    """Decoding fields other than beam and α that differ from ``DecodeConfig()``."""
    base = asdict(DecodeConfig())
    return {
        k: v
        for k, v in asdict(d).items()
        if k not in ("beam_size", "length_alpha") and v != base[k]
    }


def decoding_label(d: DecodeConfig) -> str:
    """``beam 5 α 0.5`` and every other decoding field that is not at its default."""
    extra = "".join(f" {k}={v}" for k, v in _non_default_fields(d).items())
    return f"beam {d.beam_size} α {d.length_alpha:g}{extra}"


def metrics_path(directory: Path) -> Path:
    return directory / "metrics.json"


def read_records(directory: Path) -> list[dict]:
    """The evaluation records in ``directory/metrics.json`` (none when absent).

    Each record: ``split, limit, decoding, precision, runtime`` (the setting), ``n_images``,
    ``metrics`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, ``meteor_error``), ``predictions`` (a
    file name or None), ``default`` (the bundle's default decoding) and ``recorded``.
    """
    path = metrics_path(directory)
    if not path.exists():
        return []
    try:
        data = read_json(path)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if not isinstance(data, dict) or data.get("format") != METRICS_FORMAT:
        raise BundleError(f"{path} is not a {METRICS_FORMAT} file")
    records = data.get("records", [])
    for r in records:
        r["decoding"] = asdict(Setting.from_dict(r).decoding)  # every field, defaults filled in
    return records


def record_setting(record: dict) -> Setting:
    return Setting.from_dict(record)


def mark_defaults(records: list[dict], config: dict) -> list[dict]:
    """Mark, per split (and subset), the record made with the bundle's default decoding.

    Among several matches, the setting ``auto`` runs at wins (the fastest precision the dev
    quality gate admits on OpenVINO, ``captioning.bundle.gate``), then the bundle's own
    precision and runtime, then the newest record.
    """
    target = DecodeConfig(**config.get("decode_defaults", {}))
    own = (config.get("precision"), config.get("runtime", DEFAULT_RUNTIME))
    fast = fastest_admissible(records, config)
    auto = (fast, GATED_RUNTIME) if fast else own
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        r["default"] = False
        groups.setdefault((r["split"], r["limit"]), []).append(r)
    for group in groups.values():
        hits = [r for r in group if DecodeConfig(**r["decoding"]) == target]
        if hits:
            hits.sort(key=lambda r: _preference(r, auto, own))
            hits[-1]["default"] = True
    return records


def _preference(record: dict, auto: tuple, own: tuple) -> tuple:
    setting = (record["precision"], record["runtime"])
    return (setting == auto, setting == own, record.get("recorded") or "")


def write_records(directory: Path, records: list[dict], config: dict | None = None) -> None:
    """Write ``metrics.json``; with a bundle's ``config``, re-mark the default records."""
    if config is not None:
        mark_defaults(records, config)
    order = sorted(records, key=lambda r: (r["split"], r["limit"], _sort_key(r)))
    doc = {"format": METRICS_FORMAT, "version": METRICS_VERSION, "records": order}
    atomic_write_json(metrics_path(directory), doc)


def _sort_key(r: dict) -> tuple:
    d = r["decoding"]
    return (d["beam_size"], d["length_alpha"], r["precision"], r["runtime"], str(d))


def add_record(
    directory: Path, setting: Setting, n_images: int, metrics: dict, predictions: str | None
) -> tuple[dict, bool]:
    """Add or replace the record of ``setting`` in ``directory/metrics.json``.

    Returns the record and whether it replaced an older one of the same setting. Only a record
    of the very same setting is replaced: another α, precision or runtime adds a row.
    """
    is_bundle = (directory / "config.json").exists()
    config = read_config(directory) if is_bundle else None
    records = read_records(directory)
    kept = [r for r in records if record_setting(r) != setting]
    referenced = {r.get("predictions") for r in kept} | {predictions}
    for old in records:  # the replaced record's predictions file, unless still referenced
        name = old.get("predictions")
        if old not in kept and name and name not in referenced:
            (directory / name).unlink(missing_ok=True)
    record = {
        **setting.to_dict(),
        "n_images": n_images,
        "metrics": metrics,
        "predictions": predictions,
        "default": False,
        "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_records(directory, [*kept, record], config)
    return record, len(kept) < len(records)


def set_decode_defaults(bundle: Path, chosen_by: str | None = None, **changes) -> dict:
    """Change the bundle's default decoding (e.g. the beam size chosen on dev). ``chosen_by``
    says how it was chosen (``tune-decoding --apply``: "dev CIDEr-D") and is recorded with it
    (``DECODING_CHOSEN_KEY``); a change without it clears that record."""
    cfg = read_config(bundle)
    merged = {**cfg.get("decode_defaults", {}), **changes}
    DecodeConfig(**merged)  # validates the keys
    cfg["decode_defaults"] = merged
    if chosen_by:
        cfg[DECODING_CHOSEN_KEY] = chosen_by
    else:
        cfg.pop(DECODING_CHOSEN_KEY, None)
    atomic_write_json(bundle / "config.json", cfg)
    write_records(bundle, read_records(bundle), cfg)
    return merged
