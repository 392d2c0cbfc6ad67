"""The model bundle format: what a bundle holds, and reading it back with every check.

A bundle ``artifacts/models/NAME/`` holds ``decoder.safetensors`` (fp16), ``config.json``,
``vocab.json``, ``history.json``, ``metrics.json`` (``captioning.bundle.records``),
``predictions_*.csv``, ``bench.json`` and ``card.md`` (``captioning.bundle.card``); a fine-tuned
bundle adds ``encoder_block.safetensors``, an ensemble holds only its config and vocabulary.
``open_bundle`` reads one with safetensors and JSON only (never a pickle) and refuses what does not
fit its record; ``captioning.Captioner`` builds the encoder and decoding around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from captioning.core.files import read_json, sha256_file
from captioning.data.vocab import Vocabulary
from captioning.models.blocks import TunedBlock, block_spec
from captioning.models.decoders import Decoder, DecoderConfig, build_decoder
from captioning.models.decoding import DecodeConfig

BUNDLE_FORMAT = "captioning-bundle"
DECODER_FILE = "decoder.safetensors"
REQUIRED_FILES = ("config.json", DECODER_FILE, "vocab.json")
ENSEMBLE_KIND = "ensemble"  # config.json "kind" of a bundle that averages other bundles
ENSEMBLE_FILES = ("config.json", "vocab.json")  # its members hold the weights
DEFAULT_RUNTIME = "torch"
# files that describe one set of weights: a new export removes them
MODEL_OUTPUTS = ("metrics.json", "bench.json", "card.md", "predictions_*.csv")
BLOCK_FILE = "encoder_block.safetensors"  # a fine-tuned encoder block (captioning.models.blocks)
BLOCK_KEY = "encoder_block"  # its config.json entry: block, file, sha256 (absent: frozen encoder)
# the weights themselves and what training wrote with them: `train --force` removes these too
WEIGHT_FILES = (*REQUIRED_FILES, "history.json", BLOCK_FILE)
# what decides a single model's captions: a batch job's bundle digest covers exactly these
CAPTION_FILES = (*REQUIRED_FILES, BLOCK_FILE)


class BundleError(ValueError):
    """A bundle is missing, incomplete or incompatible."""


def read_config(bundle: Path) -> dict:
    """``config.json``, checked: the format, the files its kind needs and its required keys."""
    if not (bundle / "config.json").exists():
        raise BundleError(f"bundle {bundle} is incomplete: missing config.json")
    try:
        cfg = read_json(bundle / "config.json")
    except ValueError as e:
        raise BundleError(str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle / 'config.json'} is not a {BUNDLE_FORMAT} config")
    ensemble = is_ensemble(cfg)
    needed = ENSEMBLE_FILES if ensemble else REQUIRED_FILES
    missing = [f for f in needed if not (bundle / f).exists()]
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


def is_ensemble(config: dict) -> bool:
    """An ensemble bundle (``captioning.bundle.ensemble``) holds only its members' names."""
    return config.get("kind") == ENSEMBLE_KIND


def tuned_block(config: dict) -> str | None:
    """The encoder block a bundle fine-tuned (``layer4``, ``block5``), or None for a frozen one."""
    return (config.get(BLOCK_KEY) or {}).get("block")


DECODING_CHOSEN_KEY = "decode_chosen_by"
"""``config.json`` key: how ``decode_defaults`` was chosen ("dev CIDEr-D"); absent = never tuned."""


def bundle_decoding(config: dict, beam_size: int | None = None, **overrides) -> DecodeConfig:
    """A bundle's default decoding (``config["decode_defaults"]``) with ``beam_size`` and other
    fields overridden; raises ValueError for a bad setting."""
    beam = {} if beam_size is None else {"beam_size": beam_size}
    return DecodeConfig(**{**config.get("decode_defaults", {}), **overrides, **beam})


@dataclass
class OpenBundle:
    """A bundle read from disk: its config and vocabulary, and for a single model its decoder
    (eval mode, fp32) and its checked fine-tuned block (None for a frozen encoder). An
    ensemble's decoder is None: its members hold the weights."""

    path: Path
    config: dict
    vocab: Vocabulary
    decoder: Decoder | None
    block: TunedBlock | None


def open_bundle(bundle: Path) -> OpenBundle:
    """Read and check everything a bundle holds, once; BundleError for what does not fit."""
    cfg = read_config(bundle)
    vocab = Vocabulary.load(bundle / "vocab.json")
    if is_ensemble(cfg):
        return OpenBundle(bundle, cfg, vocab, None, None)
    decoder = _read_decoder(bundle, cfg, vocab)
    block = checked_block_file(bundle, cfg) if cfg.get(BLOCK_KEY) else None
    return OpenBundle(bundle, cfg, vocab, decoder, block)


def load_decoder(bundle: Path) -> tuple[Decoder, Vocabulary, dict]:
    """A single-model bundle's decoder, vocabulary and config; BundleError for an ensemble."""
    cfg = read_config(bundle)
    if is_ensemble(cfg):
        names = ", ".join(m["name"] for m in cfg["members"])
        raise BundleError(
            f"{bundle.name} is an ensemble of {names} and has no decoder of its own; "
            "use one of its members here"
        )
    vocab = Vocabulary.load(bundle / "vocab.json")
    return _read_decoder(bundle, cfg, vocab), vocab, cfg


def _read_decoder(bundle: Path, cfg: dict, vocab: Vocabulary) -> Decoder:
    dcfg = DecoderConfig.from_dict(cfg["decoder_config"])
    if dcfg.vocab_size != len(vocab):
        raise BundleError(
            f"{bundle}: vocab.json has {len(vocab)} words, config says {dcfg.vocab_size}"
        )
    model = build_decoder(dcfg)
    try:
        state = load_file(str(bundle / DECODER_FILE))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, OSError) as e:
        raise BundleError(f"{bundle / DECODER_FILE} does not fit its config: {e}") from None
    return model.eval()


def checked_block_file(bundle: Path, config: dict) -> TunedBlock:
    """The spec, sha256 and path of a fine-tuned bundle's block file, after checking it against
    ``config.json``: BundleError for a malformed entry, a missing file or another sha256."""
    entry = config[BLOCK_KEY]
    if not isinstance(entry, dict) or entry.get("file") != BLOCK_FILE or "sha256" not in entry:
        raise BundleError(f"{bundle / 'config.json'}: malformed {BLOCK_KEY} entry {entry!r}")
    try:
        spec = block_spec(config["encoder"], entry.get("block", ""))
    except ValueError as e:
        raise BundleError(f"{bundle / 'config.json'}: {e}") from None
    path = bundle / BLOCK_FILE
    if not path.is_file():
        raise BundleError(f"bundle {bundle.name} is incomplete: missing {BLOCK_FILE}")
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        raise BundleError(
            f"bundle {bundle.name}: {BLOCK_FILE} has sha256 {sha[:12]}…, but config.json "
            f"records {entry['sha256'][:12]}…; the fine-tuned block was changed or damaged"
        )
    return TunedBlock(spec, sha, path)


def bundle_block_state(bundle: Path, config: dict) -> dict[str, torch.Tensor]:
    """A fine-tuned bundle's block weights (checked), keyed as ``block_state`` writes them."""
    _, _, path = checked_block_file(bundle, config)
    return load_file(str(path))


def weights_fingerprint(bundle: Path) -> dict[str, str]:
    """sha256 of each weight file a single-model bundle has (decoder, and a fine-tuned block):
    what an ensemble or a soup records of its members."""
    names = (DECODER_FILE, BLOCK_FILE)
    return {f: sha256_file(bundle / f) for f in names if (bundle / f).exists()}


def clear_model_outputs(out: Path) -> list[Path]:
    """Remove the files that describe earlier weights (metrics, predictions, bench, card)."""
    removed = []
    for pattern in MODEL_OUTPUTS:
        for p in sorted(out.glob(pattern)):
            p.unlink()
            removed.append(p)
    return removed


def check_out_empty(out: Path, force: bool) -> None:
    """A new bundle goes into an empty (or missing) directory, or ``force`` replaces it."""
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} is not empty; pass --force to replace what is there")
