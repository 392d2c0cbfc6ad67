"""Inference runtimes behind one interface: torch (the reference) and OpenVINO; a compile cache.

``resolve_runtime("auto")`` is "openvino" where the ``openvino`` package imports, else "torch".
On OpenVINO the encoder's forward pass and the decoder's ``step`` run as compiled CPU models
(``PERFORMANCE_HINT`` LATENCY, ``INFERENCE_NUM_THREADS`` = torch's threads). The encoder runs at
the project's precision (bf16 only where the CPU has AMX or AVX512-BF16, else f32); the decoder
step always in f32 (``DECODER_STEP_PRECISION``). The beam search, the decoder's per-image
``context``/``init_state`` and everything else stay in torch.

A model is converted once (``ov.convert_model`` traces an fp32 copy of the torch module) and its
IR is saved under ``<cache>/openvino/<name>-<sha256[:16]>-<precision>-ov<version>/``
(``<cache>`` = ``$CAPTIONING_CACHE`` or ``~/.cache/captioning``; ``$CAPTIONING_OV_CACHE``
replaces ``<cache>/openvino``) with a ``manifest.json``;
OpenVINO's own ``CACHE_DIR`` keeps the compiled blob beside it, so later processes load it in a
fraction of a second. A new weights file, precision or OpenVINO version is a new key, hence a new
entry; an entry whose manifest does not match its key, or that fails to load, is rebuilt.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioning.encoders import (
    INPUT_SIZE,
    EncoderOutput,
    LoadedEncoder,
    build_encoder,
    get_spec,
    weights_sha256,
)
from captioning.fileio import atomic_write_json, read_json
from captioning.precision import Precision, resolve_precision

RUNTIMES = ("auto", "torch", "openvino")
OV_DIR = "openvino"  # under the captioning cache root
OV_CACHE_ENV = "CAPTIONING_OV_CACHE"  # overrides <cache>/openvino (e.g. one per test session)
OV_FORMAT = "captioning-openvino"
OV_FORMAT_VERSION = 1  # bump when the traced graphs change meaning
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}  # Precision.dtype -> INFERENCE_PRECISION_HINT
# The decoder step always runs in f32: in bf16 it changed 10% of resnet50-attention's dev
# captions (beam 5) against the torch fp32 path; f32 changed none. The encoder may run bf16.
DECODER_STEP_PRECISION = "fp32"


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


def openvino_cache_dir(cache_root: Path | None = None) -> Path:
    """``<cache_root>/openvino``; without a root ``$CAPTIONING_OV_CACHE``, else the feature
    cache's root (``$CAPTIONING_CACHE`` or ``~/.cache/captioning``), never the repository."""
    from captioning.features import default_cache_dir

    if cache_root is None and os.environ.get(OV_CACHE_ENV):
        return Path(os.environ[OV_CACHE_ENV]).expanduser()
    return Path(cache_root or default_cache_dir()) / OV_DIR


# ---------------------------------------------------------------- convert, cache, compile


@dataclass(frozen=True)
class CompileKey:
    """What a compiled model depends on: the graph, the weights, the precision, OpenVINO."""

    name: str  # e.g. "encoder-resnet50", "decoder-attention"
    weights_sha256: str
    precision: str  # "fp32" | "bf16"
    openvino: str  # package version

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.weights_sha256[:16]}-{self.precision}-ov{self.openvino}"

    def manifest(self) -> dict:
        return {
            "format": OV_FORMAT,
            "version": OV_FORMAT_VERSION,
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "openvino": self.openvino,
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


def _convert(build: Callable[[], nn.Module], inputs: Sequence[GraphInput], entry: Path, key):
    """Trace ``build()`` (fp32, eval) into OpenVINO IR at ``entry/model.xml``, atomically."""
    ov = openvino_module()
    _quiet_telemetry()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
        module = build().float().eval()
        examples = tuple(i.example() for i in inputs)
        spec = [(ov.PartialShape(list(i.shape)), _ov_type(ov, i.dtype)) for i in inputs]
        model = ov.convert_model(module, example_input=examples, input=spec)
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


def _entry_ok(entry: Path, key: CompileKey) -> bool:
    try:
        manifest = read_json(entry / "manifest.json")
    except (OSError, ValueError):
        return False
    files = all((entry / f).is_file() for f in ("model.xml", "model.bin"))
    return files and manifest == key.manifest()


_CORE: Any = None
_CORE_LOCK = threading.Lock()


def _core():
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = openvino_module().Core()
        return _CORE


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


def compile_graph(
    key: CompileKey,
    build: Callable[[], nn.Module],
    inputs: Sequence[GraphInput],
    *,
    threads: int | None = None,
    cache_root: Path | None = None,
):
    """An ``ov.CompiledModel`` of ``build()``, converted only when the cache has no valid entry.

    ``build`` is called only on a cache miss; it returns the fp32 torch module to trace.
    """
    entry = openvino_cache_dir(cache_root) / key.dirname
    n_threads = int(threads or torch.get_num_threads())
    config = {
        "INFERENCE_PRECISION_HINT": OV_HINTS[key.precision],
        "INFERENCE_NUM_THREADS": n_threads,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": pin_threads(n_threads),
        "CACHE_DIR": str(entry / "compiled"),
    }
    fresh = not _entry_ok(entry, key)
    if fresh:
        _convert(build, inputs, entry, key)
    try:
        return _core().compile_model(str(entry / "model.xml"), "CPU", config)
    except Exception:
        if fresh:
            raise
        _convert(build, inputs, entry, key)  # a damaged entry: rebuild it once
        return _core().compile_model(str(entry / "model.xml"), "CPU", config)


class _Compiled:
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


# ---------------------------------------------------------------- encoder


class _EncoderGraph(nn.Module):
    """What the encoder returns, as a traceable module: pooled [B, D] and grid [B, HW, C]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor):  # [B, 3, H, W] RGB in [0, 1]
        fmap = self.encoder.feature_map(images)  # [B, C, h, w]
        grid = fmap.flatten(2).transpose(1, 2)  # [B, hw, C]
        return grid.mean(1), grid


class OpenVINOEncoder(_Compiled):
    """A compiled encoder: ``encode(images [B,3,224,224])`` -> ``EncoderOutput`` (float32)."""

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        pooled, grid = self.infer([images.detach().float().numpy()])
        return EncoderOutput(pooled=pooled, grid=grid)


def openvino_encoder(
    encoder: LoadedEncoder,
    *,
    fp32_model: Callable[[], nn.Module] | None = None,
    input_size: int | None = None,
    threads: int | None = None,
    cache_root: Path | None = None,
) -> OpenVINOEncoder:
    """Compile a ``LoadedEncoder`` (dynamic batch). Raises on failure.

    ``fp32_model`` builds the module to trace (default: the encoder's own model if it is fp32,
    else a fresh fp32 build of the registered encoder, so bf16 rounding never reaches the IR).
    """
    if fp32_model is None:

        def fp32_model():
            if encoder.precision.dtype == "fp32":
                return encoder.model
            ref = build_encoder(encoder.spec.name, "fp32")
            if ref.sha256 != encoder.sha256:
                raise RuntimeError(f"the {encoder.spec.name} weights changed while loading")
            return ref.model

    side = input_size or INPUT_SIZE
    key = CompileKey(
        f"encoder-{encoder.spec.name}", encoder.sha256, encoder.precision.dtype, openvino_version()
    )
    compiled = compile_graph(
        key,
        lambda: _EncoderGraph(fp32_model()),
        [GraphInput((-1, 3, side, side))],
        threads=threads,
        cache_root=cache_root,
    )
    return OpenVINOEncoder(compiled, key)


def load_encoder(
    name: str, precision: str | Precision = "auto", runtime: str = "auto"
) -> LoadedEncoder:
    """A registered encoder (``LoadedEncoder``) on ``runtime``.

    When a compiled model is cached, the torch model is not built at all (``model`` is None):
    start-up then skips torchvision and the weights' conversion. Otherwise the torch encoder is
    built and compiled (or kept, on failure).
    """
    if resolve_runtime(runtime) == "openvino":
        prec = precision if isinstance(precision, Precision) else resolve_precision(precision)
        try:
            sha = weights_sha256(name)
        except FileNotFoundError:  # torchvision weights not downloaded: building fetches them
            sha = None
        cached = sha and cached_encoder(name, sha, prec, lambda: build_encoder(name, "fp32").model)
        if cached:
            return cached
    return accelerate_encoder(build_encoder(name, precision), runtime)


def cached_encoder(
    name: str, sha: str, prec: Precision, build: Callable[[], nn.Module] | None = None
) -> LoadedEncoder | None:
    """Encoder ``name`` whose weights have sha256 ``sha`` (a fine-tuned encoder's identity too),
    compiled from the cache without building its torch model (``model`` is None); None when the
    cache has no valid entry or it fails to load. ``build`` (the fp32 torch module) rebuilds a
    damaged entry; without it such an entry gives None, and the caller takes the slow path."""
    key = CompileKey(f"encoder-{name}", sha, prec.dtype, openvino_version())
    if not _entry_ok(openvino_cache_dir() / key.dirname, key):
        return None

    def graph() -> nn.Module:
        if build is None:
            raise RuntimeError("no torch model to rebuild a damaged compile-cache entry from")
        return _EncoderGraph(build())

    try:
        compiled = compile_graph(key, graph, [GraphInput((-1, 3, INPUT_SIZE, INPUT_SIZE))])
    except Exception:  # noqa: BLE001 - the slow path reports the failure
        return None
    engine = OpenVINOEncoder(compiled, key)
    return LoadedEncoder(None, get_spec(name), sha, _ov_precision(prec), engine=engine)


def accelerate_encoder(encoder: LoadedEncoder, runtime: str = "auto", **kwargs) -> LoadedEncoder:
    """``encoder`` with its forward pass on ``runtime`` (a LoadedEncoder either way).

    Falls back to the torch encoder, with a notice, when OpenVINO is missing or fails.
    """
    if resolve_runtime(runtime) == "torch":
        return replace(encoder, engine=None)
    try:
        engine = openvino_encoder(encoder, **kwargs)
    except Exception as e:  # noqa: BLE001 - any conversion/compile failure means "use torch"
        note(
            f"OpenVINO could not compile the {encoder.spec.name} encoder ({_one_line(e)}); "
            "running on torch"
        )
        return replace(encoder, engine=None)
    return replace(encoder, engine=engine, precision=_ov_precision(encoder.precision))


def _ov_precision(prec: Precision) -> Precision:
    """The precision an OpenVINO encoder records: its dtype (memory format is OpenVINO's)."""
    return replace(prec, channels_last=False)


# ---------------------------------------------------------------- decoder step


class _StepGraph(nn.Module):
    """``decoder.step`` as a traceable module: (context..., state..., word) -> (logp, state...[,
    alpha]); ``n_state`` state tensors (h, c for one LSTM; two pairs for ``updown``)."""

    def __init__(self, decoder: nn.Module, keys: Sequence[str], n_state: int) -> None:
        super().__init__()
        self.decoder, self.keys, self.n_state = decoder, tuple(keys), n_state

    def forward(self, *args):
        n = len(self.keys)
        ctx = dict(zip(self.keys, args[:n], strict=True))
        state, word = tuple(args[n : n + self.n_state]), args[n + self.n_state]
        logp, state, alpha = self.decoder.step(ctx, state, word)
        return (logp, *state) if alpha is None else (logp, *state, alpha)


class OpenVINODecoder(_Compiled):
    """A ``Decoder`` for decoding: ``step`` runs compiled, ``context``/``init_state``/``select``
    are the torch decoder's (they run once per image)."""

    def __init__(
        self, compiled, key: CompileKey, decoder, keys: Sequence[str], n_state: int = 2
    ) -> None:
        super().__init__(compiled, key)
        self.decoder, self.keys, self.n_state = decoder, tuple(keys), n_state
        self.cfg = decoder.cfg

    def context(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.context(feats)

    def init_state(self, ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.decoder.init_state(ctx)

    def select(self, ctx: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.select(ctx, idx)

    def step(self, ctx, state, word):
        """ctx tensors [B, ...], state tensors [B, H], word [B] -> logp [B, V], state, alpha."""
        arrays = [ctx[k].float().numpy() for k in self.keys]
        arrays += [s.float().numpy() for s in state] + [word.long().numpy()]
        out = self.infer(arrays)
        k = 1 + self.n_state
        return out[0], tuple(out[1:k]), (out[k] if len(out) > k else None)


def openvino_decoder(
    decoder,
    weights_sha256: str,
    precision: str,
    *,
    grid_cells: int | None = None,
    threads: int | None = None,
    cache_root: Path | None = None,
) -> OpenVINODecoder:
    """Compile ``decoder.step`` (dynamic batch) for a decoder whose weights hash to
    ``weights_sha256``. ``grid_cells`` (attention decoders) fixes the grid length. Raises on
    failure."""
    cfg = decoder.cfg
    keys = getattr(decoder, "step_keys", None)  # the per-image context its step reads
    if keys is None:
        raise ValueError(f"no OpenVINO step for decoder kind {cfg.kind!r}")
    # the context's and the state's shapes, read off one dummy image: batch dynamic, the grid
    # length fixed to ``grid_cells`` (or dynamic)
    dummy = torch.zeros((1, grid_cells or 1, cfg.feat_dim) if cfg.uses_grid else (1, cfg.feat_dim))
    with torch.no_grad():
        ctx = decoder.context(dummy)
        state = decoder.init_state(ctx)
    n_state = len(state)

    def dynamic(t: torch.Tensor) -> tuple[int, ...]:
        dims = list(t.shape)
        dims[0] = -1
        if t.dim() == 3 and not grid_cells:
            dims[1] = -1
        return tuple(dims)

    inputs = [GraphInput(dynamic(ctx[k])) for k in keys]
    inputs += [GraphInput(dynamic(s)) for s in state] + [GraphInput((-1,), torch.int64)]

    def build():
        import copy

        return _StepGraph(copy.deepcopy(decoder), keys, n_state)  # a copy: .float() keeps it

    key = CompileKey(f"decoder-{cfg.kind}", weights_sha256, precision, openvino_version())
    compiled = compile_graph(key, build, inputs, threads=threads, cache_root=cache_root)
    return OpenVINODecoder(compiled, key, decoder, keys, n_state)


def accelerate_decoder(decoder, weights_sha256: str, precision: str, runtime: str = "auto", **kw):
    """The decoder to decode with on ``runtime``: an ``OpenVINODecoder``, or ``decoder`` itself
    (torch) when the runtime is torch or the compile fails (with a notice)."""
    if resolve_runtime(runtime) == "torch":
        return decoder
    try:
        return openvino_decoder(decoder, weights_sha256, precision, **kw)
    except Exception as e:  # noqa: BLE001 - any conversion/compile failure means "use torch"
        note(
            f"OpenVINO could not compile the {decoder.cfg.kind} decoder step ({_one_line(e)}); "
            "running it on torch"
        )
        return decoder


def runtime_of(model) -> str:
    """What runs ``model``: "openvino" for compiled engines, else "torch"."""
    engine = getattr(model, "engine", model)
    return getattr(engine, "runtime", "torch") if engine is not None else "torch"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
