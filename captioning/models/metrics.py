"""Caption metrics: corpus BLEU-1..4 (nltk), CIDEr-D, ROUGE-L and METEOR (pycocoevalcap).

Conventions shared by every function here:

* **Scale.** Every score is on the 0-100 scale. BLEU, METEOR and ROUGE-L are fractions x 100.
  CIDEr-D is coco-caption's value x 100, as most papers print it (coco's 0.55 is reported as
  55.0). CIDEr-D is *not* bounded by 100: its maximum is 1000 (coco's 10.0).
* **Tokens.** Hypotheses and references both go through :func:`normalize`: the special tokens
  ``<start>``, ``<end>`` and ``<pad>`` are removed textually, then the text goes through
  :func:`captioning.data.text.tokenize`, the project's only tokenizer. Pre-tokenized token lists
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

from collections.abc import Hashable, Mapping, Sequence

from captioning.models.bleu import Caption, bleu_scores, normalize, prepare
from captioning.models.coco import METEOR_TIMEOUT_S, coco_corpus_scores

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
MISSING = "—"


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
    corpus = prepare(hyps, refs)
    coco = coco_corpus_scores(corpus, meteor=meteor, meteor_timeout_s=meteor_timeout_s)
    out: dict[str, float | int | str | None] = {
        **bleu_scores(corpus),
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
