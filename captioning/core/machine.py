"""Numeric precision and memory-format settings for CPU inference and training.

fp32 is the reference. ``bf16`` (weights and activations in bfloat16, channels_last) is the fast
path on CPUs with AMX or AVX512-BF16; ``auto`` picks it only there and falls back to fp32
elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI parser stays light
    import torch
    from torch import nn

FIXED_PRECISIONS = ("fp32", "bf16")  # what torch runs
INT8 = "int8"  # OpenVINO only: a quantised encoder and int8 weights in the decoder step
BF16_INT8 = "bf16-int8"  # OpenVINO only: a bf16 encoder and int8 weights in the decoder step
PRECISIONS = ("auto", *FIXED_PRECISIONS, INT8, BF16_INT8)  # every --precision choice


def split_precision(name: str) -> tuple[str, str]:
    """A precision choice -> (the encoder's, the decoder step's): "int8" -> ("int8", "int8"),
    "bf16-int8" -> ("bf16", "int8"), any other -> (it, "fp32")."""
    if name == INT8:
        return INT8, INT8
    if name == BF16_INT8:
        return "bf16", INT8
    return name, "fp32"


DEVICES = ("auto", "cpu", "cuda")  # every --device choice


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _bf16_flags(info: str) -> list[str]:
    words = set(info.split())
    return [f for f in BF16_FLAGS if f in words]


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    return bool(_bf16_flags(_cpuinfo()))


def cpu_description() -> dict:
    """The CPU's model name and which native bf16 flags it has (for benchmark records)."""
    info = _cpuinfo()
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    model = names[0] if names else ""
    return {"model": model, "bf16_flags": _bf16_flags(info)}


@dataclass(frozen=True)
class Precision:
    """How a model runs: ``dtype`` ("fp32", "bf16", "int8" on OpenVINO; "fp16" on CUDA only),
    whether it uses channels_last, the ``device`` ("cpu" or "cuda") it runs on, and for int8 the
    ``calibration`` set it was quantised on ("" = the recorded Flickr8k train photos)."""

    dtype: str = "fp32"
    channels_last: bool = False
    device: str = "cpu"
    calibration: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype, torch.float32)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]  # "cuda:1" -> "cuda"

    @property
    def label(self) -> str:
        """e.g. "bf16+cl"; off the CPU the device too ("bf16+cl-cuda"), so caches never mix; an
        int8 model calibrated on another set than the recorded one names it ("int8-samples")."""
        where = "" if self.device_type == "cpu" else f"-{self.device_type}"
        calib = f"-{self.calibration}" if self.calibration else ""
        return self.dtype + calib + ("+cl" if self.channels_last else "") + where

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import torch

        model = model.to(self.device, self.torch_dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W]
        import torch

        x = x.to(self.device, self.torch_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for modules that keep fp32 weights (decoders in training)."""
        if self.dtype != "fp32":
            import torch

            return torch.autocast(self.device_type, dtype=self.torch_dtype)
        return contextlib.nullcontext()


def resolve_precision(name: str = "auto", device: str = "cpu") -> Precision:
    """``auto`` -> bf16 + channels_last where the CPU has native bf16, else fp32. On CUDA,
    ``auto`` is bf16 where the GPU supports it, else fp16 (both channels_last). ``int8`` is
    OpenVINO's (``captioning.runtime.quantize``); of "bf16-int8" the encoder's part is bf16."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    name = split_precision(name)[0]  # the encoder's part
    if name == INT8:
        if not device.startswith("cpu"):
            raise ValueError("int8 runs on the CPU with OpenVINO; on a GPU use auto, bf16 or fp32")
        return Precision(dtype=INT8, device=device)
    if name == "auto" and device.startswith("cpu"):
        name = "bf16" if cpu_has_fast_bf16() else "fp32"
    elif name == "auto":  # CUDA-only: bf16 from Ampere on, fp16 before
        import torch

        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(dtype=name, channels_last=name != "fp32", device=device)


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> "cuda" when torch sees a CUDA GPU, else "cpu". An explicit "cuda" without
    one is a RuntimeError that says why (no GPU, or a torch build without CUDA)."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        why = (
            f"this torch build supports CUDA {torch.version.cuda} but finds no GPU"
            if torch.version.cuda
            else "this torch build has no CUDA support"
        )
        raise RuntimeError(f"--device cuda: no CUDA device is available ({why}); use --device cpu")
    return "cpu"


def device_scope(device: str) -> contextlib.AbstractContextManager:
    """Tensors made without a device (``torch.zeros``, ``arange``...) land on ``device``.

    A no-op on the CPU (a device context intercepts every torch call, which costs time there).
    """
    if device.startswith("cpu"):
        return contextlib.nullcontext()
    import torch  # CUDA-only: decoders and the beam search make their index tensors on the GPU

    return torch.device(device)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads at ``n`` inside the block, restored after (a process-wide
    setting: for single-threaded callers such as a benchmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pin_threads(threads: int) -> bool:
    """OpenVINO's ``ENABLE_CPU_PINNING``: only for a process that uses every core it may run on.

    Each process pins its threads from the first core on, without knowing of the others, so two
    processes of one thread each (``batch --workers 2`` on 2 cores, two Ray actors on a node)
    both land on core 0. Measured on 2 cores, resnet50-attention, beam 3, batches of 16: two such
    processes captioned 10.6 images/s each pinned and 21.1 each unpinned, one 2-thread process
    31.7 either way.
    """
    return threads >= usable_cpus()


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
