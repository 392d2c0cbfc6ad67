"""CIDEr-D (Vedantam et al.) in numpy: consensus-weighted n-gram TF-IDF, clipped and
length-penalised, scored against each image's references. Also the reward SCST trains with."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from captioning.data.vocab import END, PAD, START
from captioning.models.bleu import CIDER_N, CIDER_SIGMA, Caption, normalize, normalize_refs

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
    ("... standing on a red") does not score like a finished one. The scores then equal
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
        per_image = [normalize_refs(refs[k], k) for k in self.image_ids]
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
