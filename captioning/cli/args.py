"""Argument types, shared options and the sub-parser registry of ``python -m captioning``.

Nothing here imports torch: the choice lists are the names of the library's registries (a test
keeps them equal), and the types that need the library import it only when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path

from captioning.core.machine import DEVICES, PRECISIONS

PROG = "python -m captioning"
Handler = Callable[[argparse.Namespace], int]

# the names of captioning.models.encoders.ENCODERS, models.decoders.DECODER_KINDS,
# runtime.openvino.RUNTIMES, models.blocks.FINETUNE_BLOCKS, inference.tune.TUNE_METRICS,
# training.scst.BASELINES and inference.calibrate.CANDIDATES
ENCODER_CHOICES = ("resnet50", "vgg16", "resnet50-tv", "vgg16-tv")
DECODER_CHOICES = ("inject", "merge", "attention", "updown")
RUNTIME_CHOICES = ("auto", "torch", "openvino")
FINETUNE_CHOICES = ("layer4", "block5")
TUNE_METRIC_CHOICES = ("cider", "bleu4")
BASELINE_CHOICES = ("mean", "greedy")
CALIBRATE_CHOICES = ("int8", "bf16-int8", "bf16", "fp32")

# DecoderConfig fields that --set may not change: --decoder, the vocabulary and the encoder fix them
STRUCTURAL_KEYS = {
    "kind": "--decoder",
    "vocab_size": "the training vocabulary",
    "feat_dim": "--encoder",
}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class CommandParsers:
    """The sub-parser of every registered command, made in ``--help`` order; each command group
    fills in its own commands with ``command``."""

    def __init__(self, parsers: Mapping[str, argparse.ArgumentParser]) -> None:
        self._parsers = parsers

    def command(self, name: str, run: Handler, description: str = "") -> argparse.ArgumentParser:
        """``name``'s parser, set to call ``run``; ``description`` heads its ``--help``
        (default: the command's one-line help)."""
        parser = self._parsers[name]
        if description:
            parser.description = description
        parser.set_defaults(func=run)
        return parser


# ---------------------------------------------------------------- argument types


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None


def beam_arg(text: str) -> int:
    """A beam size: 1 (greedy) to ``captioning.models.decoding.MAX_BEAM``."""
    from captioning.models.decoding import MAX_BEAM

    beam = _int(text, "beam size")
    if not 1 <= beam <= MAX_BEAM:
        raise argparse.ArgumentTypeError(
            f"beam size must be 1..{MAX_BEAM} (1 = greedy), got {beam}"
        )
    return beam


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = _int(text, "value")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """A whole number of at least 0."""
    value = _int(text, "value")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1)."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def parse_overrides(items: list[str], config_cls: type | None = None) -> dict:
    """``--set KEY=VALUE`` items -> overrides of ``config_cls`` (default ``DecoderConfig``).

    Each value is parsed by its field's type (bool: true/false/yes/no/on/off/1/0). Refuses
    unknown keys, the structural keys (kind, vocab_size, feat_dim) and values that do not fit
    the type (``dropout=abc``, ``hidden_dim=0.5``, ``flag=maybe``).
    """
    import typing

    if config_cls is None:
        from captioning.models.decoders import DecoderConfig as config_cls

    types = typing.get_type_hints(config_cls)
    allowed = sorted(k for k in types if k not in STRUCTURAL_KEYS)
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"--set {key}: not settable, {STRUCTURAL_KEYS[key]} fixes it")
        if key not in types:
            raise ValueError(f"--set {key}: unknown decoder setting; choose from {allowed}")
        out[key] = _parse_typed(key, value, types[key])
    return out


def _parse_typed(key: str, value: str, kind: type) -> bool | int | float | str:
    if kind is bool:
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"--set {key}={value}: expected true or false")
    try:
        parsed = kind(value)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"--set {key}={value}: expected {what}") from None
    if kind is float and not math.isfinite(parsed):
        raise ValueError(f"--set {key}={value}: expected a finite number")
    return parsed


# ---------------------------------------------------------------- shared options


def add_encoder(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--encoder NAME``: required, or resnet50 by default."""
    p.add_argument(
        "--encoder",
        required=required,
        default=None if required else "resnet50",
        choices=ENCODER_CHOICES,
        metavar="ENCODER",
        help="%(choices)s" if required else "%(choices)s (default: %(default)s)",
    )


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="numerics: fp32 (reference), bf16 (+ channels_last on torch), int8 (OpenVINO: a "
        "quantised encoder and int8 decoder-step weights), bf16-int8 (OpenVINO: a bf16 encoder "
        "and int8 decoder-step weights), or auto = the fastest that passed the bundle's dev "
        "quality gate (`calibrate`), else bf16 where the CPU has native bf16, else fp32 "
        "(default: auto)",
    )


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="auto",
        metavar="RUNTIME",
        help="what runs the encoder and decoder step: torch (reference), openvino, or auto = "
        "openvino where installed, else torch; a failed compile falls back to torch "
        "(default: auto)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the encoder (and in training the model) runs: cpu, cuda (bf16/fp16 "
        "autocast), or auto = cuda when torch sees a GPU, else cpu (default: auto)",
    )


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", help="data directory of any layout, see `data` (default: $CAPTIONING_DATA)"
    )


def add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", help="feature cache root (default: $CAPTIONING_CACHE or ~/.cache/captioning)"
    )


def add_model(p: argparse.ArgumentParser, default_help: str | None = None) -> None:
    """``--model``: required, or with ``default_help`` optional (None: the command picks)."""
    where = "bundle name in artifacts/models ($CAPTIONING_MODELS), or a path"
    p.add_argument(
        "--model",
        required=default_help is None,
        default=None,
        help=f"{where} (default: {default_help})" if default_help else where,
    )


def add_decoding(p: argparse.ArgumentParser) -> None:
    """``--beam``, ``--length-alpha`` and ``--no-repeat-ngram``, each the bundle's by default."""
    p.add_argument(
        "--beam", type=beam_arg, default=None, help="beam size, 1 = greedy (default: the bundle's)"
    )
    p.add_argument(
        "--length-alpha",
        type=nonneg_float,
        default=None,
        help="length normalisation α (default: the bundle's)",
    )
    p.add_argument(
        "--no-repeat-ngram",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="forbid repeating any N-gram, 0 = off (default: the bundle's)",
    )


def add_members(p: argparse.ArgumentParser, out_help: str, required: bool = False) -> None:
    """The arguments of a bundle made of other bundles (``ensemble``, ``soup``)."""
    p.add_argument("members", nargs="+", metavar="MODEL", help="member bundles (at least two)")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per member, normalised to sum to 1 (default: equal)",
    )
    p.add_argument("--out", required=required, help=out_help)
    p.add_argument("--force", action="store_true", help="replace what --out holds")


# ---------------------------------------------------------------- reading parsed options


def decode_overrides(args: argparse.Namespace) -> dict:
    """The decoding fields given on the command line (``--length-alpha``, ``--no-repeat-ngram``)."""
    pairs = (("length_alpha", args.length_alpha), ("no_repeat_ngram", args.no_repeat_ngram))
    return {k: v for k, v in pairs if v is not None}


def cache_root(args: argparse.Namespace) -> Path | None:
    """``--cache`` as a path (None: the default cache)."""
    return Path(args.cache) if args.cache else None


def on_device(args: argparse.Namespace) -> tuple:
    """(precision, runtime) for ``--device``: the CPU gets the flags as given; CUDA a resolved
    Precision on the GPU and torch (OpenVINO runs on CPUs)."""
    from captioning.core.machine import resolve_device, resolve_precision

    device = resolve_device(args.device)  # a clear error when cuda is asked for but absent
    if device == "cpu":
        return args.precision, args.runtime
    return resolve_precision(args.precision, device), "torch"


def config_from(cls, args: argparse.Namespace, **given):
    """A config dataclass ``cls`` from the parsed flags that name one of its fields (``given``
    sets or overrides fields); fields no flag names keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**flags, **given})
