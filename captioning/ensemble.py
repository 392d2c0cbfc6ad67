"""Ensembles of bundles that share a vocabulary: one beam search over their averaged word
probabilities.

An ensemble bundle ``artifacts/models/NAME/`` holds no weights: ``config.json`` names its
members (sibling bundles in the same models directory) with their weights and the sha256 of
their weight files, ``vocab.json`` is the vocabulary they all share, and the usual metrics,
predictions, bench and card describe the ensemble. At each step every member runs its own
decoder on its own encoder's features and the ensemble scores a word by

    log p(w) = log sum_i weight_i * p_i(w)        (the members' probabilities averaged)

so the beam search, n-gram blocking and length normalisation work unchanged
(``captioning.decoding``). ``make_ensemble`` writes a bundle; ``Captioner.load`` of it returns an
``EnsembleCaptioner``.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from captioning.bundle import (
    BUNDLE_FORMAT,
    ENSEMBLE_KIND,
    BundleError,
    bundle_decoding,
    check_out_empty,
    clear_model_outputs,
    member_weights,
    resolve_bundle,
    shared_vocabulary,
    single_model_configs,
    weights_fingerprint,
    write_records,
)
from captioning.captioner import Captioner
from captioning.decoding import DecodeConfig, Hypothesis, decode
from captioning.fileio import atomic_write_json
from captioning.vocab import Vocabulary


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


class EnsembleCaptioner(Captioner):
    """A ``Captioner`` whose encoding is every member's and whose decoder is ``EnsembleStep``."""

    def __init__(self, path: Path, config: dict, members: list[Captioner], vocab: Vocabulary):
        weights = [m["weight"] for m in config["members"]]
        self.path, self.config, self.members, self.vocab = path, config, members, vocab
        self.name = path.name
        self.defaults = bundle_decoding(config)
        self.decoder = EnsembleStep([m.decoder for m in members], weights)  # the torch reference
        self.step_decoder = EnsembleStep([m.step_decoder for m in members], weights)
        self.runtime = _joined(m.runtime for m in members)

    @classmethod
    def load_ensemble(
        cls, path: Path, config: dict, precision: str = "auto", runtime: str = "torch"
    ) -> EnsembleCaptioner:
        """Load each member from the ensemble's own models directory and check that it is the
        member the ensemble was made and scored with."""
        vocab = Vocabulary.load(path / "vocab.json")
        paths = check_members(path, config, vocab)
        members = [Captioner.load(p, precision, runtime=runtime) for p in paths]
        return cls(path, config, members, vocab)

    @property
    def uses_grid(self) -> bool:
        return any(m.uses_grid for m in self.members)

    @property
    def precision_label(self) -> str:
        return _joined(m.precision_label for m in self.members)

    @property
    def encoder_label(self) -> str:
        return _joined(m.encoder_label for m in self.members)

    @property
    def encoder_on_torch(self) -> bool:
        return any(m.encoder_on_torch for m in self.members)

    def decode_features(self, feats: MemberFeatures, cfg: DecodeConfig) -> list[list[Hypothesis]]:
        return decode(self.step_decoder, feats.float(), cfg)

    def _encode(self, x: torch.Tensor | None) -> tuple[MemberFeatures | None, float]:
        """pixels [N, 3, 224, 224] -> (each member's features, seconds); members that share an
        encoder share its encoding."""
        if x is None:
            return None, 0.0
        t0 = time.perf_counter()
        done: dict[tuple[int, bool], torch.Tensor] = {}
        feats = []
        for m in self.members:
            key = (id(m.encoder), m.uses_grid)
            if key not in done:
                done[key] = m._encode(x)[0]
            feats.append(done[key])
        return MemberFeatures(feats), time.perf_counter() - t0


def check_members(path: Path, config: dict, vocab: Vocabulary | None = None) -> list[Path]:
    """The member bundles of the ensemble at ``path``, each in place, unchanged since the ensemble
    was made and with its vocabulary (``vocab``: the ensemble's, when already loaded); raises
    BundleError otherwise (nothing is loaded)."""
    vocab = vocab or Vocabulary.load(path / "vocab.json")
    paths = []
    for m in config["members"]:
        member_path = _member_path(path, m["name"])
        _check_member(path, member_path, m, vocab)
        paths.append(member_path)
    return paths


def _joined(labels) -> str:
    """The members' distinct labels in order, e.g. ``openvino`` or ``bf16+cl/fp32``."""
    return "/".join(dict.fromkeys(labels))


def _member_path(path: Path, name: str) -> Path:
    try:
        return resolve_bundle(name, path.parent)
    except BundleError:
        raise BundleError(
            f"ensemble {path.name} needs the bundle {name!r} beside it in {path.parent}"
        ) from None


def _check_member(path: Path, member: Path, entry: dict, vocab: Vocabulary) -> None:
    if weights_fingerprint(member) != entry["sha256"]:
        raise BundleError(
            f"{member.name}'s weights changed since ensemble {path.name} was made and scored; "
            f"make it again (python -m captioning ensemble … --out {path} --force)"
        )
    if Vocabulary.load(member / "vocab.json").itos != vocab.itos:
        raise BundleError(f"{member.name}'s vocabulary differs from ensemble {path.name}'s")


def make_ensemble(
    out: Path,
    members: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    commit: str | None = None,
    force: bool = False,
) -> dict:
    """Write the ensemble bundle ``out`` of ``members`` (bundle names in ``out``'s directory).

    ``weights`` default to equal; they are normalised to sum to 1. The default decoding starts
    as the first member's (choose it on dev with ``tune-decoding --apply``). Returns the config.
    """
    weights = member_weights(members, weights)
    check_out_empty(out, force)
    paths = [_member_path(out, name) for name in members]
    configs = single_model_configs(paths)
    vocab = shared_vocabulary(paths)
    first = configs[0]
    config = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "kind": ENSEMBLE_KIND,
        "name": out.name,
        "encoder": ",".join(dict.fromkeys(c["encoder"] for c in configs)),  # "+" marks a block
        "decoder": ENSEMBLE_KIND,
        "members": [
            {"name": p.name, "weight": w, "sha256": weights_fingerprint(p)}
            for p, w in zip(paths, weights, strict=True)
        ],
        "precision": _joined(c["precision"] for c in configs),
        "runtime": _joined(c["runtime"] for c in configs),
        "data": first.get("data"),
        "decode_defaults": first.get("decode_defaults", asdict(DecodeConfig())),
        "git_commit": commit,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    clear_model_outputs(out)
    vocab.save(out / "vocab.json")
    atomic_write_json(out / "config.json", config)
    write_records(out, [], config)
    return config
