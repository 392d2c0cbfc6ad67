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
"""

from __future__ import annotations

import contextlib
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
TABLE_COLUMNS = (
    ("BLEU-1", "bleu1"),
    ("BLEU-2", "bleu2"),
    ("BLEU-3", "bleu3"),
    ("BLEU-4", "bleu4"),
    ("METEOR", "meteor"),
    ("ROUGE-L", "rougeL"),
    ("CIDEr-D", "cider"),
)
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
    cider, _ = Cider().compute_score(gts, res)
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
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (0-100), ``n_images``, and ``meteor_error`` if any."""
    corpus = _prepare(hyps, refs)
    coco = _coco(corpus, meteor=meteor, meteor_timeout_s=meteor_timeout_s)
    out: dict[str, float | int | str | None] = {
        **_bleu(corpus),
        "meteor": coco["meteor"],
        "rougeL": coco["rougeL"],
        "cider": coco["cider"],
        "n_images": len(corpus.ids),
    }
    if coco["meteor_error"] is not None:
        out["meteor_error"] = coco["meteor_error"]
    return out


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
