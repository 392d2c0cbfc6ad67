"""The ensemble's decoder: several decoders' word probabilities averaged at every step.

``EnsembleStep`` has the decoder-step interface (``context``/``init_state``/``select``/``step``),
so the beam search runs an ensemble unchanged; ``MemberFeatures`` carries one feature tensor per
member through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class MemberFeatures(tuple):
    """One feature tensor per member ([N, D] pooled or [N, L, C] grid), sliced together."""

    @property
    def shape(self) -> torch.Size:  # the decoding loop reads the batch size from shape[0]
        return self[0].shape

    def __getitem__(self, index):
        if isinstance(index, slice):
            return MemberFeatures(f[index] for f in self)
        return tuple.__getitem__(self, index)

    def float(self) -> MemberFeatures:
        return MemberFeatures(f.float() for f in self)


class EnsembleStep:
    """The members' decoder steps as one decoder (``context``/``init_state``/``select``/``step``).

    The context is one dict with each member's keys prefixed by its index; the state is the
    members' state tensors one after another. ``step`` returns the attention of the first member
    that attends (None if none does).
    """

    def __init__(self, decoders: Sequence, weights: Sequence[float]) -> None:
        self.decoders = list(decoders)
        self.log_w = torch.tensor([math.log(w) for w in weights])  # [M]
        self.sizes: list[int] = []  # state tensors per member, set by init_state

    def context(self, feats: MemberFeatures) -> dict[str, torch.Tensor]:
        ctx = {}
        for i, (dec, f) in enumerate(zip(self.decoders, feats, strict=True)):
            ctx.update({f"{i}.{k}": v for k, v in dec.context(f).items()})
        return ctx

    @staticmethod
    def _member(ctx: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        prefix = f"{i}."
        return {k[len(prefix) :]: v for k, v in ctx.items() if k.startswith(prefix)}

    def init_state(self, ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        states = [dec.init_state(self._member(ctx, i)) for i, dec in enumerate(self.decoders)]
        self.sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)

    @staticmethod
    def select(ctx: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.index_select(0, idx) for k, v in ctx.items()}

    def step(self, ctx, state, word):
        """word [B] -> (log-probs [B, V] of the weighted mean of the members' probabilities,
        the new state, attention [B, L] or None)."""
        logps, new, alpha, j = [], [], None, 0
        for i, dec in enumerate(self.decoders):
            lp, s, a = dec.step(self._member(ctx, i), state[j : j + self.sizes[i]], word)
            j += self.sizes[i]
            logps.append(lp.float())
            new.extend(s)
            alpha = a if alpha is None else alpha
        mixed = torch.logsumexp(torch.stack(logps) + self.log_w[:, None, None], 0)  # [B, V]
        return mixed, tuple(new), alpha
