"""Pandas views of the bundles: predictions, corpus metrics, training history, latency.

Pure functions (no Streamlit) so they are easy to test; the pages cache them via
``dashboard.state``. Nothing here parses a bundle file: ``captioning.reports`` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from captioning.bundle import reports
from captioning.bundle.catalog import BundleInfo
from captioning.bundle.format import is_ensemble
from captioning.models.bleu import BLEU_KEYS
from captioning.models.decoders import ATTENTION_KINDS, DECODER_KINDS
from captioning.models.metrics import METRIC_LABELS

DECODER_ORDER = DECODER_KINDS  # simplest first
BLEU_COLUMNS = BLEU_KEYS
PREDICTION_COLUMNS = ("model", "encoder", "decoder", "split", "beam", "default", "image",
                      "caption", "logprob", *BLEU_COLUMNS)  # fmt: skip
CHART_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "meteor")
HISTORY_COLUMNS = ("epoch", "stage", "train_loss", "dev_loss", "dev_bleu1", "dev_bleu2",
                   "dev_bleu3", "dev_bleu4", "dev_cider", "reward", "lr", "epoch_seconds",
                   "samples_per_s")  # fmt: skip
"""``stage`` is "xe" (cross-entropy), "finetune" (cross-entropy with the encoder's last block
tuned) or "scst"; ``reward`` (SCST only) is the mean CIDEr-D (×100)
of the sampled train captions."""
MEMBER_SEP = " · "  # a soup member's line on the Training page: "soup · member"
SORTS = {
    "score, high to low": ("score", False),
    "score, low to high": ("score", True),
    "log-prob, high to low": ("logprob", False),
    "log-prob, low to high": ("logprob", True),
    "image name": ("image", True),
}


def encoder_family(encoder: str) -> str:
    """``resnet50-tv`` -> ``resnet``, ``vgg16`` -> ``vgg``: the CNN family of an encoder."""
    return re.sub(r"[^a-z].*$", "", encoder.lower())


def pretty_encoder(encoder: str) -> str:
    """Display name of an encoder: ``resnet50`` -> ``ResNet50``; an ensemble's
    ``resnet50,vgg16`` -> ``ResNet50 + VGG16``."""
    if "," in encoder:
        return " + ".join(pretty_encoder(e) for e in encoder.split(","))
    names = {"resnet": "ResNet", "vgg": "VGG"}
    fam = encoder_family(encoder)
    return names.get(fam, fam) + encoder[len(fam) :].upper()


def pretty_encoder_group(group: str) -> str:
    """``resnet50`` -> ``ResNet50 encoder``; ``resnet50+layer4`` -> ``ResNet50 encoder, layer4
    fine-tuned``."""
    encoder, _, block = group.partition("+")
    if "," in encoder:
        return f"Ensembles of {pretty_encoder(encoder)}"
    return f"{pretty_encoder(encoder)} encoder" + (f", {block} fine-tuned" if block else "")


def model_sort_key(encoder: str, decoder: str, name: str = "") -> tuple:
    """Order models by encoder, then decoder (inject, merge, attention, others), then name."""
    rank = DECODER_ORDER.index(decoder) if decoder in DECODER_ORDER else len(DECODER_ORDER)
    return (encoder, rank, decoder, name)


def order_bundles(bundles: Iterable[BundleInfo]) -> list[BundleInfo]:
    """Bundles sorted for side-by-side display: ResNet50 before VGG16, inject before attention,
    ensembles last."""
    return sorted(
        bundles,
        key=lambda b: (
            is_ensemble(b.config),
            *model_sort_key(reports.encoder_group(b), b.decoder, b.name),
        ),
    )


def default_model(bundles: Sequence[BundleInfo]) -> BundleInfo:
    """The model the pages open with: the best dev CIDEr-D at its default decoding.

    Dev, never test, chooses (the evaluation protocol). Bundles without a dev record come last,
    attention decoders before the others, then the display order.
    """

    def rank(b: BundleInfo) -> tuple:
        cider = (reports.default_summary(b, "dev") or {}).get("cider")
        attends = b.decoder in ATTENTION_KINDS
        return (cider is not None, cider if cider is not None else 0.0, attends)

    return max(order_bundles(bundles), key=rank)  # max keeps the first of equal ranks


def default_beam(bundle: BundleInfo) -> int:
    """The bundle's default beam size."""
    return reports.default_decoding(bundle).beam_size


# ---------------------------------------------------------------- predictions


def read_predictions(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Every recorded predictions file of every bundle in one long table (PREDICTION_COLUMNS).

    ``default`` is True on the rows made with the bundle's own default decoding.
    """
    frames = []
    for b in order_bundles(bundles):
        for result, rows in reports.prediction_sets(b):
            if not rows:
                continue
            df = pd.DataFrame(rows).assign(model=b.name, encoder=b.encoder, decoder=b.decoder,
                                           split=result.setting.split, beam=result.beam,
                                           default=result.default)  # fmt: skip
            frames.append(df[list(PREDICTION_COLUMNS)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in PREDICTION_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _dtype(column: str) -> str:
    if column in ("logprob", *BLEU_COLUMNS):
        return "float64"
    return {"beam": "int64", "default": "bool"}.get(column, "object")


@dataclass
class PredictionFilter:
    """What the Explore page shows: splits, models, a score range, words and the sort."""

    splits: Sequence[str] = ()
    models: Sequence[str] = ()
    order: int = 4  # BLEU-n used for the range and the "score" sort
    score_range: tuple[float, float] = (0.0, 100.0)
    words: str = ""
    sort: str = "score, high to low"


def filter_predictions(df: pd.DataFrame, f: PredictionFilter) -> pd.DataFrame:
    """Rows matching ``f`` (empty ``splits``/``models`` mean all), sorted, index reset."""
    col = f"bleu{f.order}"
    lo, hi = f.score_range
    keep = df[col].between(lo, hi)
    if f.splits:
        keep &= df["split"].isin(list(f.splits))
    if f.models:
        keep &= df["model"].isin(list(f.models))
    for word in f.words.lower().split():
        keep &= df["caption"].str.lower().str.split().apply(lambda ws, w=word: w in ws)
    out = df[keep]
    key, ascending = SORTS.get(f.sort, SORTS["score, high to low"])
    key = col if key == "score" else key
    out = out.sort_values([key, "image", "model"], ascending=[ascending, True, True],
                          kind="stable", na_position="last")  # fmt: skip
    return out.reset_index(drop=True)


def captions_for_image(df: pd.DataFrame, image: str, split: str | None = None) -> pd.DataFrame:
    """Every model's caption of ``image`` (one row per model and beam), in model order."""
    rows = df[df["image"] == image]
    if split is not None:
        rows = rows[rows["split"] == split]
    keys = rows.apply(lambda r: model_sort_key(r["encoder"], r["decoder"], r["model"]), axis=1)
    if rows.empty:
        return rows.reset_index(drop=True)
    return (
        rows.assign(_k=keys).sort_values(["_k", "beam"]).drop(columns="_k").reset_index(drop=True)
    )


def disagreements(df: pd.DataFrame, order: int = 4, top: int = 25) -> pd.DataFrame:
    """Images whose ResNet and VGG captions (same decoder and split) differ most in BLEU-n.

    Each model is taken at its own default decoding (the ``default`` rows), so models tuned to
    different beams still pair. Columns: ``split, decoder, image, resnet_model, resnet_beam,
    resnet_caption, resnet_bleu, vgg_model, vgg_beam, vgg_caption, vgg_bleu, gap`` (``gap`` =
    resnet minus vgg), largest |gap| first.
    """
    col = f"bleu{order}"
    df = df[df["default"].astype(bool)]
    fam = df["encoder"].map(encoder_family)
    keys = ["split", "decoder", "image"]
    cols = [*keys, "model", "beam", "caption", col]
    res, vgg = df.loc[fam == "resnet", cols], df.loc[fam == "vgg", cols]
    pairs = res.merge(vgg, on=keys, suffixes=("_r", "_v"))
    out = pd.DataFrame({
        **{k: pairs[k] for k in keys},
        "resnet_model": pairs["model_r"],
        "resnet_beam": pairs["beam_r"],
        "resnet_caption": pairs["caption_r"],
        "resnet_bleu": pairs[f"{col}_r"],
        "vgg_model": pairs["model_v"],
        "vgg_beam": pairs["beam_v"],
        "vgg_caption": pairs["caption_v"],
        "vgg_bleu": pairs[f"{col}_v"],
    })  # fmt: skip
    out["gap"] = out["resnet_bleu"] - out["vgg_bleu"]
    out = out.assign(_abs=out["gap"].abs()).sort_values(["_abs", "image"], ascending=[False, True])
    return out.drop(columns="_abs").head(top).reset_index(drop=True)


# ---------------------------------------------------------------- metrics, history, latency


def metrics_entry(bundle: BundleInfo, split: str = "test") -> dict | None:
    """The bundle's corpus metrics on ``split`` at its default decoding (None if not recorded).

    Keys: every ``METRIC_LABELS`` metric present, ``n_images``, ``beam``, ``length_alpha``,
    ``precision`` and ``runtime``.
    """
    return reports.default_summary(bundle, split)


def corpus_metrics(bundles: Sequence[BundleInfo], split: str = "test") -> pd.DataFrame:
    """One row per model: ``model, beam, n_images`` and every metric (None when not computed)."""
    rows = []
    for b in order_bundles(bundles):
        m = metrics_entry(b, split)
        if m is None:
            continue
        rows.append({"model": b.name, "beam": m.get("beam"), "n_images": m.get("n_images"),
                     **{k: m.get(k) for k in METRIC_LABELS}})  # fmt: skip
    cols = ["model", "beam", "n_images", *METRIC_LABELS]
    return pd.DataFrame(rows, columns=cols).astype({k: "float64" for k in METRIC_LABELS})


def metrics_long(wide: pd.DataFrame, metrics: Sequence[str] = CHART_METRICS) -> pd.DataFrame:
    """``corpus_metrics`` melted to ``model, metric, label, value`` for a grouped bar chart."""
    long = wide.melt(id_vars=["model", "beam"], value_vars=list(metrics), var_name="metric")
    long["label"] = long["metric"].map(METRIC_LABELS)
    return long


def read_history(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Every bundle's ``history.json`` as one long table with a ``model`` column (a soup's
    epochs are labelled ``"soup · member"``, one line per member it averaged)."""
    frames = []
    for b in order_bundles(bundles):
        records = reports.read_history(b.path)
        if records:
            frame = pd.DataFrame(records).assign(model=b.name)
            if "member" in frame:  # a soup: one line per member it averaged
                tagged = frame["member"].notna()
                frame.loc[tagged, "model"] = b.name + MEMBER_SEP + frame.loc[tagged, "member"]
            # rows without a stage (single-stage runs): fine-tuning if the run tuned a block
            tuned = b.config.get("train_config", {}).get("finetune")
            unmarked = "finetune" if tuned else "xe"
            stage = frame["stage"] if "stage" in frame else pd.Series(None, index=frame.index)
            frames.append(frame.assign(stage=stage.where(stage.notna(), unmarked)))
    cols = ["model", *HISTORY_COLUMNS]
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    for c in cols:
        if c not in out:
            out[c] = float("nan")
    out["reward"] = out["reward"] * 100  # history.json keeps the raw CIDEr-D; ×100 like dev
    return out[cols]


def training_summary(history: pd.DataFrame, bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Per model: epochs run, best epoch, its dev BLEU-4 and CIDEr-D, seconds per epoch.

    The best epoch is the bundle's recorded one; a line without one (a soup's member) gets the
    epoch its training would have kept: the best dev CIDEr-D (else BLEU-4, for old histories).
    """
    best = {b.name: b.config.get("best_epoch") for b in bundles}
    rows = []
    for model, g in history.groupby("model", sort=False):
        pick = g[g["epoch"] == best.get(model)]
        scored = [c for c in ("dev_cider", "dev_bleu4") if g[c].notna().any()]
        if len(pick):
            row = pick.iloc[-1]
        elif scored:
            row = g.loc[g[scored[0]].idxmax()]
        else:
            row = g.iloc[-1]
        stages = g["stage"].value_counts(sort=False)
        rows.append({
            "model": model,
            "epochs": int(g["epoch"].max()),
            "stages": " + ".join(f"{n} {st}" for st, n in stages.items()),
            "best epoch": int(row["epoch"]),
            "dev BLEU-4": row["dev_bleu4"],
            "dev CIDEr-D": row["dev_cider"],
            "s / epoch": g["epoch_seconds"].mean(),
            "samples / s": g["samples_per_s"].mean(),
        })  # fmt: skip
    return pd.DataFrame(rows)


def latency_table(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Per model: precision, p50/p90 total ms at beams 1/3/5, encode/decode p50, images/s.

    Models without ``bench.json`` get ``status = "not benchmarked"`` and empty numbers.
    """
    rows = []
    for b in order_bundles(bundles):
        bench = reports.read_bench(b.path)
        row: dict = {"model": b.name}
        if bench is None:
            row["status"] = "not benchmarked"
            rows.append(row)
            continue
        row["status"] = f"{bench.get('precision', '?')}"
        beams = bench.get("beams") or {}
        for beam in ("1", "3", "5"):
            r = beams.get(beam) or {}
            tot = r.get("total_ms") or {}
            row[f"beam {beam} p50 ms"] = tot.get("p50")
            row[f"beam {beam} p90 ms"] = tot.get("p90")
        mid = beams.get("3") or next(iter(beams.values()), {})
        row["encode p50 ms"] = (mid.get("encode_ms") or {}).get("p50")
        row["decode p50 ms"] = (mid.get("decode_ms") or {}).get("p50")
        row["images / s"] = bench.get("throughput_img_s")
        rows.append(row)
    cols = ["model", "status", *(f"beam {k} {q} ms" for k in "135" for q in ("p50", "p90")),
            "encode p50 ms", "decode p50 ms", "images / s"]  # fmt: skip
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df:
            df[c] = None
    return df[cols].astype({c: "float64" for c in cols[2:]})


def nbest_table(nbest: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """A beam's n-best list: rank, caption, log-prob and log-prob per token (words + end)."""
    rows = []
    for rank, (text, logprob) in enumerate(nbest, start=1):
        tokens = len(text.split()) + 1  # the log-prob includes the end token
        rows.append({"rank": rank, "caption": text, "log-prob": logprob,
                     "per token": logprob / tokens})  # fmt: skip
    return pd.DataFrame(rows, columns=["rank", "caption", "log-prob", "per token"])
