"""How a greedy soup scores its candidates: each bundle's dev metric at one fixed decoding.

``bundle.soup.greedy_soup`` takes a ``score(path)`` and a ``discard(path)``; ``dev_scorer``
makes them. Every candidate (each member alone, then each trial soup) is captioned on torch (the
reference runtime) at the same beam size, length normalisation and n-gram blocking, so the
scores compare the weights alone.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from captioning.bundle.catalog import resolve_bundle
from captioning.bundle.format import bundle_decoding, read_config
from captioning.bundle.records import decoding_label
from captioning.data import CaptionDataset
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import evaluate
from captioning.models.decoding import DecodeConfig
from captioning.models.metrics import METRIC_LABELS
from captioning.runtime.features import FeatureCache


@dataclass(frozen=True)
class SoupScorer:
    """What ``greedy_soup`` needs to rank its candidates."""

    score: Callable[[Path], float]  # a bundle's dev metric, higher is better
    discard: Callable[[Path], None]  # drops the features cached for a scored candidate
    label: str  # what ``score`` measures, e.g. "dev CIDEr-D, beam 3 α 0.5"


def member_decoding(member: str | Path, beam: int | None = None, **overrides) -> DecodeConfig:
    """The decoding candidates are scored at: ``member``'s default decoding with ``beam`` and
    the given fields (``length_alpha``, ``no_repeat_ngram``) overridden."""
    return bundle_decoding(read_config(resolve_bundle(member)), beam, **overrides)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def dev_scorer(
    ds: CaptionDataset,
    decoding: DecodeConfig,
    metric: str,
    *,
    precision: str = "auto",
    limit: int = 0,
    cache_root: Path | None = None,
    report: Callable[[str], None] = _stderr,
) -> SoupScorer:
    """Score bundles by ``metric`` (a key of ``METRIC_LABELS``, e.g. cider) on the dev split of
    ``ds`` (its first ``limit`` images if set) at ``decoding``'s beam size, ``length_alpha`` and
    ``no_repeat_ngram``. ``report`` gets one line per scored bundle."""
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_LABELS)}")
    fixed = {"length_alpha": decoding.length_alpha, "no_repeat_ngram": decoding.no_repeat_ngram}
    caches: dict[Path, Path] = {}

    def score(path: Path) -> float:
        cap = Captioner.load(path, precision, runtime="torch")
        caches[path] = FeatureCache.for_encoder(cap.encoder, cache_root).directory
        ev = evaluate(
            cap,
            ds,
            "dev",
            decoding.beam_size,
            limit=limit,
            cache_root=cache_root,
            meteor=False,
            **fixed,
        )
        value = round(float(ev.metrics[metric]), 4)
        report(f"{path.name}: dev {metric} {value}")
        return value

    def discard(path: Path) -> None:
        if path in caches:
            shutil.rmtree(caches.pop(path), ignore_errors=True)

    images = f"first {limit} dev images" if limit else "dev"
    label = f"{images} {METRIC_LABELS[metric]}, {decoding_label(decoding)}"
    return SoupScorer(score, discard, label)
