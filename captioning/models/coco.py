"""The COCO caption toolkit's scorers (pycocoevalcap): BLEU, METEOR (Java), ROUGE-L, CIDEr-D.

METEOR runs one persistent Java process per scoring, with a time limit; without Java it is
reported as missing with the reason, and every other metric still runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import IO

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as coco_meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioning.models.bleu import BLEU_KEYS, CIDER_N, CIDER_SIGMA, Caption, Corpus, prepare

METEOR_TIMEOUT_S = 600.0


def pycoco_bleu(
    hyps: Mapping[str, Caption], refs: Mapping[str, Sequence[Caption]]
) -> dict[str, float]:
    """pycocoevalcap's ``Bleu(4)`` on the same normalized tokens (0-100), for cross-checks."""
    gts, res = prepare(hyps, refs).coco_inputs()
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


def coco_corpus_scores(
    corpus: Corpus, *, meteor: bool, meteor_timeout_s: float
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
    return coco_corpus_scores(prepare(hyps, refs), meteor=meteor, meteor_timeout_s=meteor_timeout_s)
