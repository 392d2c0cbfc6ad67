"""The model bundle file format: write, read and verify.

A bundle ``artifacts/models/NAME/`` holds ``decoder.safetensors`` (fp16), ``config.json``,
``vocab.json``, ``history.json``, ``metrics.json`` (one record per evaluation setting),
``predictions_*.csv``, ``bench.json`` and ``card.md`` (rendered by ``captioning.reports``).
Loading uses safetensors and JSON only, and refuses a bundle whose encoder weights differ from
ours. The ``Captioner`` API lives in ``captioning.captioner``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from captioning.decoders import Decoder, DecoderConfig, build_decoder
from captioning.decoding import DecodeConfig
from captioning.encoders import ARTIFACTS_DIR
from captioning.fileio import atomic_save_safetensors, atomic_write_json, read_json, sha256_file
from captioning.precision import resolve_device, resolve_precision
from captioning.vocab import Vocabulary

MODELS_DIR = ARTIFACTS_DIR / "models"
MODELS_ENV = "CAPTIONING_MODELS"  # overrides MODELS_DIR (e.g. for tests and the dashboard)
BUNDLE_FORMAT = "captioning-bundle"
DECODER_FILE = "decoder.safetensors"
REQUIRED_FILES = ("config.json", DECODER_FILE, "vocab.json")
ENSEMBLE_KIND = "ensemble"  # config.json "kind" of a bundle that averages other bundles
ENSEMBLE_FILES = ("config.json", "vocab.json")  # its members hold the weights
METRICS_FORMAT = "captioning-metrics"
METRICS_VERSION = 2
DEFAULT_RUNTIME = "torch"
# files that describe one set of weights: a new export removes them
MODEL_OUTPUTS = ("metrics.json", "bench.json", "card.md", "predictions_*.csv")
BLOCK_FILE = "encoder_block.safetensors"  # a fine-tuned encoder block (captioning.finetune)
BLOCK_KEY = "encoder_block"  # its config.json entry: block, file, sha256 (absent: frozen encoder)
# the weights themselves and what training wrote with them: `train --force` removes these too
WEIGHT_FILES = (*REQUIRED_FILES, "history.json", BLOCK_FILE)


class BundleError(ValueError):
    """A bundle is missing, incomplete or incompatible."""


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
    if isinstance(data, dict) and data.get("format") == METRICS_FORMAT:
        records = data.get("records", [])
    elif isinstance(data, dict):  # version 1: {split: {"beam<K>": metrics}}
        records = legacy_records(data, directory)
    else:
        raise BundleError(f"{path} is not a {METRICS_FORMAT} file")
    for r in records:
        r["decoding"] = asdict(Setting.from_dict(r).decoding)  # fill fields added since
    return records


def record_setting(record: dict) -> Setting:
    return Setting.from_dict(record)


def legacy_records(old: dict, directory: Path) -> list[dict]:
    """Convert a version-1 ``metrics.json`` (keys like ``test``/``beam5``, ``dev_first50``).

    Version 1 evaluated with the bundle's default decoding except beam and α, so the other
    fields come from its config; the numbers are kept exactly.
    """
    cfg = read_json(directory / "config.json") if (directory / "config.json").exists() else {}
    base = cfg.get("decode_defaults", {})
    out = []
    for split_key, by_beam in old.items():
        split, _, first = split_key.partition("_first")
        limit = int(first) if first else 0
        for m in by_beam.values():
            decoding = {**base, "beam_size": m["beam"], "length_alpha": m.get("length_alpha", 0.0)}
            name = f"predictions_{split}_beam{m['beam']}.csv"
            scores = {k: v for k, v in m.items() if k not in LEGACY_SETTING_KEYS}
            out.append(
                {
                    "split": split,
                    "limit": limit,
                    "decoding": asdict(DecodeConfig(**decoding)),
                    "precision": m.get("precision", "unknown"),
                    "runtime": DEFAULT_RUNTIME,
                    "n_images": m["n_images"],
                    "metrics": scores,
                    "predictions": name if not limit and (directory / name).exists() else None,
                    "default": False,
                    "recorded": None,
                }
            )
    return mark_defaults(out, cfg)


LEGACY_SETTING_KEYS = ("beam", "split", "length_alpha", "precision", "n_images")


def mark_defaults(records: list[dict], config: dict) -> list[dict]:
    """Mark, per split (and subset), the record made with the bundle's default decoding.

    Among several matches, the bundle's own precision and runtime win, then the newest record.
    """
    target = DecodeConfig(**config.get("decode_defaults", {}))
    want = (config.get("precision"), config.get("runtime", DEFAULT_RUNTIME))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        r["default"] = False
        groups.setdefault((r["split"], r["limit"]), []).append(r)
    for group in groups.values():
        hits = [r for r in group if DecodeConfig(**r["decoding"]) == target]
        if hits:
            hits.sort(
                key=lambda r: ((r["precision"], r["runtime"]) == want, r.get("recorded") or "")
            )
            hits[-1]["default"] = True
    return records


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


def add_record(directory: Path, setting: Setting, n_images: int, metrics: dict,
               predictions: str | None) -> tuple[dict, bool]:  # fmt: skip
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


# ---------------------------------------------------------------- writing


def data_description(dataset) -> dict:
    """What a ``CaptionDataset`` says about itself, its layout and split (config.json, card)."""
    return {
        "name": dataset.name,
        "layout": dataset.layout,
        "split_source": dataset.split_source,
        "split": dataset.split_note,
        "images": {k: len(v) for k, v in dataset.splits.items()},
    }


def clear_model_outputs(out: Path) -> list[Path]:
    """Remove the files that describe earlier weights (metrics, predictions, bench, card)."""
    removed = []
    for pattern in MODEL_OUTPUTS:
        for p in sorted(out.glob(pattern)):
            p.unlink()
            removed.append(p)
    return removed


def export_bundle(
    out: Path,
    model: Decoder,
    vocab: Vocabulary,
    *,
    cfg,
    dcfg: DecoderConfig,
    history: list[dict],
    best_epoch: int,
    commit: str | None,
    dataset=None,
    encoder_sha256: str | None = None,
    encoder_block: dict | None = None,
    encoder_runtime: str = DEFAULT_RUNTIME,
    encoder_precision: str = "",
    select_metric: str,
) -> None:
    """Write a self-contained bundle (weights fp16) next to the training state.

    ``select_metric``: the history field that chose ``best_epoch`` (the card names it).

    ``encoder_runtime``, ``encoder_precision``: what ran the encoder that made the training
    features (torch, openvino) and at which precision (its label, e.g. bf16+cl); without the
    label, the precision ``cfg`` resolves to on this machine.

    ``encoder_block``: the ``config.json`` entry of a fine-tuned block already written into
    ``out`` (``captioning.finetune.export_block``); None for a frozen encoder.

    New weights make every earlier record wrong, so metrics, predictions, bench and card of a
    previous model are removed; ``captioning.reports.write_card`` renders the new card.
    """
    from captioning.encoders import weights_sha256

    out.mkdir(parents=True, exist_ok=True)
    clear_model_outputs(out)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save_safetensors(out / "decoder.safetensors", sd, metadata={"format": "fp16"})
    vocab.save(out / "vocab.json")
    resolved = resolve_precision(cfg.precision, resolve_device(cfg.device))  # as train.py does
    precision = encoder_precision or resolved.label
    train_config = {**asdict(cfg), "precision": resolved.dtype}  # "auto" made explicit
    config = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "name": out.name,
        "encoder": cfg.encoder,
        "decoder": dcfg.kind,
        "encoder_sha256": encoder_sha256 or weights_sha256(cfg.encoder),
        **({BLOCK_KEY: encoder_block} if encoder_block else {}),
        "precision": precision,  # of the encoder features the decoder was trained on
        "runtime": encoder_runtime,  # of those features
        "data": data_description(dataset) if dataset is not None else None,
        "decoder_config": dcfg.to_dict(),
        "train_config": train_config,
        "best_epoch": best_epoch,
        "select_metric": select_metric,
        "decode_defaults": asdict(DecodeConfig()),
        "git_commit": commit,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "history.json", history)
    write_records(out, [], config)


DECODING_CHOSEN_KEY = "decode_chosen_by"
"""``config.json`` key: how ``decode_defaults`` was chosen ("dev CIDEr-D"); absent = never tuned."""


def bundle_decoding(config: dict, beam_size: int | None = None, **overrides) -> DecodeConfig:
    """A bundle's default decoding (``config["decode_defaults"]``) with ``beam_size`` and other
    fields overridden; raises ValueError for a bad setting."""
    beam = {} if beam_size is None else {"beam_size": beam_size}
    return DecodeConfig(**{**config.get("decode_defaults", {}), **overrides, **beam})


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


# ---------------------------------------------------------------- reading


def models_dir_default() -> Path:
    """``$CAPTIONING_MODELS`` if set, else ``artifacts/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else MODELS_DIR


def weights_fingerprint(bundle: Path) -> dict[str, str]:
    """sha256 of each weight file a single-model bundle has (decoder, and a fine-tuned block):
    what an ensemble or a soup records of its members."""
    names = (DECODER_FILE, BLOCK_FILE)
    return {f: sha256_file(bundle / f) for f in names if (bundle / f).exists()}


def member_weights(members: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """One weight > 0 per member of an ensemble or a soup (default: equal), normalised to sum to
    1; raises BundleError for fewer than two different members or a bad weight."""
    if len(members) < 2 or len(set(members)) != len(members):
        raise BundleError("an ensemble or a soup needs at least two different member bundles")
    weights = list(weights) if weights else [1.0] * len(members)
    if len(weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise BundleError(f"give one weight > 0 per member ({len(members)}), got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def shared_vocabulary(paths: Sequence[Path]) -> Vocabulary:
    """The vocabulary every bundle of ``paths`` has; BundleError if any differs."""
    vocab = Vocabulary.load(paths[0] / "vocab.json")
    for p in paths[1:]:
        if Vocabulary.load(p / "vocab.json").itos != vocab.itos:
            raise BundleError(f"{p.name} and {paths[0].name} have different vocabularies")
    return vocab


def single_model_configs(paths: Sequence[Path]) -> list[dict]:
    """The ``config.json`` of each member of an ensemble or a soup; BundleError if a member is
    itself an ensemble (members must be single models)."""
    configs = [read_config(p) for p in paths]
    nested = [p.name for p, c in zip(paths, configs, strict=True) if is_ensemble(c)]
    if nested:
        raise BundleError(f"members must be single models, not ensembles: {', '.join(nested)}")
    return configs


def check_out_empty(out: Path, force: bool) -> None:
    """A new bundle goes into an empty (or missing) directory, or ``force`` replaces it."""
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} is not empty; pass --force to replace what is there")


def resolve_bundle(name_or_path: str | Path, models_dir: Path | None = None) -> Path:
    models_dir = models_dir or models_dir_default()
    p = Path(name_or_path)
    if p.is_dir():
        return p
    cand = models_dir / str(name_or_path)
    if cand.is_dir():
        return cand
    names = [b.name for b in list_bundles(models_dir)]
    raise BundleError(
        f"no model bundle {str(name_or_path)!r} (looked for a directory and in "
        f"{models_dir}); available: {', '.join(names) or 'none'}"
    )


def is_ensemble(config: dict) -> bool:
    """An ensemble bundle (``captioning.ensemble``) holds no weights, only its members' names."""
    return config.get("kind") == ENSEMBLE_KIND


def read_config(bundle: Path) -> dict:
    if not (bundle / "config.json").exists():
        raise BundleError(f"bundle {bundle} is incomplete: missing config.json")
    try:
        cfg = read_json(bundle / "config.json")
    except ValueError as e:
        raise BundleError(str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle / 'config.json'} is not a {BUNDLE_FORMAT} config")
    ensemble = is_ensemble(cfg)
    missing = [f for f in (ENSEMBLE_FILES if ensemble else REQUIRED_FILES)
               if not (bundle / f).exists()]  # fmt: skip
    if missing:
        raise BundleError(f"bundle {bundle} is incomplete: missing {', '.join(missing)}")
    keys = (
        ("encoder", "decoder", "members")
        if ensemble
        else ("encoder", "decoder", "encoder_sha256", "decoder_config")
    )
    for key in keys:
        if key not in cfg:
            raise BundleError(f"{bundle / 'config.json'} lacks the key {key!r}")
    if ensemble and not _members_ok(cfg["members"]):
        raise BundleError(
            f"{bundle / 'config.json'}: 'members' must list at least two "
            "{name, weight > 0, sha256} entries"
        )
    return cfg


def _members_ok(members: object) -> bool:
    def ok(m: object) -> bool:
        return (
            isinstance(m, dict)
            and isinstance(m.get("name"), str)
            and isinstance(m.get("weight"), int | float)
            and not isinstance(m.get("weight"), bool)
            and m["weight"] > 0
            and isinstance(m.get("sha256"), dict)
        )

    return isinstance(members, list) and len(members) >= 2 and all(ok(m) for m in members)


@dataclass
class BundleInfo:
    name: str
    path: Path
    encoder: str
    decoder: str
    config: dict
    records: list[dict] = field(default_factory=list)  # see ``read_records``


def tuned_block(config: dict) -> str | None:
    """The encoder block a bundle fine-tuned (``layer4``, ``block5``), or None for a frozen one."""
    return (config.get(BLOCK_KEY) or {}).get("block")


def list_bundles(models_dir: Path | None = None) -> list[BundleInfo]:
    """Every complete bundle under ``models_dir`` (default ``artifacts/models``), sorted."""
    root = models_dir or models_dir_default()
    out = []
    for d in sorted(root.glob("*/")) if root.is_dir() else []:
        try:
            cfg = read_config(d)
        except BundleError:
            continue
        try:
            records = read_records(d)
        except BundleError:  # unreadable metrics.json: still a usable model
            records = []
        out.append(BundleInfo(d.name, d, cfg["encoder"], cfg["decoder"], cfg, records))
    return out


def check_bundle(bundle: Path) -> dict:
    """The config of a usable bundle: its decoder loads or, for an ensemble, its members are in
    place and unchanged. Raises BundleError otherwise (callers that fail early use this)."""
    cfg = read_config(bundle)
    if is_ensemble(cfg):
        from captioning.ensemble import check_members

        check_members(bundle, cfg)
    else:
        load_decoder(bundle)
    return cfg


def load_decoder(bundle: Path) -> tuple[Decoder, Vocabulary, dict]:
    cfg = read_config(bundle)
    if is_ensemble(cfg):
        names = ", ".join(m["name"] for m in cfg["members"])
        raise BundleError(
            f"{bundle.name} is an ensemble of {names} and has no decoder of its own; "
            "use one of its members here"
        )
    vocab = Vocabulary.load(bundle / "vocab.json")
    dcfg = DecoderConfig.from_dict(cfg["decoder_config"])
    if dcfg.vocab_size != len(vocab):
        raise BundleError(
            f"{bundle}: vocab.json has {len(vocab)} words, config says {dcfg.vocab_size}"
        )
    model = build_decoder(dcfg)
    try:
        state = load_file(str(bundle / "decoder.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, OSError) as e:
        raise BundleError(
            f"{bundle / 'decoder.safetensors'} does not fit its config: {e}"
        ) from None
    return model.eval(), vocab, cfg
