"""Loading the served captioner: ``Captioner.load`` with the fastest runtime on a device."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from captioning.core.machine import resolve_precision

if TYPE_CHECKING:
    from captioning.inference.captioner import Captioner


def load_captioner(
    model: str | Path, precision: str = "auto", runtime: str = "auto", device: str = "cpu"
) -> Captioner:
    """``Captioner.load`` on ``device``: on CUDA the encoder runs on torch at the device's
    autocast precision; on the CPU with ``runtime`` (auto: OpenVINO where installed)."""
    from captioning.inference.captioner import Captioner  # torch loads here, not at import

    if device != "cpu":
        precision, runtime = resolve_precision(precision, device), "torch"
    return Captioner.load(model, precision, runtime=runtime)
