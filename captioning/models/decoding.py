"""Greedy and batched beam-search decoding for any ``Decoder``.

Special ids come from the vocabulary format: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3.

Beam search is the standard one (GNMT, fairseq, Hugging Face):

* Each image has ``k`` live hypotheses and a pool of finished ones. The pool holds the
  ``min(n_best, k)`` best finished captions by the length-normalised score
  ``logprob / (words + 1) ** length_alpha`` (``<end>`` counts as a token; α=0 is the raw
  log-prob). This is the plain ``len ** α`` (Hugging Face's ``length_penalty``), not GNMT's
  ``((5 + len) / 6) ** α``; the shipped bundles' α was tuned on dev with it.
* Each step ranks the ``k·V`` extensions by summed log-prob (all live hypotheses have the same
  length, so this is also the normalised order) and keeps the ``2k`` best. Those ending in
  ``<end>`` among the top ``k`` join the pool. The first ``k`` that do not end form the new live
  beam, so the beam never narrows as captions end.
* An image is done when no live hypothesis can still enter its pool. Log-probs are <= 0, so a
  live hypothesis with summed log-prob ``lp`` can reach at most ``lp / (max_len + 1) ** α``
  (an exact upper bound, as Hugging Face's ``early_stopping="never"``; for α=0 it is ``lp``
  itself). The early stop therefore returns exactly what running to ``max_len`` returns. With
  ``n_best=1`` the rule is "no live hypothesis can beat the best finished one".
  A batch steps until its last image is done; the pools of done images cannot change.
* At ``max_len`` words only ``<end>`` is allowed, which closes the live hypotheses.

``no_repeat_ngram=n`` forbids any word that would complete an n-gram already in the hypothesis
(greedy and beam). A ``prefix`` of word ids is forced as the caption's first words; the search
continues from it, and length normalisation and n-gram blocking count it as part of the caption.
The step loop is batched over images and beams; the words, back-pointers, summed log-probs and
attention of each step are kept in tensors, and the n-best lists are traced back once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from captioning.models.decoders import Decoder

NEG = -1e9  # log-prob of a forbidden word; hypotheses at or below NEG / 2 are dead
MAX_BEAM = 10  # largest beam_size accepted anywhere (the CLI's --beam too)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


@dataclass
class DecodeConfig:
    beam_size: int = 3  # 1 = greedy
    max_len: int = 20  # generated words, <end> excluded
    min_len: int = 1  # words before <end> may be emitted
    length_alpha: float = 0.0  # score = logprob / (words + 1) ** alpha (0 = raw log-prob)
    block_unk: bool = True
    n_best: int = 5  # hypotheses returned per image (at most beam_size)
    no_repeat_ngram: int = 0  # forbid repeating any n-gram of this size (0 = off)

    def __post_init__(self) -> None:
        _check_int("beam_size", self.beam_size, 1, MAX_BEAM)
        _check_int("max_len", self.max_len, 1)
        _check_int("min_len", self.min_len, 0, self.max_len)
        _check_int("n_best", self.n_best, 1)
        _check_int("no_repeat_ngram", self.no_repeat_ngram, 0)
        a = self.length_alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0:
            raise ValueError(f"length_alpha must be a number >= 0, got {a!r}")
        if not isinstance(self.block_unk, bool):
            raise ValueError(f"block_unk must be true or false, got {self.block_unk!r}")


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, no <start>/<end>
    logprob: float  # sum of log-probs, <end> included when emitted
    score: float  # length-normalised score used for ranking
    finished: bool  # emitted <end>
    attention: torch.Tensor | None = None  # [len(tokens), L] for attention decoders
    token_logprobs: list[float] | None = None  # [len(tokens) + 1]: each word's, then <end>'s


def _length_score(logprob: float, n_tokens: int, alpha: float) -> float:
    return logprob / max(n_tokens, 1) ** alpha if alpha else logprob


def check_prefix(prefix: Sequence[int], cfg: DecodeConfig) -> tuple[int, ...]:
    """The forced first words as a tuple; ValueError when they cannot start a caption."""
    ids = tuple(prefix)
    if any(not isinstance(i, int) or i in (PAD_ID, START_ID, END_ID, UNK_ID) for i in ids):
        raise ValueError(f"a prefix holds word ids, not special tokens: {ids}")
    if len(ids) > cfg.max_len:
        raise ValueError(f"the prefix has {len(ids)} words; a caption has at most {cfg.max_len}")
    return ids


class NextWordRules:
    """Which next words are allowed at step t; builds its [V] masks once per search.

    ``prefix``: word ids forced at steps 0..len-1 (whatever the other rules say).
    """

    def __init__(self, cfg: DecodeConfig, vocab_size: int, prefix: Sequence[int] = ()) -> None:
        self.cfg = cfg
        self.prefix = check_prefix(prefix, cfg)
        self.bias = torch.zeros(vocab_size)  # [V], added to the log-probs
        self.bias[[PAD_ID, START_ID, UNK_ID] if cfg.block_unk else [PAD_ID, START_ID]] = NEG
        self.early = self.bias.clone()  # before min_len: no <end> either
        self.early[END_ID] = NEG

    def apply(self, logp: torch.Tensor, t: int, history: torch.Tensor | None) -> torch.Tensor:
        """logp [B, V] at step t -> a new [B, V] with forbidden words at NEG or below.

        history [B, >= t]: the words of steps 0..t-1 of each row (for n-gram blocking).
        """
        cfg = self.cfg
        if t < len(self.prefix) or t == cfg.max_len:  # a forced word, or out of room: <end>
            word = self.prefix[t] if t < len(self.prefix) else END_ID
            out = torch.full_like(logp, NEG)
            out[:, word] = logp[:, word]
            return out
        out = logp + (self.early if t < cfg.min_len else self.bias)
        n = cfg.no_repeat_ngram
        if n and history is not None and t >= n:
            _ban_repeats(out, history[:, :t], n)
        return out


def _ban_repeats(logp: torch.Tensor, words: torch.Tensor, n: int) -> None:
    """In place: forbid each word that would complete an n-gram already in ``words`` [B, t]."""
    grams = words.unfold(1, n, 1)  # [B, t-n+1, n], every complete n-gram so far
    last = words[:, words.shape[1] - n + 1 :]  # [B, n-1], the prefix of the next n-gram
    match = (grams[:, :, :-1] == last[:, None]).all(-1)  # [B, t-n+1]
    banned = torch.where(match, grams[:, :, -1], PAD_ID)  # <pad> is forbidden anyway
    logp.scatter_(1, banned, NEG)


def _compact(done: torch.Tensor) -> torch.Tensor | None:
    """Indices of the images to keep once at least 1/8 of them are done, else None."""
    n_done = int(done.sum())
    return (~done).nonzero().squeeze(1) if n_done * 8 >= done.numel() else None


@torch.inference_mode()
def greedy_decode(
    decoder: Decoder,
    feats: torch.Tensor,
    cfg: DecodeConfig | None = None,
    prefix: Sequence[int] = (),
) -> list[Hypothesis]:
    """Argmax decoding of a batch. feats: pooled [N, D] or grid [N, L, C]; ``prefix``: word ids
    every caption starts with.

    Images that emitted <end> leave the batch (in groups, see ``_compact``).
    """
    cfg = cfg or DecodeConfig(beam_size=1)
    ctx = decoder.context(feats)
    state = decoder.init_state(ctx)
    n = feats.shape[0]
    act = torch.arange(n)  # [M] the images still in the batch
    word = torch.full((n,), START_ID, dtype=torch.long)  # [M]
    done = torch.zeros(n, dtype=torch.bool)  # [M] emitted <end> but not yet removed
    length = torch.full((n,), cfg.max_len, dtype=torch.long)  # [N] words before <end>
    steplp = torch.zeros(n, cfg.max_len + 1)  # [N, T] log-prob of each step's word
    seq = torch.zeros(n, cfg.max_len + 1, dtype=torch.long)  # [N, T] word of each step
    att: torch.Tensor | None = None  # [N, T, L]
    rules: NextWordRules | None = None
    for t in range(cfg.max_len + 1):
        logp, state, alpha = decoder.step(ctx, state, word)  # [M, V]
        rules = rules or NextWordRules(cfg, logp.shape[-1], prefix)
        hist = seq.index_select(0, act) if cfg.no_repeat_ngram and act.numel() < n else seq
        best_lp, word = rules.apply(logp, t, hist).max(-1)  # [M] each
        word = word.masked_fill(done, PAD_ID)
        ended = word == END_ID
        if alpha is not None and att is None:
            att = torch.zeros(n, cfg.max_len + 1, alpha.shape[-1])
        if act.numel() == n:  # nobody left yet: plain slices are cheaper than indexing
            steplp[:, t] = best_lp.masked_fill(done, 0.0)
            seq[:, t] = word
            length.masked_fill_(ended, t)
            if alpha is not None:
                att[:, t] = alpha
        else:
            steplp[act, t] = best_lp.masked_fill(done, 0.0)
            seq[act, t] = word
            length[act[ended]] = t
            if alpha is not None:
                att[act, t] = alpha
        done |= ended
        keep = _compact(done)
        if keep is None:
            continue
        if keep.numel() == 0:
            break
        act, word, done = act[keep], word[keep], done[keep]
        ctx = decoder.select(ctx, keep)
        state = tuple(s.index_select(0, keep) for s in state)
    out = []
    for i, (ids, n_words, lps) in enumerate(
        zip(seq.tolist(), length.tolist(), steplp.tolist(), strict=True)
    ):
        lp = math.fsum(lps[: n_words + 1])
        out.append(
            Hypothesis(
                ids[:n_words],
                lp,
                _length_score(lp, n_words + 1, cfg.length_alpha),
                True,
                att[i, :n_words].clone() if att is not None else None,
                lps[: n_words + 1],
            )
        )
    return out


def _start(n: int, cfg: DecodeConfig):
    """The beam before the first step: words [N*k] (<start>), live log-probs [N*k] (one live
    hypothesis per image, so the k beams differ), the empty pool [N, p, 4] (score, log-prob, step
    of <end> = words, global row that emitted it; float64 holds the integers exactly) and the
    word history [N*k, max_len] that n-gram blocking reads (None without blocking)."""
    k = cfg.beam_size
    word = torch.full((n * k,), START_ID, dtype=torch.long)
    live = torch.full((n, k), NEG)
    live[:, 0] = 0.0
    pool = torch.zeros(n, min(cfg.n_best, k), 4, dtype=torch.float64)
    pool[..., 0] = -math.inf
    hist = torch.zeros(n * k, cfg.max_len, dtype=torch.long) if cfg.no_repeat_ngram else None
    return word, live.view(n * k), pool, hist


@torch.inference_mode()
def beam_search(
    decoder: Decoder,
    feats: torch.Tensor,
    cfg: DecodeConfig | None = None,
    prefix: Sequence[int] = (),
    *,
    stop_early: bool = True,
) -> list[list[Hypothesis]]:
    """Batched beam search over N images (the module docstring has the algorithm); each image's
    n-best list, best first. ``prefix``: word ids every caption starts with. Done images leave
    the batch in groups (``_compact``); ``stop_early=False`` runs every image to ``max_len``,
    with the same result."""
    cfg = cfg or DecodeConfig()
    k, n = cfg.beam_size, feats.shape[0]
    ctx = decoder.select(decoder.context(feats), torch.arange(n).repeat_interleave(k))
    state = decoder.init_state(ctx)
    # Rows: image i owns rows i*k .. i*k+k-1 of the N*k "global" rows. The tensors of the loop
    # hold the M images still in the batch: act [M] images, act_rows [M*k] their global rows.
    act, act_rows = torch.arange(n), torch.arange(n * k)
    word, live, pool, hist = _start(n, cfg)
    final = pool.clone()  # [N, p, 4]: the pools of done images
    best_reach = (cfg.max_len + 1) ** cfg.length_alpha  # largest length normaliser
    # per step t, by global row: the word left in it, the row it came from, its attention
    words = torch.zeros(cfg.max_len, n * k, dtype=torch.long)
    backs = torch.zeros(cfg.max_len, n * k, dtype=torch.long)
    cums = torch.zeros(cfg.max_len, n * k)  # summed log-prob of the row's words up to step t
    att: torch.Tensor | None = None  # [T, N*k, L], by the row that attended
    rules: NextWordRules | None = None
    first_row = (torch.arange(n) * k)[:, None]  # [M, 1] local rows
    for t in range(cfg.max_len + 1):
        logp, state, alpha = decoder.step(ctx, state, word)  # [M*k, V]
        rules = rules or NextWordRules(cfg, logp.shape[-1], prefix)
        vocab, m = logp.shape[-1], act.numel()
        full = m == n  # nobody left yet: local rows are the global rows
        if first_row.shape[0] != m:
            first_row = (torch.arange(m) * k)[:, None]  # [M, 1] local rows
        cand = rules.apply(logp, t, hist).add_(live[:, None]).view(m, k * vocab)
        top_lp, top = cand.topk(2 * k, dim=-1)  # [M, 2k], best first
        ends = top % vocab == END_ID
        if bool(ends[:, :k].any()):  # <end> among the top k joins the pool if among the p best
            src = top[:, :k] // vocab + first_row  # [M, k] local rows that emitted them
            pool = _pool_endings(
                pool, top_lp[:, :k], ends[:, :k], src if full else act_rows[src], t, cfg
            )
        if alpha is not None and t < cfg.max_len:
            if att is None:
                att = torch.zeros(cfg.max_len, n * k, alpha.shape[-1])
            att[t, slice(None) if full else act_rows] = alpha
        if t == cfg.max_len:  # every live hypothesis was closed with <end>
            break
        # live: the first k candidates that do not end (at most k of the 2k end)
        keep = top.gather(1, ends.to(torch.int8).argsort(dim=1, stable=True)[:, :k])  # [M, k]
        live = cand.gather(1, keep).view(-1)
        back = (keep // vocab + first_row).view(-1)  # [M*k] local source rows
        word = (keep % vocab).view(-1)
        state = tuple(s.index_select(0, back) for s in state)
        if full:
            words[t], backs[t], cums[t] = word, back, live
        else:
            words[t, act_rows], backs[t, act_rows] = word, act_rows[back]
            cums[t, act_rows] = live
        if hist is not None:
            hist = hist.index_select(0, back)
            hist[:, t] = word
        if not stop_early:
            continue
        # done: no live hypothesis can reach the p-th pooled score (dead rows sit near NEG)
        done = pool[:, -1, 0] * best_reach >= live.view(m, k).amax(1)  # [M]
        stay = _compact(done)
        if stay is None:
            continue
        final[act[done]] = pool[done]
        if stay.numel() == 0:
            break
        rows = (stay[:, None] * k + torch.arange(k)).view(-1)  # [M'*k] local rows kept
        act, act_rows, pool = act[stay], act_rows[rows], pool[stay]
        live, word = live[rows], word[rows]
        ctx = decoder.select(ctx, rows)
        state = tuple(s.index_select(0, rows) for s in state)
        if hist is not None:
            hist = hist[rows]
    final[act] = pool
    return _trace_back(cfg, final, words, backs, cums, att)


def _pool_endings(
    pool: torch.Tensor,
    lp: torch.Tensor,
    ends: torch.Tensor,
    rows: torch.Tensor,
    t: int,
    cfg: DecodeConfig,
) -> torch.Tensor:
    """Merge the top-k candidates that end at step ``t`` into the pool [M, p, 4] and keep its p
    best (ties keep the older entry). lp, ends, rows: [M, k] log-probs, ends-with-<end> flags
    and the global rows that emitted them."""
    p = pool.shape[1]
    score = torch.where(ends & (lp > NEG / 2), lp / (t + 1) ** cfg.length_alpha, -math.inf)
    new = torch.stack([score, lp, torch.full_like(score, t), rows.to(score.dtype)], -1)
    merged = torch.cat([pool, new.double()], 1)  # [M, p+k, 4], old entries first
    order = merged[..., 0].argsort(dim=1, descending=True, stable=True)[:, :p]
    return merged.gather(1, order[..., None].expand(-1, -1, 4))


def _trace_back(cfg, pool, words, backs, cums, att) -> list[list[Hypothesis]]:
    """Follow the back-pointers of each pooled hypothesis to its words, their log-probs and
    attention [len, L]."""
    steps, froms, sums = words.tolist(), backs.tolist(), cums.tolist()  # [T][N*k]
    out = []
    for entries in pool.tolist():
        hyps = []
        for score, lp, end, row in entries:
            if score == -math.inf:
                continue
            n_words, cur = int(end), int(row)  # the row that emitted <end> at step n_words
            ids, rows, cum = [0] * n_words, [0] * n_words, [0.0] * (n_words + 1)
            cum[n_words] = lp
            for s in range(n_words - 1, -1, -1):
                cum[s] = sums[s][cur]
                ids[s], cur = steps[s][cur], froms[s][cur]
                rows[s] = cur
            idx = torch.tensor(rows, dtype=torch.long)
            a = att[torch.arange(n_words), idx] if att is not None else None
            token_lps = [b - a_ for a_, b in zip([0.0, *cum[:-1]], cum, strict=True)]
            hyps.append(Hypothesis(ids, lp, score, True, a, token_lps))
        out.append(hyps[: cfg.n_best])
    return out


def decode(
    decoder: Decoder, feats: torch.Tensor, cfg: DecodeConfig, prefix: Sequence[int] = ()
) -> list[list[Hypothesis]]:
    """Beam search for beam_size > 1, greedy for 1; always returns n-best lists. ``prefix``:
    word ids every caption starts with."""
    if cfg.beam_size == 1:
        return [[h] for h in greedy_decode(decoder, feats, cfg, prefix)]
    return beam_search(decoder, feats, cfg, prefix)
