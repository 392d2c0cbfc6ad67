"""The quality gate: which faster precisions a bundle may run at, read from its dev records.

A precision on OpenVINO is *admissible* for a bundle when its full-dev record at the bundle's
default decoding has CIDEr-D >= the fp32 torch reference - ``CIDER_MARGIN``, BLEU-4 >= the
reference - ``BLEU4_MARGIN``, and no caption repeats a trigram. Captions need not be identical:
two captions that differ in a word can score the same. ``python -m captioning calibrate``
measures the records; ``choose_precision`` is what ``precision="auto"`` runs at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from captioning.bundle.format import OpenBundle
from captioning.bundle.records import read_records
from captioning.core.machine import INT8, Precision, resolve_precision
from captioning.models.decoding import DecodeConfig

CIDER_MARGIN = 0.5  # CIDEr-D points below the reference a faster path may lose
BLEU4_MARGIN = 0.3  # BLEU-4 points
REFERENCE = ("fp32", "torch")  # (precision, runtime) every candidate is held against
GATED_RUNTIME = "openvino"  # encoder and decoder step both compiled
FAST_FIRST = (INT8, "bf16", "fp32")  # OpenVINO precisions, fastest first


@dataclass(frozen=True)
class Verdict:
    """One candidate precision against the reference, on the full dev split."""

    precision: str
    cider: float
    bleu4: float
    repeat_trigram: float
    ref_cider: float
    ref_bleu4: float

    @property
    def reasons(self) -> list[str]:
        """Why it fails the gate (empty when admissible)."""
        out = []
        if self.cider < self.ref_cider - CIDER_MARGIN:
            out.append(f"CIDEr-D {self.cider:.2f} < {self.ref_cider:.2f} - {CIDER_MARGIN}")
        if self.bleu4 < self.ref_bleu4 - BLEU4_MARGIN:
            out.append(f"BLEU-4 {self.bleu4:.2f} < {self.ref_bleu4:.2f} - {BLEU4_MARGIN}")
        if self.repeat_trigram > 0:
            out.append(f"{self.repeat_trigram:.1f}% of captions repeat a trigram")
        return out

    @property
    def admissible(self) -> bool:
        return not self.reasons


def dev_default_records(records: list[dict], config: dict) -> list[dict]:
    """The full-dev records made with the bundle's default decoding."""
    target = DecodeConfig(**config.get("decode_defaults", {}))
    return [
        r
        for r in records
        if r["split"] == "dev" and not r["limit"] and DecodeConfig(**r["decoding"]) == target
    ]


def reference_record(records: list[dict], config: dict) -> dict | None:
    """The fp32 torch full-dev record at the default decoding, or None."""
    for r in dev_default_records(records, config):
        if (r["precision"], r["runtime"]) == REFERENCE:
            return r
    return None


def verdicts(records: list[dict], config: dict) -> list[Verdict]:
    """Every OpenVINO precision recorded on full dev at the default decoding, judged against
    the reference (none without a reference)."""
    ref = reference_record(records, config)
    if ref is None:
        return []
    rm = ref["metrics"]
    return [
        Verdict(
            r["precision"],
            float(r["metrics"]["cider"]),
            float(r["metrics"]["bleu4"]),
            float(r["metrics"].get("repeat_trigram", 0.0)),
            float(rm["cider"]),
            float(rm["bleu4"]),
        )
        for r in dev_default_records(records, config)
        if r["runtime"] == GATED_RUNTIME
    ]


def admissible_precisions(records: list[dict], config: dict) -> list[str]:
    """The admissible precision labels, fastest first (``int8-samples`` after ``int8``)."""
    ok = {v.precision for v in verdicts(records, config) if v.admissible}

    def rank(label: str) -> tuple[int, str]:
        base = label.split("-")[0]
        return (FAST_FIRST.index(base) if base in FAST_FIRST else len(FAST_FIRST), label)

    return sorted(ok, key=rank)


def choose_precision(
    bundle: OpenBundle, int8_here: str | Callable[[], str] | None = None
) -> Precision | None:
    """The fastest admissible precision of ``bundle`` on OpenVINO, or None when none is
    recorded. ``int8_here`` is the int8 this machine would run (or a function that says it):
    "int8" when the recorded calibration photos or their compiled model are here,
    "int8-samples" otherwise; another int8 record does not count."""
    for label in admissible_precisions(read_records(bundle.path), bundle.config):
        if not label.startswith(INT8):
            return resolve_precision(label)
        if callable(int8_here):
            int8_here = int8_here()
        if label == int8_here:
            return Precision(INT8, calibration=label.removeprefix(INT8).removeprefix("-"))
    return None


def bundle_precision(
    bundle: OpenBundle, precision: str | Precision = "auto", runtime: str = "openvino"
) -> Precision:
    """What ``Captioner.load`` runs ``bundle`` at: ``precision`` as given; ``auto`` on OpenVINO
    is the gate's choice (``choose_precision``), else bf16 where the CPU has native bf16, else
    fp32."""
    if isinstance(precision, Precision):
        return precision
    if precision == "auto" and runtime == GATED_RUNTIME:
        chosen = choose_precision(bundle, lambda: int8_label(bundle))
        if chosen is not None:
            return chosen
    return resolve_precision(precision)


def int8_label(bundle: OpenBundle) -> str:
    """The int8 this machine runs ``bundle``'s encoder at: "int8" when its model calibrated on
    the recorded train photos is compiled and cached, or those photos are here (``$CAPTIONING_
    DATA``); else "int8-samples". An ensemble asks the photos only."""
    from captioning.runtime.encoders import int8_cached
    from captioning.runtime.quantize import calibration_sets

    train = calibration_sets()[0]
    cfg = bundle.config
    if bundle.decoder is not None and int8_cached(cfg["encoder"], encoder_identity(bundle), train):
        return INT8
    return INT8 if train.sources() else f"{INT8}-{calibration_sets()[1].name}"


def encoder_identity(bundle: OpenBundle) -> str:
    """The sha256 that keys ``bundle``'s encoder in caches (its tuned block's included)."""
    from captioning.models.blocks import tuned_sha256

    sha = bundle.config["encoder_sha256"]
    block = bundle.block
    return sha if block is None else tuned_sha256(sha, block.spec.name, block.sha256)
