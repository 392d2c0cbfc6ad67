"""Encoders ready to run: shared per process, compiled on OpenVINO when asked, fine-tuned blocks.

``shared_encoder(name, precision, runtime)`` is the one encoder a process keeps per setting;
``load_encoder`` compiles it on OpenVINO (from the compile cache without building the torch model
when it can) or keeps it on torch; ``tuned_encoder`` swaps a bundle's fine-tuned block into a copy
of the shared trunk. Precision int8 quantises the compiled graph (``captioning.runtime.quantize``).
Whatever fails to compile runs on torch with a notice; int8 without NNCF or OpenVINO runs at the
``auto`` precision, with a notice.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from captioning.core.machine import INT8, Precision, resolve_precision
from captioning.core.paths import openvino_cache_dir
from captioning.core.settings import DATA_ENV
from captioning.models.blocks import TunedBlock, swap_block, tuned_sha256
from captioning.models.encoders import (
    INPUT_SIZE,
    EncoderOutput,
    LoadedEncoder,
    build_encoder,
    get_spec,
    weights_sha256,
)
from captioning.runtime.openvino import (
    CompiledGraph,
    CompileKey,
    GraphInput,
    Transform,
    compile_graph,
    entry_ok,
    note,
    one_line,
    openvino_version,
    resolve_runtime,
)
from captioning.runtime.quantize import (
    CalibrationSet,
    calibration_sets,
    nncf_version,
    quantize_encoder,
)


def shared_encoder(
    name: str, precision: str | Precision = "auto", runtime: str = "torch"
) -> LoadedEncoder:
    """One encoder per (name, precision, runtime) in this process, shared by all its users
    (``precision`` by name or resolved: "fp32" and ``resolve_precision("fp32")`` share one).

    ``runtime`` "auto"/"openvino" compiles the forward pass (``captioning.runtime.openvino``);
    a failed compile falls back to torch with a notice, so check ``.runtime`` for what runs.
    """
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision)
    return _shared_encoder(name, prec, runtime)


@functools.lru_cache(maxsize=8)
def _shared_encoder(name: str, prec: Precision, runtime: str) -> LoadedEncoder:
    if runtime == "torch":
        return build_encoder(name, torch_precision(prec, runtime))
    return load_encoder(name, prec, runtime)


shared_encoder.cache_info = _shared_encoder.cache_info  # the shared cache's own controls
shared_encoder.cache_clear = _shared_encoder.cache_clear


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


class OpenVINOEncoder(CompiledGraph):
    """A compiled encoder: ``encode(images [B,3,224,224])`` -> ``EncoderOutput`` (float32);
    ``precision`` is what it runs at (an int8 one names its calibration set)."""

    precision: Precision

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
            if encoder.precision.dtype in ("fp32", INT8):  # int8 holds its fp32 model
                return encoder.model
            ref = build_encoder(encoder.spec.name, "fp32")
            if ref.sha256 != encoder.sha256:
                raise RuntimeError(f"the {encoder.spec.name} weights changed while loading")
            return ref.model

    side = input_size or INPUT_SIZE
    spec, sha = encoder.spec, encoder.sha256
    key, prec, transform = encoder_key(spec.name, sha, encoder.precision, cache_root)
    compiled = compile_graph(
        key,
        lambda: _EncoderGraph(fp32_model()),
        [GraphInput((-1, 3, side, side))],
        threads=threads,
        cache_root=cache_root,
        transform=transform,
    )
    engine = OpenVINOEncoder(compiled, key)
    engine.precision = prec
    return engine


def encoder_key(
    name: str, sha: str, prec: Precision, cache_root: Path | None = None
) -> tuple[CompileKey, Precision, Transform | None]:
    """The compile-cache key that serves encoder ``name`` (weights ``sha``) at ``prec``: (key,
    the precision it records, the transform that builds it). int8 takes the first calibration
    set (the recorded train photos before the samples' set) whose model is cached or whose
    photos are here."""
    ov = openvino_version()
    if prec.dtype != INT8:
        return CompileKey(f"encoder-{name}", sha, prec.dtype, ov), _ov_precision(prec), None
    sets = calibration_sets()
    for s in sets:
        key = CompileKey(f"encoder-{name}", sha, INT8, ov, s.key, nncf_version() or "")
        if entry_ok(openvino_cache_dir(cache_root) / key.dirname, key) or s.sources():
            return key, replace(prec, calibration=s.precision_tag), quantize_encoder(s)
    raise FileNotFoundError(
        f"no calibration photos for int8: set {DATA_ENV} to the Flickr8k folder, or restore "
        "artifacts/samples"
    )


def int8_ready(prec: Precision) -> Precision:
    """``prec``, or the ``auto`` precision with a notice when int8 cannot run here (no NNCF)."""
    if prec.dtype == INT8 and nncf_version() is None:
        note("int8 needs NNCF (pip install nncf); running at the auto precision")
        return resolve_precision("auto", prec.device)
    return prec


def load_encoder(
    name: str, precision: str | Precision = "auto", runtime: str = "auto"
) -> LoadedEncoder:
    """A registered encoder (``LoadedEncoder``) on ``runtime``.

    When a compiled model is cached, the torch model is not built at all (``model`` is None):
    start-up then skips torchvision and the weights' conversion. Otherwise the torch encoder is
    built and compiled (or kept, on failure).
    """
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision)
    if resolve_runtime(runtime) != "openvino":
        return build_encoder(name, torch_precision(prec, runtime))
    prec = int8_ready(prec)
    try:
        sha = weights_sha256(name)
    except FileNotFoundError:  # torchvision weights not downloaded: building fetches them
        sha = None
    cached = sha and cached_encoder(name, sha, prec, lambda: build_encoder(name, "fp32").model)
    if cached:
        return cached
    return accelerate_encoder(build_encoder(name, _fp32_if_int8(prec)), runtime, precision=prec)


def torch_precision(prec: Precision, runtime: str) -> Precision:
    """``prec`` for an encoder that runs on torch: int8 is OpenVINO's, so an explicit
    ``runtime="torch"`` with int8 is a ValueError, and OpenVINO's absence gives the ``auto``
    precision with a notice."""
    if prec.dtype != INT8:
        return prec
    if runtime == "torch":
        raise ValueError("int8 runs on OpenVINO; use --runtime openvino (or auto)")
    note("int8 runs on OpenVINO, which is not available; running at the auto precision")
    return resolve_precision("auto", prec.device)


def _fp32_if_int8(prec: Precision) -> Precision:
    """What torch builds for ``prec`` on the way to OpenVINO: for int8 the fp32 model that is
    traced and quantised (and runs, when OpenVINO fails)."""
    return Precision("fp32", device=prec.device) if prec.dtype == INT8 else prec


def cached_encoder(
    name: str, sha: str, prec: Precision, build: Callable[[], nn.Module] | None = None
) -> LoadedEncoder | None:
    """Encoder ``name`` whose weights have sha256 ``sha`` (a fine-tuned encoder's identity too),
    compiled from the cache without building its torch model (``model`` is None); None when the
    cache has no valid entry or it fails to load. ``build`` (the fp32 torch module) rebuilds a
    damaged entry; without it such an entry gives None, and the caller takes the slow path."""
    key, recorded, transform = encoder_key(name, sha, prec)
    if not entry_ok(openvino_cache_dir() / key.dirname, key):
        return None

    def graph() -> nn.Module:
        if build is None:
            raise RuntimeError("no torch model to rebuild a damaged compile-cache entry from")
        return _EncoderGraph(build())

    inputs = [GraphInput((-1, 3, INPUT_SIZE, INPUT_SIZE))]
    try:
        compiled = compile_graph(key, graph, inputs, transform=transform)
    except Exception:  # noqa: BLE001 - the slow path reports the failure
        return None
    engine = OpenVINOEncoder(compiled, key)
    engine.precision = recorded
    return LoadedEncoder(None, get_spec(name), sha, recorded, engine=engine)


def accelerate_encoder(
    encoder: LoadedEncoder, runtime: str = "auto", precision: Precision | None = None, **kwargs
) -> LoadedEncoder:
    """``encoder`` with its forward pass on ``runtime`` (a LoadedEncoder either way), compiled
    at ``precision`` (default: the encoder's own; int8 quantises the fp32 graph).

    Falls back to the torch encoder, with a notice, when OpenVINO is missing or fails.
    """
    if resolve_runtime(runtime) == "torch":
        return replace(encoder, engine=None)
    target = int8_ready(precision or encoder.precision)
    try:
        engine = openvino_encoder(replace(encoder, precision=target), **kwargs)
    except Exception as e:  # noqa: BLE001 - any conversion/compile failure means "use torch"
        note(
            f"OpenVINO could not compile the {encoder.spec.name} encoder at {target.dtype} "
            f"({one_line(e)}); running on torch"
        )
        return replace(encoder, engine=None)
    return replace(encoder, engine=engine, precision=engine.precision)


def _ov_precision(prec: Precision) -> Precision:
    """The precision an OpenVINO encoder records: its dtype (memory format is OpenVINO's)."""
    return replace(prec, channels_last=False)


_TUNED: dict[tuple, LoadedEncoder] = {}  # one tuned encoder per (block file, precision, runtime)
_TUNED_LOCK = threading.Lock()
MAX_TUNED = 8


def cached_tuned_encoder(
    encoder: str, encoder_sha256: str, block: TunedBlock, precision: str | Precision
) -> LoadedEncoder | None:
    """A fine-tuned encoder straight from the OpenVINO compile cache, without building the torch
    trunk (torchvision's import and the weights' load are most of ``caption``'s start-up); None
    when it is not cached, or when the shipped weights of ``encoder`` are not ``encoder_sha256``
    (the slow path then says so)."""
    try:
        base_sha = weights_sha256(encoder)
    except FileNotFoundError:
        return None
    if base_sha != encoder_sha256:
        return None
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision)
    key = (encoder, base_sha, prec, block.spec.name, block.sha256, "openvino")
    if (known := _recall(key)) is not None:
        return known
    enc = cached_encoder(encoder, tuned_sha256(base_sha, block.spec.name, block.sha256), prec)
    return None if enc is None else _remember(key, enc)


def _recall(key: tuple) -> LoadedEncoder | None:
    with _TUNED_LOCK:
        return _TUNED.get(key)


def _remember(key: tuple, enc: LoadedEncoder) -> LoadedEncoder:
    """Keep ``enc`` under ``key`` (at most ``MAX_TUNED``, oldest out); returns the kept one."""
    with _TUNED_LOCK:
        if len(_TUNED) >= MAX_TUNED:
            _TUNED.pop(next(iter(_TUNED)))
        return _TUNED.setdefault(key, enc)


def tuned_encoder(
    base: LoadedEncoder, block: TunedBlock, runtime: str, precision: Precision | None = None
) -> LoadedEncoder:
    """``base`` (the shared torch encoder, already checked against the bundle's record) with the
    fine-tuned ``block`` swapped into a copy; ``base`` is untouched.

    ValueError when the block's weights do not fit. ``runtime`` "openvino" compiles the tuned
    encoder (an fp32 trace) under its own identity at ``precision`` (default: ``base``'s; int8
    quantises the block with its trunk); a failed compile runs it on torch.
    """
    spec, sha, path = block
    target = precision or base.precision
    key = (base.spec.name, base.sha256, target, spec.name, sha, runtime)
    if (known := _recall(key)) is not None:
        return known
    try:
        state = load_file(str(path))
        model = swap_block(base.model, spec, state)
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: {e}") from None
    enc = LoadedEncoder(model, base.spec, tuned_sha256(base.sha256, spec.name, sha), base.precision)
    if runtime != "torch":

        def fp32_model() -> nn.Module:  # traced in fp32, so bf16 rounding never reaches the IR
            if base.precision.dtype == "fp32":
                return model
            ref = build_encoder(base.spec.name, "fp32")
            return swap_block(ref.model, spec, state)

        enc = accelerate_encoder(enc, runtime, target, fp32_model=fp32_model)
    return _remember(key, enc)


def int8_cached(name: str, sha: str, calibration: CalibrationSet) -> bool:
    """Whether encoder ``name`` (identity ``sha``) quantised on ``calibration`` is cached."""
    key = CompileKey(
        f"encoder-{name}", sha, INT8, openvino_version(), calibration.key, nncf_version() or ""
    )
    return entry_ok(openvino_cache_dir() / key.dirname, key)
