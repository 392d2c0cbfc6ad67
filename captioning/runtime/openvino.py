"""Inference runtimes behind one interface: torch (the reference) and OpenVINO; a compile cache.

``resolve_runtime("auto")`` is "openvino" where the ``openvino`` package imports, else "torch".
On OpenVINO the encoder's forward pass and the decoder's ``step`` run as compiled CPU models
(``PERFORMANCE_HINT`` LATENCY, ``INFERENCE_NUM_THREADS`` = torch's threads, or those
``hand_cores_to_openvino`` kept) at a precision:
fp32, bf16 (the encoder in bf16, the step in f32) or int8 (a quantised encoder and int8 step
weights, ``captioning.runtime.quantize``). The beam search, the decoder's per-image
``context``/``init_state`` and everything else stay in torch.

A model is converted once (``ov.convert_model`` traces an fp32 copy of the torch module, which a
``transform`` may quantise) and its IR is saved under
``<cache>/openvino/<name>-<sha256[:16]>-<precision>[-<calibration>]-ov<version>/``
(``<cache>`` = ``$CAPTIONING_CACHE`` or ``~/.cache/captioning``; ``$CAPTIONING_OV_CACHE``
replaces ``<cache>/openvino``) with a ``manifest.json``;
OpenVINO's own ``CACHE_DIR`` keeps the compiled blob beside it, so later processes load it in a
fraction of a second. A new weights file, precision, calibration set or OpenVINO (or NNCF)
version is a new key, hence a new entry; an entry whose manifest does not match its key, or that
fails to load, is rebuilt.
Whatever fails to convert or compile runs on torch instead, with a one-line message on stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioning.core.files import atomic_write_json, read_json
from captioning.core.machine import pin_threads
from captioning.core.paths import openvino_cache_dir

RUNTIMES = ("auto", "torch", "openvino")
OV_FORMAT = "captioning-openvino"
OV_FORMAT_VERSION = 1  # bump when the traced graphs change meaning
# Precision.dtype -> INFERENCE_PRECISION_HINT; an int8 graph runs its unquantised ops in f32
OV_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def note(message: str) -> None:
    """A one-line notice on stderr (a fallback, not an error)."""
    print(f"note: {message}", file=sys.stderr)


def openvino_module():
    """The ``openvino`` module, or None when it is not installed (or cannot load)."""
    try:
        import openvino
    except (ImportError, OSError):
        return None
    return openvino


def openvino_version() -> str | None:
    if openvino_module() is None:
        return None
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:  # a source build: the runtime's own string
        return openvino_module().get_version().split("-")[0]


def resolve_runtime(name: str = "auto") -> str:
    """``auto`` -> "openvino" where it is installed, else "torch". An explicit "openvino" that
    is not installed also gives "torch", with a notice."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    if name == "torch":
        return "torch"
    if openvino_module() is None:
        if name == "openvino":
            note("openvino is not installed (pip install openvino); running on torch")
        return "torch"
    return "openvino"


# ---------------------------------------------------------------- convert, cache, compile


@dataclass(frozen=True)
class CompileKey:
    """What a compiled model depends on: the graph, the weights, the precision, OpenVINO, and
    for a quantised model the calibration set (its sha256) and the NNCF version."""

    name: str  # e.g. "encoder-resnet50", "decoder-attention"
    weights_sha256: str
    precision: str  # "fp32" | "bf16" | "int8"
    openvino: str  # package version
    calibration: str = ""  # int8: "<set name>-<sha256 of its list>" ("" for a data-free graph)
    nncf: str = ""  # int8: the NNCF version that compressed it

    @property
    def dirname(self) -> str:
        calib = f"-{self.calibration[:24]}" if self.calibration else ""
        return f"{self.name}-{self.weights_sha256[:16]}-{self.precision}{calib}-ov{self.openvino}"

    def manifest(self) -> dict:
        extra = {"calibration": self.calibration, "nncf": self.nncf} if self.nncf else {}
        return {
            "format": OV_FORMAT,
            "version": OV_FORMAT_VERSION,
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "openvino": self.openvino,
            **extra,
        }


@dataclass(frozen=True)
class GraphInput:
    """One input of a traced graph: its shape with -1 for dynamic dims, and its dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def example(self) -> torch.Tensor:
        shape = [2 if d < 0 else d for d in self.shape]
        if self.dtype.is_floating_point:
            return torch.rand(shape, dtype=self.dtype)
        return torch.ones(shape, dtype=self.dtype)


def _quiet_telemetry() -> None:
    """Model conversion would send usage telemetry; this project sends nothing anywhere."""
    try:
        import openvino.tools.ovc.convert_impl as convert_impl
        import openvino.tools.ovc.telemetry_stub as stub
        import openvino.tools.ovc.telemetry_utils as telemetry_utils
        import openvino.tools.ovc.utils as ovc_utils
    except ImportError:
        return
    for mod in (convert_impl, telemetry_utils, ovc_utils):
        if hasattr(mod, "tm"):
            mod.tm = stub


Transform = Callable[[Any], Any]  # ov.Model -> ov.Model (quantise, compress weights)


def _convert(
    build: Callable[[], nn.Module],
    inputs: Sequence[GraphInput],
    entry: Path,
    key,
    transform: Transform | None = None,
):
    """Trace ``build()`` (fp32, eval) into OpenVINO IR at ``entry/model.xml``, atomically;
    ``transform`` rewrites the traced model first (e.g. int8 quantisation)."""
    ov = openvino_module()
    _quiet_telemetry()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
        module = build().float().eval()
        examples = tuple(i.example() for i in inputs)
        spec = [(ov.PartialShape(list(i.shape)), _ov_type(ov, i.dtype)) for i in inputs]
        model = ov.convert_model(module, example_input=examples, input=spec)
    if transform is not None:
        model = transform(model)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        atomic_write_json(tmp / "manifest.json", key.manifest())
        tmp.chmod(0o755)  # mkdtemp made it private
        shutil.rmtree(entry, ignore_errors=True)  # a stale or broken entry
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ov_type(ov, dtype: torch.dtype):
    return {torch.float32: ov.Type.f32, torch.int64: ov.Type.i64}[dtype]


def entry_ok(entry: Path, key: CompileKey) -> bool:
    try:
        manifest = read_json(entry / "manifest.json")
    except (OSError, ValueError):
        return False
    files = all((entry / f).is_file() for f in ("model.xml", "model.bin"))
    return files and manifest == key.manifest()


_THREADS: int | None = None  # the threads compiled models use; None: torch's


def compile_threads() -> int:
    """The threads a model compiles with: torch's, or what ``hand_cores_to_openvino`` kept."""
    return _THREADS or torch.get_num_threads()


def hand_cores_to_openvino() -> None:
    """For a process whose captioners all run on OpenVINO: compiled models keep torch's thread
    count, and torch itself drops to one thread. Between the beam search's small torch ops,
    torch's idle intra-op threads spin and take the cores from OpenVINO's (resnet50-attention
    int8 on a 2-core EPYC: encoder 11.4 ms with torch at 2 threads, 7.9 ms at 1)."""
    global _THREADS
    _THREADS = compile_threads()
    torch.set_num_threads(1)


_CORE: Any = None
_CORE_LOCK = threading.Lock()


def _core():
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = openvino_module().Core()
        return _CORE


def compile_graph(
    key: CompileKey,
    build: Callable[[], nn.Module],
    inputs: Sequence[GraphInput],
    *,
    threads: int | None = None,
    cache_root: Path | None = None,
    transform: Transform | None = None,
):
    """An ``ov.CompiledModel`` of ``build()``, converted only when the cache has no valid entry.

    ``build`` is called only on a cache miss; it returns the fp32 torch module to trace, which
    ``transform`` (when given) rewrites before it is saved.
    """
    entry = openvino_cache_dir(cache_root) / key.dirname
    n_threads = int(threads or compile_threads())
    config = {
        "INFERENCE_PRECISION_HINT": OV_HINTS[key.precision],
        "INFERENCE_NUM_THREADS": n_threads,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": pin_threads(n_threads),
        "CACHE_DIR": str(entry / "compiled"),
    }
    fresh = not entry_ok(entry, key)
    if fresh:
        _convert(build, inputs, entry, key, transform)
    try:
        return _core().compile_model(str(entry / "model.xml"), "CPU", config)
    except Exception:
        if fresh:
            raise
        _convert(build, inputs, entry, key, transform)  # a damaged entry: rebuild it once
        return _core().compile_model(str(entry / "model.xml"), "CPU", config)


class CompiledGraph:
    """A compiled model with one infer request per thread (requests are not thread-safe)."""

    runtime = "openvino"

    def __init__(self, compiled, key: CompileKey) -> None:
        self.compiled, self.key = compiled, key
        self._local = threading.local()

    @property
    def precision_hint(self) -> str:
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def infer(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        out = req.infer([np.ascontiguousarray(a) for a in arrays], share_inputs=True)
        return [torch.from_numpy(out[i]) for i in range(len(self.compiled.outputs))]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
