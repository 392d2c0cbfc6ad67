"""``calibrate``: measure a bundle's faster precisions on dev and record the quality gate's input.

For the bundle's default decoding, on the full dev split: the fp32 torch reference (once), then
each OpenVINO precision asked for. Every evaluation is recorded in the bundle's ``metrics.json``
under its own setting, so ``precision="auto"`` (``captioning.bundle.gate``) can pick the fastest
admissible one. Records already there are reused unless ``force``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from captioning.bundle.format import open_bundle
from captioning.bundle.gate import (
    GATED_RUNTIME,
    REFERENCE,
    Verdict,
    dev_default_records,
    speed_rank,
    verdicts,
)
from captioning.bundle.records import read_records
from captioning.data import CaptionDataset
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import evaluate, save_evaluation

CANDIDATES = (
    "int8",
    "bf16-int8",
    "bf16",
    "fp32",
)  # the OpenVINO precisions calibrate measures by default


def _recorded(path: Path, precision: str, runtime: str, config: dict) -> bool:
    """Whether the full-dev default-decoding record of (precision, runtime) exists."""
    return any(
        (r["precision"], r["runtime"]) == (precision, runtime)
        for r in dev_default_records(read_records(path), config)
    )


def calibrate(
    model: str | Path,
    ds: CaptionDataset,
    precisions: Sequence[str] = CANDIDATES,
    *,
    cache_root: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[Verdict]:
    """Evaluate the reference and ``precisions`` on dev into the bundle; the gate's verdicts."""
    ref_prec, ref_rt = REFERENCE
    settings = [(ref_prec, ref_rt), *((p, GATED_RUNTIME) for p in precisions)]
    for precision, runtime in settings:
        cap = Captioner.load(model, precision, runtime=runtime)
        if cap.runtime != runtime:
            log(f"{cap.name}: {precision} on {runtime} runs as {cap.runtime}; not gated")
            continue
        if not force and _recorded(cap.path, cap.precision_label, cap.runtime, cap.config):
            log(f"{cap.name}: dev {cap.precision_label} {cap.runtime} is recorded (--force redoes)")
            continue
        ev = evaluate(cap, ds, "dev", cache_root=cache_root)
        for line in save_evaluation(ev, cap.path):
            log(line)
    bundle = open_bundle(Path(cap.path))
    rows = verdicts(read_records(bundle.path), bundle.config)
    return sorted(rows, key=lambda v: speed_rank(v.precision))


def format_verdicts(name: str, rows: list[Verdict]) -> str:
    """The gate's table: each OpenVINO precision against the fp32 torch reference."""
    if not rows:
        return f"{name}: no fp32 torch reference on full dev; nothing to judge"
    ref = rows[0]
    lines = [
        f"{name}: full dev, default decoding; reference fp32 torch CIDEr-D {ref.ref_cider:.2f} "
        f"BLEU-4 {ref.ref_bleu4:.2f}",
        f"{'precision':14s} {'CIDEr-D':>8s} {'Δ':>6s} {'BLEU-4':>7s} {'Δ':>6s} "
        f"{'rep.3g %':>8s}  verdict",
    ]
    for v in rows:
        verdict = "admissible" if v.admissible else "rejected: " + "; ".join(v.reasons)
        lines.append(
            f"{v.precision:14s} {v.cider:8.2f} {v.cider - v.ref_cider:+6.2f} {v.bleu4:7.2f} "
            f"{v.bleu4 - v.ref_bleu4:+6.2f} {v.repeat_trigram:8.1f}  {verdict}"
        )
    return "\n".join(lines)
