"""Numeric precision and memory-format settings for CPU inference and training.

fp32 is the reference. ``bf16`` (weights and activations in bfloat16, channels_last) is the fast
path on CPUs with AMX or AVX512-BF16; ``auto`` picks it only there and falls back to fp32
elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How a model runs: ``dtype`` ("fp32" or "bf16") and whether it uses channels_last."""

    dtype: str = "fp32"
    channels_last: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def label(self) -> str:
        return self.dtype + ("+cl" if self.channels_last else "")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.torch_dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W]
        x = x.to(self.torch_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for modules that keep fp32 weights (decoders in training)."""
        if self.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(name: str = "auto") -> Precision:
    """``auto`` -> bf16 + channels_last where the CPU has native bf16, else fp32."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "auto":
        name = "bf16" if cpu_has_fast_bf16() else "fp32"
    return Precision(dtype=name, channels_last=name == "bf16")
