"""The decoder step on OpenVINO: one compiled graph per bundle and grid size.

``accelerate_decoder`` returns an object with the decoder's ``context``/``init_state``/
``select``/``step`` interface whose step runs compiled (torch where compiling fails); the beam
search (``captioning.models.decoding``) cannot tell the two apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from captioning.core.machine import INT8
from captioning.runtime.openvino import (
    CompiledGraph,
    CompileKey,
    GraphInput,
    compile_graph,
    note,
    one_line,
    openvino_version,
    resolve_runtime,
)
from captioning.runtime.quantize import compress_step, nncf_version

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


class OpenVINODecoder(CompiledGraph):
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

    int8 = precision == INT8
    key = CompileKey(
        f"decoder-{cfg.kind}",
        weights_sha256,
        precision,
        openvino_version(),
        nncf=(nncf_version() or "") if int8 else "",
    )
    compiled = compile_graph(
        key,
        build,
        inputs,
        threads=threads,
        cache_root=cache_root,
        transform=compress_step if int8 else None,
    )
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
            f"OpenVINO could not compile the {decoder.cfg.kind} decoder step ({one_line(e)}); "
            "running it on torch"
        )
        return decoder


def torch_step(step: str, runtime: str) -> str:
    """The decoder step's precision on torch: int8 weights are OpenVINO's, so an explicit
    ``runtime="torch"`` with them is a ValueError, and OpenVINO's absence gives fp32."""
    if step != INT8:
        return step
    if runtime == "torch":
        raise ValueError("int8 decoder weights run on OpenVINO; use --runtime openvino (or auto)")
    return "fp32"


def runtime_of(model) -> str:
    """What runs ``model``: "openvino" for compiled engines, else "torch"."""
    engine = getattr(model, "engine", model)
    return getattr(engine, "runtime", "torch") if engine is not None else "torch"
