"""Caption normalisation and corpus BLEU-1..4 (nltk, no smoothing).

``normalize`` drops ``<start>``/``<end>``/``<pad>`` and tokenises hypotheses and references the same
way, so every metric sees the same words on both sides.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

from captioning.data.text import tokenize
from captioning.data.vocab import END, PAD, START, UNK

Caption = str | Sequence[str]
"""A caption as text, or as a list of tokens."""

BLEU_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4")
BLEU_WEIGHTS = ((1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0), (1 / 3,) * 3, (0.25,) * 4)
CIDER_N = 4  # CIDEr-D sums 1..4-grams
CIDER_SIGMA = 6.0  # standard deviation of CIDEr-D's Gaussian length penalty

_DROPPED = re.compile("|".join(re.escape(t) for t in (START, END, PAD)), re.IGNORECASE)
_UNK = re.compile(re.escape(UNK), re.IGNORECASE)
_NLTK_ZERO_COUNT_WARNING = r"\s*The hypothesis contains 0 counts"


def normalize(caption: Caption, *, keep_unk: bool = True) -> list[str]:
    """Drop ``<start>``/``<end>``/``<pad>``, then ``tokenize``; ``<unk>`` stays ``"<unk>"``.

    With ``keep_unk=False`` (used for references) ``<unk>`` is ordinary text and becomes
    ``"unk"``. Token lists are joined with spaces and go through the same steps.
    """
    text = caption if isinstance(caption, str) else " ".join(caption)
    text = _DROPPED.sub(" ", text)
    if not keep_unk:
        return tokenize(text)
    tokens: list[str] = []
    for i, piece in enumerate(_UNK.split(text)):
        if i:
            tokens.append(UNK)
        tokens.extend(tokenize(piece))
    return tokens


@dataclass(frozen=True)
class Corpus:
    """Validated, normalized hypotheses and references, aligned by image id."""

    ids: tuple[Hashable, ...]
    hyps: tuple[tuple[str, ...], ...]
    refs: tuple[tuple[tuple[str, ...], ...], ...]

    def coco_inputs(self) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
        """``(gts, res)`` in pycocoevalcap's format: space-joined token strings per id."""
        gts = {i: [" ".join(r) for r in refs] for i, refs in zip(self.ids, self.refs, strict=True)}
        res = {i: [" ".join(h)] for i, h in zip(self.ids, self.hyps, strict=True)}
        return gts, res


def normalize_refs(refs: Sequence[Caption], image_id: Hashable) -> tuple[tuple[str, ...], ...]:
    """Normalize one image's references, rejecting a bare string or an empty list."""
    if isinstance(refs, str):
        raise TypeError(
            f"references for {image_id!r} must be a list of captions, not a single string"
        )
    if len(refs) == 0:
        raise ValueError(f"image {image_id!r} has an empty list of references")
    return tuple(tuple(normalize(r, keep_unk=False)) for r in refs)


def prepare(hyps: Mapping[str, Caption], refs: Mapping[str, Sequence[Caption]]) -> Corpus:
    """Check that every hypothesis id has references, then normalize both sides."""
    if len(hyps) == 0:
        raise ValueError("no hypotheses to evaluate")
    missing = [k for k in hyps if k not in refs]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"{len(missing)} of {len(hyps)} hypothesis ids have no references: {shown}{more}"
        )
    ids = tuple(hyps)
    return Corpus(
        ids=ids,
        hyps=tuple(tuple(normalize(hyps[k])) for k in ids),
        refs=tuple(normalize_refs(refs[k], k) for k in ids),
    )


def bleu_scores(corpus: Corpus) -> dict[str, float]:
    """Unsmoothed nltk corpus BLEU-1..4 on the 0-100 scale."""
    with warnings.catch_warnings():
        # Zero-count orders are expected on small sets; their BLEU-n is documented as ~0.
        warnings.filterwarnings("ignore", message=_NLTK_ZERO_COUNT_WARNING, category=UserWarning)
        scores = corpus_bleu(
            [[list(r) for r in refs] for refs in corpus.refs],
            [list(h) for h in corpus.hyps],
            weights=list(BLEU_WEIGHTS),
        )
    return {k: 100.0 * float(s) for k, s in zip(BLEU_KEYS, scores, strict=True)}


def corpus_bleu_scores(
    hyps: Mapping[str, Caption], refs: Mapping[str, Sequence[Caption]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-100), all references per image, no smoothing."""
    return bleu_scores(prepare(hyps, refs))


def sentence_bleu_smoothed(hyp: Caption, refs: Sequence[Caption]) -> dict[str, float]:
    """Per-caption BLEU-1..4 (0-100) with nltk's smoothing method 1, e.g. for a UI explorer.

    Smoothed sentence scores are for browsing only: they are not comparable with
    :func:`corpus_bleu_scores` and must not be averaged into a corpus score.
    """
    ref_tokens = [list(r) for r in normalize_refs(refs, "<sentence>")]
    scores = sentence_bleu(
        ref_tokens,
        normalize(hyp),
        weights=list(BLEU_WEIGHTS),
        smoothing_function=SmoothingFunction().method1,
    )
    return {k: 100.0 * float(s) for k, s in zip(BLEU_KEYS, scores, strict=True)}
