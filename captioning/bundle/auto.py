"""What ``precision="auto"`` runs a bundle at: the fastest precision its dev records admit.

``bundle_precision`` is ``Captioner.load``'s choice; ``captioning.bundle.gate`` judges records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from captioning.bundle.format import OpenBundle
from captioning.bundle.gate import GATED_RUNTIME, admissible_precisions
from captioning.bundle.records import read_records
from captioning.core.machine import INT8, Precision, resolve_precision, split_precision


def choose_precision(bundle: OpenBundle, int8_here: str | Callable[[], str] = INT8) -> str | None:
    """The fastest admissible precision label of ``bundle`` on OpenVINO ("int8", "bf16-int8",
    …), or None when none is recorded. ``int8_here`` is the int8 encoder this machine would run
    (or a function that says it): "int8" when the recorded calibration photos or their compiled
    model are here, "int8-samples" otherwise; another int8 record does not count."""
    for label in admissible_precisions(read_records(bundle.path), bundle.config):
        if not label.startswith(INT8):
            return label
        if callable(int8_here):
            int8_here = int8_here()
        if label == int8_here:
            return label
    return None


def parse_label(label: str) -> tuple[Precision, str]:
    """A precision label of records ("int8", "int8-samples", "bf16-int8", "bf16", "fp32") ->
    (the encoder's precision, the decoder step's)."""
    calibration = ""
    if label.startswith(f"{INT8}-"):
        label, calibration = INT8, label.removeprefix(f"{INT8}-")
    encoder, step = split_precision(label)
    return replace(resolve_precision(encoder), calibration=calibration), step


def bundle_precision(
    bundle: OpenBundle, precision: str | Precision = "auto", runtime: str = "openvino"
) -> tuple[Precision, str]:
    """What ``Captioner.load`` runs ``bundle`` at: (the encoder's precision, the decoder
    step's). ``precision`` as given; ``auto`` on OpenVINO is the gate's choice
    (``choose_precision``), else bf16 where the CPU has native bf16, else fp32."""
    if isinstance(precision, Precision):
        return precision, INT8 if precision.dtype == INT8 else "fp32"
    if precision == "auto" and runtime == GATED_RUNTIME:
        chosen = choose_precision(bundle, lambda: int8_label(bundle))
        if chosen is not None:
            return parse_label(chosen)
    encoder, step = split_precision(precision)
    return resolve_precision(encoder), step


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
