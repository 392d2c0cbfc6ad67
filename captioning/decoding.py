"""Greedy and batched beam-search decoding for any ``Decoder``.

Special ids come from the vocabulary format: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioning.decoders import Decoder
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID

NEG = -1e9


@dataclass
class DecodeConfig:
    beam_size: int = 3
    max_len: int = 20  # generated words, <end> excluded
    min_len: int = 1  # words before <end> may be emitted
    length_alpha: float = 0.0  # final score = logprob / len**alpha (0 = raw log-prob)
    block_unk: bool = True
    n_best: int = 5


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, no <start>/<end>
    logprob: float  # sum of log-probs, <end> included when emitted
    score: float  # length-normalised score used for ranking
    finished: bool  # emitted <end>
    attention: torch.Tensor | None = None  # [len(tokens), L] for attention decoders


def _blocked(logp: torch.Tensor, t: int, cfg: DecodeConfig) -> torch.Tensor:
    """Forbid <pad>, <start>, optionally <unk>, and <end> before min_len. logp [B, V]."""
    logp = logp.clone()
    logp[:, PAD_ID] = NEG
    logp[:, START_ID] = NEG
    if cfg.block_unk:
        logp[:, UNK_ID] = NEG
    if t < cfg.min_len:
        logp[:, END_ID] = NEG
    return logp


def _length_score(logprob: float, n_tokens: int, alpha: float) -> float:
    return logprob / max(n_tokens, 1) ** alpha if alpha else logprob


@torch.inference_mode()
def greedy_decode(
    decoder: Decoder, feats: torch.Tensor, cfg: DecodeConfig | None = None
) -> list[Hypothesis]:
    """Argmax decoding of a batch. feats: pooled [N, D] or grid [N, L, C]."""
    cfg = cfg or DecodeConfig(beam_size=1)
    ctx = decoder.context(feats)
    state = decoder.init_state(ctx)
    n = feats.shape[0]
    word = torch.full((n,), START_ID, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    logprob = torch.zeros(n)
    tokens, alphas = [], []
    for t in range(cfg.max_len + 1):
        logp, state, alpha = decoder.step(ctx, state, word)
        logp = _blocked(logp, t, cfg)
        if t == cfg.max_len:  # out of room: only <end> is left
            best_lp, word = logp[:, END_ID], torch.full((n,), END_ID, dtype=torch.long)
        else:
            best_lp, word = logp.max(-1)
        logprob += torch.where(done, torch.zeros_like(best_lp), best_lp)
        tokens.append(torch.where(done, torch.full_like(word, PAD_ID), word))
        if alpha is not None:
            alphas.append(alpha)
        done |= word == END_ID
        if done.all():
            break
    seq = torch.stack(tokens, 1)  # [N, T]
    att = torch.stack(alphas, 1) if alphas else None  # [N, T, L]
    out = []
    for i in range(n):
        ids = seq[i].tolist()
        words = ids[: ids.index(END_ID)] if END_ID in ids else [x for x in ids if x != PAD_ID]
        lp = float(logprob[i])
        out.append(
            Hypothesis(
                words,
                lp,
                _length_score(lp, len(words) + 1, cfg.length_alpha),
                True,
                att[i, : len(words)].clone() if att is not None else None,
            )
        )
    return out


@torch.inference_mode()
def beam_search(
    decoder: Decoder, feats: torch.Tensor, cfg: DecodeConfig | None = None
) -> list[list[Hypothesis]]:
    """Batched beam search over N images at once; returns each image's n-best list, best first.

    Finished beams keep their slot and their score (they can only extend with a free <pad>).
    Beams that never emit <end> by ``max_len`` are closed there. Ranking uses
    logprob / (words + 1) ** length_alpha.
    """
    cfg = cfg or DecodeConfig()
    k, n = cfg.beam_size, feats.shape[0]
    ctx = decoder.select(decoder.context(feats), torch.arange(n).repeat_interleave(k))
    state = decoder.init_state(ctx)
    word = torch.full((n * k,), START_ID, dtype=torch.long)
    scores = torch.full((n, k), NEG)
    scores[:, 0] = 0.0  # only one live beam at the start, so the k beams differ
    finished = torch.zeros(n * k, dtype=torch.bool)
    seqs = torch.zeros(n * k, 0, dtype=torch.long)
    atts: torch.Tensor | None = None  # [N*k, t, L]
    for t in range(cfg.max_len + 1):
        logp, state, alpha = decoder.step(ctx, state, word)  # [N*k, V]
        logp = _blocked(logp, t, cfg)
        if t == cfg.max_len:
            forced = torch.full_like(logp, NEG)
            forced[:, END_ID] = logp[:, END_ID]
            logp = forced
        # a finished beam continues only with <pad>, at no cost
        logp[finished] = NEG
        logp[finished, PAD_ID] = 0.0
        vocab = logp.shape[-1]
        cand = (scores.view(n * k, 1) + logp).view(n, k * vocab)  # [N, k*V]
        scores, flat = cand.topk(k, dim=-1)  # [N, k]
        beam = flat // vocab + torch.arange(n)[:, None] * k  # [N, k] rows in N*k
        word = (flat % vocab).view(-1)
        beam = beam.view(-1)
        state = tuple(s.index_select(0, beam) for s in state)
        finished = finished.index_select(0, beam) | (word == END_ID) | (word == PAD_ID)
        seqs = torch.cat([seqs.index_select(0, beam), word[:, None]], 1)
        if alpha is not None:
            a = alpha.index_select(0, beam)[:, None]
            atts = a if atts is None else torch.cat([atts.index_select(0, beam), a], 1)
        if finished.all():
            break
    return _collect(seqs, scores.view(-1), atts, n, k, cfg)


def _collect(seqs, scores, atts, n, k, cfg) -> list[list[Hypothesis]]:
    out = []
    for i in range(n):
        hyps = []
        for j in range(i * k, (i + 1) * k):
            lp = float(scores[j])
            if lp <= NEG / 2:
                continue
            ids = seqs[j].tolist()
            ended = END_ID in ids
            words = ids[: ids.index(END_ID)] if ended else [x for x in ids if x != PAD_ID]
            att = atts[j, : len(words)].clone() if atts is not None else None
            score = _length_score(lp, len(words) + 1, cfg.length_alpha)
            hyps.append(Hypothesis(words, lp, score, ended, att))
        hyps.sort(key=lambda h: h.score, reverse=True)
        out.append(hyps[: cfg.n_best])
    return out


def decode(decoder: Decoder, feats: torch.Tensor, cfg: DecodeConfig) -> list[list[Hypothesis]]:
    """Beam search for beam_size > 1, greedy for 1; always returns n-best lists."""
    if cfg.beam_size <= 1:
        return [[h] for h in greedy_decode(decoder, feats, cfg)]
    return beam_search(decoder, feats, cfg)
