"""Which confidence form a user can trust: its Spearman correlation with per-image quality.

``study`` captions a split at the bundle's default decoding and correlates each candidate form of
``captioning.models.confidence.FORMS`` with the per-image CIDEr-D and smoothed sentence BLEU-4.
``write_study`` keeps the result in the bundle's ``confidence.json`` (``captioning confidence``
runs both; ``captioning confidence --show`` prints the stored tables).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

from captioning.bundle.records import Setting
from captioning.core.files import atomic_write_json, read_json
from captioning.data import CaptionDataset
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import decode_split, image_cider, split_names
from captioning.models.bleu import sentence_bleu_smoothed
from captioning.models.confidence import FORMS, confidence, spearman

STUDY_FILE = "confidence.json"
STUDY_FORMAT = "captioning-confidence"
TARGETS = ("cider", "bleu4")  # per-image quality the forms are correlated with


@dataclass
class ConfidenceStudy:
    model: str
    setting: str  # the evaluation setting's label, e.g. "dev beam 3 α 0.5 int8 openvino"
    n_images: int
    spearman: dict[str, dict[str, float]]  # form -> target -> rho
    mean: dict[str, float]  # form -> mean confidence over the split

    def to_dict(self) -> dict:
        return {"format": STUDY_FORMAT, "version": 1, **asdict(self)}


def study(
    cap: Captioner,
    ds: CaptionDataset,
    split: str = "dev",
    *,
    cache_root: Path | None = None,
    batch: int = 100,
) -> ConfidenceStudy:
    """Caption ``split`` at the bundle's default decoding and correlate every confidence form
    with each image's CIDEr-D and BLEU-4."""
    names = split_names(ds, split)
    cfg = cap.decode_config()
    best = decode_split(cap, ds, names, cfg, cache_root=cache_root, batch=batch, desc=split)
    hyps = {n: cap.vocab.decode(h.tokens) for n, h in best.items()}
    refs = {n: ds.captions[n] for n in names}
    cider = image_cider(hyps, refs)
    quality = {
        "cider": [cider[n] for n in names],
        "bleu4": [sentence_bleu_smoothed(hyps[n], refs[n])["bleu4"] for n in names],
    }
    rho, mean = {}, {}
    for form in FORMS:
        conf = [confidence(best[n].token_logprobs, form) for n in names]
        rho[form] = {t: round(spearman(conf, quality[t]), 4) for t in TARGETS}
        mean[form] = round(sum(conf) / len(conf), 4)
    setting = Setting(split, cfg, cap.precision_label, cap.runtime)
    return ConfidenceStudy(cap.name, setting.label, len(names), rho, mean)


def write_study(bundle: Path, result: ConfidenceStudy) -> Path:
    """Write ``result`` as the bundle's ``confidence.json`` (atomically)."""
    path = bundle / STUDY_FILE
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(path, {**result.to_dict(), "created": stamp})
    return path


def read_study(bundle: Path) -> ConfidenceStudy | None:
    """The bundle's stored study, or None when it has none (or an unreadable one)."""
    path = bundle / STUDY_FILE
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        if d.get("format") != STUDY_FORMAT:
            return None
        keys = ("model", "setting", "n_images", "spearman", "mean")
        return ConfidenceStudy(**{k: d[k] for k in keys})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_form(studies: list[ConfidenceStudy], target: str = "cider") -> str:
    """The form with the highest mean correlation with ``target`` across ``studies``."""
    if not studies:
        raise ValueError("no confidence studies to choose a form from")
    return max(FORMS, key=lambda f: sum(s.spearman[f][target] for s in studies) / len(studies))
