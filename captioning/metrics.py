"""Caption metrics: corpus BLEU-1..4 (nltk), CIDEr-D, ROUGE-L and METEOR (pycocoevalcap).

Conventions shared by every function here:

* **Scale.** Every score is on the 0-100 scale. BLEU, METEOR and ROUGE-L are fractions x 100.
  CIDEr-D is coco-caption's value x 100, as most papers print it (coco's 0.55 is reported as
  55.0). CIDEr-D is *not* bounded by 100: its maximum is 1000 (coco's 10.0).
* **Tokens.** Hypotheses and references both go through :func:`normalize`: the special tokens
  ``<start>``, ``<end>`` and ``<pad>`` are removed textually, then the text goes through
  :func:`captioning.text.tokenize`, the project's only tokenizer. Pre-tokenized token lists
  are accepted too and are joined and re-tokenized, so both forms give the same tokens.
* **Unknown words.** ``<unk>`` in a hypothesis is kept as the literal token ``"<unk>"``.
  ``tokenize`` never emits ``<`` or ``>``, and references are normalized with
  ``keep_unk=False`` (a stray ``<unk>`` in a reference becomes plain ``"unk"``), so a predicted
  ``<unk>`` counts toward the hypothesis length but never matches a reference word.
* **pycocoevalcap scorers** get ``" ".join(tokens)``, not pycocoevalcap's PTBTokenizer (which
  needs Java and tokenizes differently), so every metric sees the same tokens.
* **METEOR** runs pycocoevalcap's ``meteor-1.5.jar`` with coco-caption's flags except
  ``-norm``: our text is already lowercase and punctuation-free (``-norm`` gives identical
  scores on it), and ``-norm`` would split ``<unk>`` into ``< unk >``, letting ``unk`` match.
  It needs Java; without Java, or if the jar fails or times out, the score is ``None`` and
  ``meteor_error`` says why. The Java process is always killed and reaped after use.
* **Corpus BLEU** is nltk's ``corpus_bleu`` with all references of each image and no
  smoothing: an order with no matching n-gram in the whole corpus makes that BLEU-n and every
  higher one effectively 0 (nltk substitutes the smallest float, giving ~1e-75 on this scale).
  CIDEr-D's idf and METEOR's aggregation are corpus-level too: scores depend on the whole set.
* **Ids.** Every hypothesis id must have references; references for other ids are ignored, so
  a subset of the images can be scored against the full reference mapping.
* **Diversity.** ``distinct`` is the share of hypotheses that differ from every other one (after
  normalization), ``repeat_trigram``/``repeat_bigram`` the share of hypotheses in which some
  trigram/bigram occurs twice or more; all three are percentages (0-100).
* **Reward.** :class:`CiderD` is a vectorised CIDEr-D for training (SCST): document frequencies
  are fixed when it is built, and it returns coco's scale (x10, not x100), as a reward.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as coco_meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioning.text import tokenize
from captioning.vocab import END, PAD, START, UNK

Caption = str | Sequence[str]
"""A caption as text, or as a list of tokens."""

BLEU_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4")
BLEU_WEIGHTS = ((1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0), (1 / 3,) * 3, (0.25,) * 4)
DIVERSITY_KEYS = ("distinct", "repeat_trigram", "repeat_bigram")
METRIC_LABELS = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "meteor": "METEOR",
    "rougeL": "ROUGE-L",
    "cider": "CIDEr-D",
    "distinct": "Distinct %",
    "repeat_trigram": "Rep. trigram %",
    "repeat_bigram": "Rep. bigram %",
}
"""Every corpus metric :func:`evaluate_captions` reports (0-100), with its display label."""
METRIC_KEYS = tuple(METRIC_LABELS)
HEADLINE_KEYS = ("bleu1", "bleu4", "cider", "distinct", "repeat_trigram")
"""The short list a model comparison shows (``tune-decoding``, ``models --compare``)."""
TABLE_COLUMNS = tuple((label, key) for key, label in METRIC_LABELS.items())
CIDER_N = 4  # CIDEr-D sums 1..4-grams
CIDER_SIGMA = 6.0  # standard deviation of CIDEr-D's Gaussian length penalty
MISSING = "—"
METEOR_TIMEOUT_S = 600.0

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
class _Corpus:
    """Validated, normalized hypotheses and references, aligned by image id."""

    ids: tuple[Hashable, ...]
    hyps: tuple[tuple[str, ...], ...]
    refs: tuple[tuple[tuple[str, ...], ...], ...]

    def coco_inputs(self) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
        """``(gts, res)`` in pycocoevalcap's format: space-joined token strings per id."""
        gts = {i: [" ".join(r) for r in refs] for i, refs in zip(self.ids, self.refs, strict=True)}
        res = {i: [" ".join(h)] for i, h in zip(self.ids, self.hyps, strict=True)}
        return gts, res


def _normalize_refs(refs: Sequence[Caption], image_id: Hashable) -> tuple[tuple[str, ...], ...]:
    """Normalize one image's references, rejecting a bare string or an empty list."""
    if isinstance(refs, str):
        raise TypeError(
            f"references for {image_id!r} must be a list of captions, not a single string"
        )
    if len(refs) == 0:
        raise ValueError(f"image {image_id!r} has an empty list of references")
    return tuple(tuple(normalize(r, keep_unk=False)) for r in refs)


def _prepare(hyps: Mapping[str, Caption], refs: Mapping[str, Sequence[Caption]]) -> _Corpus:
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
    return _Corpus(
        ids=ids,
        hyps=tuple(tuple(normalize(hyps[k])) for k in ids),
        refs=tuple(_normalize_refs(refs[k], k) for k in ids),
    )


def _bleu(corpus: _Corpus) -> dict[str, float]:
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
    return _bleu(_prepare(hyps, refs))


def sentence_bleu_smoothed(hyp: Caption, refs: Sequence[Caption]) -> dict[str, float]:
    """Per-caption BLEU-1..4 (0-100) with nltk's smoothing method 1, e.g. for a UI explorer.

    Smoothed sentence scores are for browsing only: they are not comparable with
    :func:`corpus_bleu_scores` and must not be averaged into a corpus score.
    """
    ref_tokens = [list(r) for r in _normalize_refs(refs, "<sentence>")]
    scores = sentence_bleu(
        ref_tokens,
        normalize(hyp),
        weights=list(BLEU_WEIGHTS),
        smoothing_function=SmoothingFunction().method1,
    )
    return {k: 100.0 * float(s) for k, s in zip(BLEU_KEYS, scores, strict=True)}


def pycoco_bleu(
    hyps: Mapping[str, Caption], refs: Mapping[str, Sequence[Caption]]
) -> dict[str, float]:
    """pycocoevalcap's ``Bleu(4)`` on the same normalized tokens (0-100), for cross-checks."""
    gts, res = _prepare(hyps, refs).coco_inputs()
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {k: 100.0 * float(s) for k, s in zip(BLEU_KEYS, scores, strict=True)}


def _java_executable() -> str | None:
    """Path of the ``java`` binary on PATH, or None."""
    return shutil.which("java")


def _meteor_dir() -> str:
    """The pycocoevalcap folder holding ``meteor-1.5.jar`` and its data."""
    return os.path.dirname(os.path.abspath(coco_meteor.__file__))


class _MeteorProcess(coco_meteor.Meteor):
    """pycocoevalcap's METEOR wrapper with a watchdog and a safe, idempotent :meth:`close`.

    The parent's ``__del__`` takes a lock that ``compute_score`` leaves held when it fails, and
    its stderr pipe is never read; this subclass replaces both (stderr goes to ``stderr``).
    """

    def __init__(self, java: str, timeout_s: float, stderr: IO[bytes]) -> None:
        self.lock = threading.Lock()
        self.meteor_p: subprocess.Popen[bytes] | None = None
        self.timed_out = False
        self._stderr = stderr
        self._timer = threading.Timer(timeout_s, self._on_timeout)
        self._timer.daemon = True
        self.meteor_cmd = [java, "-jar", "-Xmx2G", coco_meteor.METEOR_JAR]
        self.meteor_cmd += ["-", "-", "-stdio", "-l", "en"]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=_meteor_dir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._timer.start()

    def _on_timeout(self) -> None:
        """Kill the JVM so blocked reads see EOF and ``compute_score`` fails fast."""
        self.timed_out = True
        if self.meteor_p is not None:
            self.meteor_p.kill()

    def stderr_tail(self, limit: int = 500) -> str:
        """The last ``limit`` characters the JVM wrote to stderr."""
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-limit:]
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """Stop the watchdog, then kill and reap the JVM (idempotent)."""
        self._timer.cancel()
        proc, self.meteor_p = self.meteor_p, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        if hasattr(self, "_timer"):
            self.close()


def _meteor(
    gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]], timeout_s: float
) -> tuple[float | None, str | None]:
    """Corpus METEOR (0-100) and None, or None and the reason it is unavailable."""
    java = _java_executable()
    if java is None:
        return None, "java not found on PATH: METEOR needs a Java runtime (e.g. openjdk 17)"
    jar = os.path.join(_meteor_dir(), coco_meteor.METEOR_JAR)
    if not os.path.isfile(jar):
        return None, f"METEOR jar not found at {jar}"
    with tempfile.TemporaryFile() as stderr:
        try:
            scorer = _MeteorProcess(java, timeout_s, stderr)
        except OSError as exc:
            return None, f"could not start METEOR ({java}): {exc}"
        try:
            score, _ = scorer.compute_score(gts, res)
            return 100.0 * float(score), None
        except Exception as exc:  # a dead or misbehaving JVM surfaces as many exception types
            scorer.close()  # the JVM is dead before its stderr is read
            if scorer.timed_out:
                return None, f"METEOR timed out after {timeout_s:g} s"
            detail = scorer.stderr_tail()
            reason = f"METEOR failed: {type(exc).__name__}: {exc}"
            return None, f"{reason}; java stderr: {detail}" if detail else reason
        finally:
            scorer.close()


def _coco(
    corpus: _Corpus, *, meteor: bool, meteor_timeout_s: float
) -> dict[str, float | str | None]:
    """CIDEr-D, ROUGE-L and METEOR (0-100) plus ``meteor_error``."""
    gts, res = corpus.coco_inputs()
    cider, _ = Cider(n=CIDER_N, sigma=CIDER_SIGMA).compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    if meteor:
        meteor_score, meteor_error = _meteor(gts, res, meteor_timeout_s)
    else:
        meteor_score, meteor_error = None, "METEOR not requested (meteor=False)"
    return {
        "cider": 100.0 * float(cider),
        "rougeL": 100.0 * float(rouge),
        "meteor": meteor_score,
        "meteor_error": meteor_error,
    }


def coco_scores(
    hyps: Mapping[str, Caption],
    refs: Mapping[str, Sequence[Caption]],
    *,
    meteor: bool = True,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float | str | None]:
    """``{"cider", "rougeL", "meteor", "meteor_error"}``: scores on 0-100, or None + reason."""
    return _coco(_prepare(hyps, refs), meteor=meteor, meteor_timeout_s=meteor_timeout_s)


def evaluate_captions(
    hyps: Mapping[str, Caption],
    refs: Mapping[str, Sequence[Caption]],
    *,
    meteor: bool = True,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float | int | str | None]:
    """Every metric of ``METRIC_KEYS`` (0-100), ``n_images``, and ``meteor_error`` if any.

    That is BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and the :func:`diversity_stats` rates.
    """
    corpus = _prepare(hyps, refs)
    coco = _coco(corpus, meteor=meteor, meteor_timeout_s=meteor_timeout_s)
    out: dict[str, float | int | str | None] = {
        **_bleu(corpus),
        "meteor": coco["meteor"],
        "rougeL": coco["rougeL"],
        "cider": coco["cider"],
        **diversity_stats(corpus.hyps),
        "n_images": len(corpus.ids),
    }
    if coco["meteor_error"] is not None:
        out["meteor_error"] = coco["meteor_error"]
    return out


# -- diversity ------------------------------------------------------------------------------------


def _repeats_ngram(tokens: Sequence[str], n: int) -> bool:
    """True when some n-gram occurs twice or more in ``tokens``."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def diversity_stats(hyps: Mapping[Hashable, Caption] | Sequence[Caption]) -> dict[str, float]:
    """Percentages (0-100) of distinct captions and of captions repeating a trigram / bigram.

    ``distinct`` counts different normalized captions over all captions (1000 captions, 850
    different ones: 85.0); ``repeat_trigram`` is the share of captions in which some trigram
    occurs at least twice ("a man and a man and a dog"), ``repeat_bigram`` likewise for bigrams.
    """
    if isinstance(hyps, str):
        raise TypeError("diversity_stats needs a collection of captions, not a single string")
    captions = list(hyps.values()) if isinstance(hyps, Mapping) else list(hyps)
    if not captions:
        raise ValueError("no captions to measure")
    tokens = [tuple(normalize(c)) for c in captions]
    share = 100.0 / len(tokens)
    return {
        "distinct": share * len(set(tokens)),
        "repeat_trigram": share * sum(_repeats_ngram(t, 3) for t in tokens),
        "repeat_bigram": share * sum(_repeats_ngram(t, 2) for t in tokens),
    }


# -- CIDEr-D as a reward --------------------------------------------------------------------------

_END_WORD = "\x00end"  # CiderD(end_word=True)'s end-of-caption word: no tokenized text holds it


def _counts(row: np.ndarray, key: np.ndarray, order: np.ndarray):
    """Distinct (row, key) pairs of parallel arrays, sorted, with their order and count."""
    idx = np.lexsort((key, row))
    row, key, order = row[idx], key[idx], order[idx]
    first = np.ones(len(row), dtype=bool)
    first[1:] = (row[1:] != row[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(first)
    count = np.diff(np.append(starts, len(row)))
    return row[starts], key[starts], order[starts], count


class CiderD:
    """CIDEr-D with document frequencies fixed at construction: a fast reward for training.

    The definition is pycocoevalcap's ``Cider`` (``cider_scorer.py``), which is CIDEr-D: n-grams
    n = 1..4 as raw term counts weighted by ``log(N) - log(max(1, df))``, where ``df`` counts
    the images of ``refs`` whose references contain the n-gram and ``N = len(refs)``; per order,
    the candidate's counts are clipped by each reference's (``min(c, r) * r``), the cosine is
    multiplied by ``exp(-delta**2 / (2 * sigma**2))``, where ``delta`` is the difference of the
    two captions' lengths as pycocoevalcap counts them (their numbers of bigrams, i.e. words - 1,
    0 for an empty caption); the score is 10 x the mean over orders of the mean over references.

    ``Cider().compute_score`` takes ``df`` and ``N`` from the *evaluated* set; here they come
    from ``refs`` (e.g. all train references). Built on the evaluated set's own references, the
    two agree to float precision. Scores are coco's scale (a perfect match with a single
    reference is 10.0), not this module's 0-100.

    N-grams are exact integers (word indices in base ``len(words) + 1 + spare_words``, no
    hashing). Candidate words that no reference uses (and ``<unk>``) get fresh indices, so they
    never match but still count in the candidate's norm, as in pycocoevalcap.

    ``end_word=True`` appends an end-of-caption word to every reference and candidate (as SCST
    implementations do), so n-grams that end a caption count: a caption cut off mid-phrase
    ("... standing on a red") no longer scores like a finished one. The scores then equal
    pycocoevalcap's on captions with one extra last word.
    """

    def __init__(
        self,
        refs: Mapping[Hashable, Sequence[Caption]],
        *,
        n: int = CIDER_N,
        sigma: float = CIDER_SIGMA,
        spare_words: int = 4096,
        end_word: bool = False,
    ) -> None:
        if len(refs) == 0:
            raise ValueError("CiderD needs the references of at least one image")
        self.n, self.sigma = n, sigma
        self.image_ids = tuple(refs)
        self._row = {k: i for i, k in enumerate(self.image_ids)}
        per_image = [_normalize_refs(refs[k], k) for k in self.image_ids]
        if end_word:  # the last word of every reference
            per_image = [tuple((*c, _END_WORD) for c in caps) for caps in per_image]
        words = sorted({w for caps in per_image for c in caps for w in c})
        self._word = {w: i + 1 for i, w in enumerate(words)}  # 0 = padding
        self._end = self._word.get(_END_WORD, 0)  # index of the end word (0 = none)
        self._spare = (len(words) + 1, len(words) + 1 + spare_words)  # [first, end) for unknowns
        self._base = self._spare[1]
        if self._base**n >= 2**63:
            raise ValueError(f"{len(words)} words are too many for exact {n}-gram keys")
        self._log_n = math.log(float(len(self.image_ids)))

        n_refs = np.array([len(caps) for caps in per_image])
        self._n_refs = n_refs.astype(np.float64)  # [I]
        self._m = int(n_refs.max())
        flat = [c for caps in per_image for c in caps]
        ref_image = np.repeat(np.arange(len(per_image)), n_refs)  # [R]
        ref_slot = np.arange(len(flat)) - np.repeat(np.cumsum(n_refs) - n_refs, n_refs)  # [R]
        tok = self._pad([[self._word[w] for w in c] for c in flat])  # [R, T]
        row, key, order, tf = _counts(*self._ngrams(tok))  # distinct n-grams of each reference

        # document frequency: in how many images' references each n-gram occurs
        img = ref_image[row]
        pair = np.lexsort((img, key))
        k_sorted, i_sorted = key[pair], img[pair]
        new_pair = np.ones(len(pair), dtype=bool)
        new_pair[1:] = (k_sorted[1:] != k_sorted[:-1]) | (i_sorted[1:] != i_sorted[:-1])
        self._keys, self._df = np.unique(k_sorted[new_pair], return_counts=True)  # [K]
        if len(self._keys) == 0:
            raise ValueError("CiderD's references contain no words")
        weight = self._log_n - np.log(np.maximum(1.0, self._df))  # [K]

        # per (image, n-gram): the term count in each of the image's references
        dense = np.searchsorted(self._keys, key)
        combo = img.astype(np.int64) * len(self._keys) + dense
        self._combo, where = np.unique(combo, return_inverse=True)  # [U]
        self._tf = np.zeros((len(self._combo), self._m))  # [U, M]
        self._tf[where, ref_slot[row]] = tf

        vec2 = (tf * weight[dense]) ** 2
        norm = np.bincount(row * n + order, weights=vec2, minlength=len(flat) * n)
        self._norm = np.zeros((len(per_image), self._m, n))  # [I, M, n]
        self._norm[ref_image, ref_slot] = np.sqrt(norm).reshape(len(flat), n)
        self._len = np.zeros((len(per_image), self._m))  # [I, M] bigram counts
        self._len[ref_image, ref_slot] = np.maximum((tok != 0).sum(1) - 1, 0)
        self._valid = np.arange(self._m)[None] < n_refs[:, None]  # [I, M]

    def __len__(self) -> int:
        return len(self.image_ids)

    # ------------------------------------------------------------ encoding

    @staticmethod
    def _pad(seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Right-padded int64 matrix [len(seqs), longest] (0 = padding)."""
        out = np.zeros((len(seqs), max((len(s) for s in seqs), default=0)), dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out

    def _ngrams(self, tok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every n-gram (n = 1..self.n) of each row of tok [R, T]: (row, key, n - 1)."""
        rows, keys, orders = [], [], []
        key = np.zeros_like(tok)
        for k in range(min(self.n, tok.shape[1])):
            key = key[:, : tok.shape[1] - k] * self._base + tok[:, k:]  # [R, T - k]
            r, i = np.nonzero(tok[:, k:])  # right-padded: inside iff the last word is
            rows.append(r)
            keys.append(key[r, i])
            orders.append(np.full(len(r), k))
        if not rows:
            return (np.zeros(0, np.int64),) * 3
        return np.concatenate(rows), np.concatenate(keys), np.concatenate(orders)

    def _unknown_ids(self, count: int) -> range:
        first, end = self._spare
        if first + count > end:
            raise ValueError(f"more than {end - first} unknown words in one call to CiderD")
        return range(first, first + count)

    def encode(self, captions: Sequence[Caption]) -> np.ndarray:
        """Captions (text or tokens, normalized like hypotheses) -> word indices [C, T]."""
        tokens = [normalize(c) for c in captions]
        unknown = sorted({w for t in tokens for w in t if w not in self._word})
        extra = dict(zip(unknown, self._unknown_ids(len(unknown)), strict=True))
        return self._pad([[self._word.get(w) or extra[w] for w in t] for t in tokens])

    def word_table(self, itos: Sequence[str]) -> np.ndarray:
        """Word index of each vocabulary id [V]: ``<pad>/<start>/<end>`` -> 0 (end of caption),
        ``<unk>`` and words no reference uses -> distinct indices that never match."""
        unknown = [w for w in itos if w not in self._word and w not in (PAD, START, END)]
        extra = dict(zip(unknown, self._unknown_ids(len(unknown)), strict=True))
        return np.array(
            [0 if w in (PAD, START, END) else self._word.get(w) or extra[w] for w in itos],
            dtype=np.int64,
        )

    def rows(self, image_ids: Sequence[Hashable]) -> np.ndarray:
        """Row of each image id among ``image_ids`` of the references [C]."""
        try:
            return np.array([self._row[i] for i in image_ids], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"image {e.args[0]!r} is not among CiderD's references") from None

    # ------------------------------------------------------------ scoring

    def score(self, captions: Sequence[Caption], image_ids: Sequence[Hashable]) -> np.ndarray:
        """CIDEr-D of each caption against the references of its image [C] (coco scale)."""
        if isinstance(captions, str):
            raise TypeError("CiderD.score needs a list of captions, not a single string")
        if len(captions) != len(image_ids):
            raise ValueError(f"{len(captions)} captions but {len(image_ids)} image ids")
        return self.score_words(self.encode(captions), self.rows(image_ids))

    def score_ids(
        self, ids: np.ndarray, image_ids: Sequence[Hashable], table: np.ndarray
    ) -> np.ndarray:
        """CIDEr-D of vocabulary-id captions [C, T] (cut at the first ``<end>``/``<pad>``);
        ``table`` is :meth:`word_table` of the vocabulary."""
        return self.score_words(table[np.asarray(ids)], self.rows(image_ids))

    def score_words(self, tok: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """CIDEr-D of word-index captions tok [C, T] (cut at the first 0) against image rows [C]."""
        tok = np.asarray(tok, dtype=np.int64)
        tok = tok * np.cumprod(tok != 0, axis=1)  # nothing after the first 0
        if self._end:  # the end word after each caption's last word
            tok = np.concatenate([tok, np.zeros((len(tok), 1), np.int64)], 1)  # [C, T + 1]
            tok[np.arange(len(tok)), (tok != 0).sum(1)] = self._end
        n_cand, n = len(tok), self.n
        length = np.maximum((tok != 0).sum(1) - 1, 0).astype(np.float64)  # [C] bigram counts
        row, key, order, tf = _counts(*self._ngrams(tok))
        dense = np.minimum(np.searchsorted(self._keys, key), len(self._keys) - 1)
        known = self._keys[dense] == key
        df = np.where(known, self._df[dense], 0)
        weight = self._log_n - np.log(np.maximum(1.0, df))
        vec = tf * weight
        slot = row * n + order
        norm = np.sqrt(np.bincount(slot, weights=vec**2, minlength=n_cand * n)).reshape(n_cand, n)

        combo = rows[row] * len(self._keys) + dense
        pos = np.minimum(np.searchsorted(self._combo, combo), len(self._combo) - 1)
        hit = known & (self._combo[pos] == combo)
        tf_ref = self._tf[pos[hit]]  # [H, M]
        w2 = (weight[hit] ** 2)[:, None]
        part = w2 * np.minimum(tf[hit][:, None], tf_ref) * tf_ref  # [H, M]
        m = self._m
        flat = (slot[hit][:, None] * m + np.arange(m)).ravel()
        dot = np.bincount(flat, weights=part.ravel(), minlength=n_cand * n * m).astype(float)
        dot = dot.reshape(n_cand, n, m).transpose(0, 2, 1)  # [C, M, n]

        den = norm[:, None, :] * self._norm[rows]  # [C, M, n]
        cos = np.divide(dot, den, out=np.zeros_like(dot), where=den != 0)
        delta = length[:, None] - self._len[rows]  # [C, M]
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2)) * self._valid[rows]
        per_ref = cos.mean(-1) * penalty  # [C, M]
        return 10.0 * per_ref.sum(1) / self._n_refs[rows]


def _cell(value: float | None) -> str:
    """One table cell: one decimal, or the missing marker."""
    return MISSING if value is None else f"{float(value):.1f}"


def format_table(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    """Plain-text table: one row per model/setting, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D."""
    headers = ["Model", *(h for h, _ in TABLE_COLUMNS)]
    rows = [[name, *(_cell(m.get(k)) for _, k in TABLE_COLUMNS)] for name, m in metrics.items()]
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
