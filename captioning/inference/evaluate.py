"""Evaluate a bundle on a Flickr8k split: corpus metrics, per-image scores, predictions CSV.

Protocol: the split's images, all their references, corpus BLEU-1..4 (no smoothing), CIDEr-D,
METEOR and ROUGE-L on identical tokenisation. Each prediction also carries the caption's
confidence (``captioning.models.confidence``), its CIDEr-D against its own references (the
corpus CIDEr-D is their mean) and its smoothed sentence BLEU. Every result carries its full
``Setting`` (split, decoding, precision, runtime), and ``save_evaluation`` records it under that
setting only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from captioning.bundle.records import Setting, add_record, metrics_path
from captioning.core.files import atomic_write_text
from captioning.data import CaptionDataset
from captioning.inference.captioner import Captioner
from captioning.models.bleu import BLEU_KEYS, sentence_bleu_smoothed
from captioning.models.cider import CiderD
from captioning.models.confidence import confidence
from captioning.models.decoding import DecodeConfig, Hypothesis
from captioning.models.metrics import evaluate_captions
from captioning.runtime.features import FeatureCache, extract

PREDICTION_FIELDS = ("image", "caption", "logprob", "confidence", "cider", *BLEU_KEYS)


@dataclass
class Evaluation:
    setting: Setting
    metrics: dict  # BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, n_images, meteor_error
    predictions: list[dict]  # PREDICTION_FIELDS (per image; sentence BLEU smoothed)

    @property
    def summary(self) -> dict:
        """The scores with the setting that made them, flat (the CLI's ``--json`` line)."""
        s = self.setting
        return {
            **self.metrics,
            "split": s.split,
            "limit": s.limit,
            "beam": s.decoding.beam_size,
            "length_alpha": s.decoding.length_alpha,
            "decoding": s.to_dict()["decoding"],
            "precision": s.precision,
            "runtime": s.runtime,
        }


def split_features(cap: Captioner, ds: CaptionDataset, names: list[str], cache_root: Path | None):
    """Features from the cache when present (extracting any missing ones first); an ensemble
    gets each member's."""
    from captioning.inference.captioner import EnsembleCaptioner
    from captioning.models.mixture import MemberFeatures

    if isinstance(cap, EnsembleCaptioner):
        return MemberFeatures(split_features(m, ds, names, cache_root) for m in cap.members)
    cache = FeatureCache.for_encoder(cap.encoder, cache_root)
    cached = cache.cached_names()  # one manifest read, not one per image
    missing = [n for n in names if n not in cached]
    if missing:
        extract(cap.encoder, [(n, ds.image_path(n)) for n in missing], cache)
    feats = cache.load(names, with_grid=cap.uses_grid)  # rows in cache order
    rows = feats.rows(names)
    return (feats.grid if cap.uses_grid else feats.pooled).index_select(0, rows)  # in names order


def evaluate(
    cap: Captioner,
    ds: CaptionDataset,
    split: str,
    beam: int | None = None,
    *,
    limit: int = 0,
    cache_root: Path | None = None,
    batch: int = 100,
    meteor: bool = True,
    **decode_overrides,
) -> Evaluation:
    """Score ``cap`` on ``split`` (first ``limit`` images if set); ``beam`` None = the bundle's."""
    names = split_names(ds, split, limit)
    cfg = cap.decode_config(beam, **decode_overrides)
    best = decode_split(cap, ds, names, cfg, cache_root=cache_root, batch=batch, desc=split)
    hyps = {n: cap.vocab.decode(h.tokens) for n, h in best.items()}
    refs = {n: ds.captions[n] for n in names}
    metrics = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in evaluate_captions(hyps, refs, meteor=meteor).items()
    }
    cider = image_cider(hyps, refs)
    preds = []
    for n in names:
        s = sentence_bleu_smoothed(hyps[n], refs[n])
        preds.append(
            {
                "image": n,
                "caption": hyps[n],
                "logprob": round(best[n].logprob, 4),
                "confidence": round(confidence(best[n].token_logprobs), 4),
                "cider": round(cider[n], 2),
                **{k: round(v, 2) for k, v in s.items()},
            }
        )
    setting = Setting(split, cfg, cap.precision_label, cap.runtime, limit)
    return Evaluation(setting, metrics, preds)


def split_names(ds: CaptionDataset, split: str, limit: int = 0) -> list[str]:
    """The images of ``split`` (its first ``limit`` if set); ValueError for an unknown split."""
    if split not in ds.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(ds.splits)}")
    return ds.splits[split][:limit] if limit else ds.splits[split]


def decode_split(
    cap: Captioner,
    ds: CaptionDataset,
    names: list[str],
    cfg: DecodeConfig,
    *,
    cache_root: Path | None = None,
    batch: int = 100,
    desc: str = "",
) -> dict[str, Hypothesis]:
    """The best caption of each image of ``names`` (features from the cache), in order."""
    feats = split_features(cap, ds, names, cache_root)
    best = {}
    # only the best caption is scored: a pool of one finishes the search sooner, same captions
    top1 = replace(cfg, n_best=1)
    label = f"decode {desc} beam {cfg.beam_size}".replace("  ", " ")
    for i in tqdm(range(0, len(names), batch), desc=label, unit="batch"):
        chunk = names[i : i + batch]
        for name, nbest in zip(chunk, cap.decode_features(feats[i : i + batch], top1), strict=True):
            best[name] = nbest[0]
    return best


def image_cider(hyps: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """Each image's CIDEr-D (0-100, the corpus figure's scale) against its own references, with
    document frequencies from the evaluated set's references (so their mean is the corpus
    CIDEr-D)."""
    names = list(hyps)
    scores = CiderD(refs).score([hyps[n] for n in names], names)
    return {n: float(v) * 100 for n, v in zip(names, scores, strict=True)}


def write_predictions(path: Path, preds: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(PREDICTION_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows(preds)
    atomic_write_text(path, buf.getvalue())


def save_evaluation(ev: Evaluation, directory: Path) -> list[str]:
    """Write the predictions CSV and the metrics record of ``ev`` into ``directory``.

    ``directory`` is a bundle (then its card is re-rendered) or any output folder. Only the
    record of the very same setting is replaced. Returns one line per file written.
    """
    from captioning.bundle.card import write_card

    directory.mkdir(parents=True, exist_ok=True)
    name = ev.setting.predictions_name()
    write_predictions(directory / name, ev.predictions)
    metrics = {k: v for k, v in ev.metrics.items() if k != "n_images"}
    _, replaced = add_record(directory, ev.setting, ev.metrics["n_images"], metrics, name)
    what = "replaced the record of" if replaced else "added a record for"
    lines = [
        f"wrote {directory / name}",
        f"wrote {metrics_path(directory)} ({what} {ev.setting.label})",
    ]
    if (directory / "config.json").exists():
        lines.append(f"wrote {write_card(directory)}")
    return lines
