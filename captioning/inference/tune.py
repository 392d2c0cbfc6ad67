"""Choose a bundle's default decoding on dev: a grid of beams, α and n-gram blocking."""

from __future__ import annotations

from pathlib import Path

from captioning.data import CaptionDataset
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import evaluate
from captioning.models.metrics import HEADLINE_KEYS

TUNE_METRICS = ("cider", "bleu4")
"""What ``tune_decoding`` may select on: CIDEr-D (as training selects checkpoints) or BLEU-4."""


def tune_decoding(
    cap: Captioner,
    ds: CaptionDataset,
    beams=(1, 3, 5),
    alphas=(0.0, 0.5, 1.0),
    cache_root: Path | None = None,
    ngrams=(0,),
    metric: str = "cider",
) -> tuple[dict, list[dict]]:
    """Pick beam size, length normalisation α and n-gram blocking by a dev ``metric``.

    Every beam x α (α only for beam > 1) x ``no_repeat_ngram`` is scored on the dev split, never
    on test. Ties go to the smaller beam, then to the smaller blocking size.
    """
    if metric not in TUNE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(TUNE_METRICS)}")
    rows = []
    for beam in beams:
        for alpha in alphas if beam > 1 else (0.0,):
            for ngram in ngrams:
                decoding = {"length_alpha": alpha, "no_repeat_ngram": ngram}
                ev = evaluate(cap, ds, "dev", beam, cache_root=cache_root, meteor=False, **decoding)
                rows.append(
                    {
                        "beam": beam,
                        "length_alpha": alpha,
                        "no_repeat_ngram": ngram,
                        **{k: round(ev.metrics[k], 2) for k in HEADLINE_KEYS},
                    }
                )
    best = max(rows, key=lambda r: (r[metric], -r["beam"], -r["no_repeat_ngram"]))
    return best, rows
