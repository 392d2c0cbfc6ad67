"""How sure a model is of its caption, from its own word probabilities.

A caption's confidence is a number in [0, 1] computed from the log-probabilities of its words and
of ``<end>`` (``Hypothesis.token_logprobs``). ``FORMS`` holds the candidate forms; the one used
everywhere, ``CONFIDENCE_FORM``, is the form whose Spearman correlation with per-image CIDEr-D
was highest on Flickr8k dev across the shipped bundles (``captioning confidence``,
``docs/results.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def mean_word_prob(lps: Sequence[float]) -> float:
    """The arithmetic mean of the words' (and ``<end>``'s) probabilities."""
    return math.fsum(math.exp(v) for v in lps) / len(lps)


def geo_mean_prob(lps: Sequence[float]) -> float:
    """The geometric mean of the probabilities: exp of the mean log-prob."""
    return math.exp(math.fsum(lps) / len(lps))


def min_word_prob(lps: Sequence[float]) -> float:
    """The probability of the least likely word: how weak the weakest link is."""
    return math.exp(min(lps))


FORMS: dict[str, Callable[[Sequence[float]], float]] = {
    "mean_word_prob": mean_word_prob,
    "geo_mean_prob": geo_mean_prob,
    "min_word_prob": min_word_prob,
}
CONFIDENCE_FORM = "geo_mean_prob"  # mean rho with dev CIDEr-D 0.467 (mean_word_prob 0.428)


def confidence(token_logprobs: Sequence[float] | None, form: str = CONFIDENCE_FORM) -> float:
    """The confidence of one caption (``nan`` when its word log-probs are unknown)."""
    if form not in FORMS:
        raise ValueError(f"unknown confidence form {form!r}; expected one of {sorted(FORMS)}")
    if not token_logprobs:
        return math.nan
    return min(1.0, max(0.0, FORMS[form](token_logprobs)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (``nan`` if either is flat)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {a.shape}")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else math.nan
