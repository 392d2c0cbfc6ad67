"""The quality gate: which faster precisions a bundle may run at, read from its dev records.

A precision on OpenVINO is *admissible* for a bundle when its full-dev record at the bundle's
default decoding has CIDEr-D >= the fp32 torch reference - ``CIDER_MARGIN``, BLEU-4 >= the
reference - ``BLEU4_MARGIN``, and no caption repeats a trigram. Captions need not be identical:
two captions that differ in a word can score the same. ``python -m captioning calibrate``
measures the records; ``captioning.bundle.auto`` runs ``precision="auto"`` at the fastest
admissible one. This module only reads records it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from captioning.core.machine import BF16_INT8, INT8
from captioning.models.decoding import DecodeConfig

CIDER_MARGIN = 0.5  # CIDEr-D points below the reference a faster path may lose
BLEU4_MARGIN = 0.3  # BLEU-4 points
REFERENCE = ("fp32", "torch")  # (precision, runtime) every candidate is held against
GATED_RUNTIME = "openvino"  # encoder and decoder step both compiled
FAST_FIRST = (INT8, BF16_INT8, "bf16", "fp32")  # OpenVINO precisions, fastest first


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
    return sorted(ok, key=speed_rank)


def speed_rank(label: str) -> tuple[int, str]:
    """Sort key of precision labels, fastest first ("int8", "int8-samples", "bf16-int8", "bf16",
    "fp32")."""
    base = INT8 if label.startswith(f"{INT8}-") else label
    return (FAST_FIRST.index(base) if base in FAST_FIRST else len(FAST_FIRST), label)


def fastest_admissible(records: list[dict], config: dict) -> str | None:
    """The fastest admissible precision label, or None: the setting a bundle's tables show."""
    ok = admissible_precisions(records, config)
    return ok[0] if ok else None
