"""Pandas views of the bundles: predictions, corpus metrics, training history, latency.

Pure functions (no Streamlit) so they are easy to test; the pages cache them via
``dashboard.state``. Every fact comes from ``captioning.bundle``: ``reports`` (records,
predictions, display order), ``history`` (epochs, stages, best epochs) and ``latency``
(``bench.json``); this module only arranges them as tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from captioning.bundle import history, latency, reports
from captioning.bundle.catalog import BundleInfo
from captioning.models.bleu import BLEU_KEYS
from captioning.models.metrics import METRIC_LABELS

BLEU_COLUMNS = BLEU_KEYS
PREDICTION_COLUMNS = (
    "model",
    "encoder",
    "decoder",
    "split",
    "beam",
    "default",
    "precision",
    "runtime",
    "image",
    "caption",
    "logprob",
    "confidence",
    *BLEU_COLUMNS,
)
"""``default``: made with the bundle's own default decoding; ``confidence``: how sure the model
is of its caption (0-1, from its own word probabilities), NaN where the file records none."""
CHART_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "meteor")
HISTORY_COLUMNS = (
    "epoch",
    "stage",
    "train_loss",
    "dev_loss",
    "dev_bleu1",
    "dev_bleu2",
    "dev_bleu3",
    "dev_bleu4",
    "dev_cider",
    "reward",
    "lr",
    "epoch_seconds",
    "samples_per_s",
)
"""``stage`` is one of ``history.STAGES``; ``reward`` (SCST only) is the mean CIDEr-D (×100) of
the sampled train captions."""
SUMMARY_METRICS = ("bleu4", "cider", "distinct", "repeat_trigram")  # the Explore score table
SORTS = {
    "score, high to low": ("score", False),
    "score, low to high": ("score", True),
    "confidence, high to low": ("confidence", False),
    "confidence, low to high": ("confidence", True),
    "log-prob, high to low": ("logprob", False),
    "log-prob, low to high": ("logprob", True),
    "image name": ("image", True),
}
FULL_CONFIDENCE = (0.0, 1.0)


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


# ---------------------------------------------------------------- predictions


def read_predictions(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Every recorded predictions file of every bundle in one long table (PREDICTION_COLUMNS).

    ``default`` is True on the rows made with the bundle's own default decoding.
    """
    frames = []
    for b in reports.order_bundles(bundles):
        for result, rows in reports.prediction_sets(b):
            if not rows:
                continue
            df = pd.DataFrame(rows).assign(
                model=b.name,
                encoder=b.encoder,
                decoder=b.decoder,
                split=result.setting.split,
                beam=result.beam,
                default=result.default,
                precision=result.setting.precision,
                runtime=result.setting.runtime,
            )
            if "confidence" not in df:
                df["confidence"] = float("nan")
            frames.append(df[list(PREDICTION_COLUMNS)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in PREDICTION_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _dtype(column: str) -> str:
    if column in ("logprob", "confidence", *BLEU_COLUMNS):
        return "float64"
    return {"beam": "int64", "default": "bool"}.get(column, "object")


def has_confidence(df: pd.DataFrame) -> bool:
    """Whether any row of ``df`` (``read_predictions``) records the model's confidence."""
    return "confidence" in df and bool(df["confidence"].notna().any())


def sort_options(df: pd.DataFrame) -> list[str]:
    """The ``SORTS`` that apply to ``df``: the confidence sorts only when it has confidences."""
    if has_confidence(df):
        return list(SORTS)
    return [k for k, (key, _) in SORTS.items() if key != "confidence"]


@dataclass
class PredictionFilter:
    """What the Explore page shows: splits, models, a score range, words, the sort, a confidence
    range and whether only each model's default decoding."""

    splits: Sequence[str] = ()
    models: Sequence[str] = ()
    order: int = 4  # BLEU-n used for the range and the "score" sort
    score_range: tuple[float, float] = (0.0, 100.0)
    words: str = ""
    sort: str = "score, high to low"
    confidence_range: tuple[float, float] = FULL_CONFIDENCE
    default_only: bool = False


def filter_predictions(df: pd.DataFrame, f: PredictionFilter) -> pd.DataFrame:
    """Rows matching ``f`` (empty ``splits``/``models`` mean all), sorted, index reset.

    A confidence range narrower than ``FULL_CONFIDENCE`` keeps only rows with a confidence in
    it; the full range keeps rows without one too. Rows without the sort's value come last.
    """
    col = f"bleu{f.order}"
    lo, hi = f.score_range
    keep = df[col].between(lo, hi)
    if tuple(f.confidence_range) != FULL_CONFIDENCE:
        keep &= df["confidence"].between(*f.confidence_range)
    if f.default_only:
        keep &= df["default"].astype(bool)
    if f.splits:
        keep &= df["split"].isin(list(f.splits))
    if f.models:
        keep &= df["model"].isin(list(f.models))
    for word in f.words.lower().split():
        keep &= df["caption"].str.lower().str.split().apply(lambda ws, w=word: w in ws)
    out = df[keep]
    key, ascending = SORTS.get(f.sort, SORTS["score, high to low"])
    key = col if key == "score" else key
    out = out.sort_values(
        [key, "image", "model"],
        ascending=[ascending, True, True],
        kind="stable",
        na_position="last",
    )
    return out.reset_index(drop=True)


def captions_for_image(
    df: pd.DataFrame, image: str, split: str | None = None, *, default_only: bool = False
) -> pd.DataFrame:
    """Every model's caption of ``image`` (one row per model and setting; with
    ``default_only`` one per model, at its default decoding), the models in the order they
    first appear in ``df`` (``read_predictions``: display order), then by beam."""
    order = {m: i for i, m in enumerate(dict.fromkeys(df["model"]))}
    rows = df[df["image"] == image]
    if split is not None:
        rows = rows[rows["split"] == split]
    if default_only:
        rows = rows[rows["default"].astype(bool)]
    rows = rows.assign(_k=rows["model"].map(order)).sort_values(["_k", "beam"], kind="stable")
    return rows.drop(columns="_k").reset_index(drop=True)


def setting_labels(rows: pd.DataFrame) -> list[str]:
    """A label per row of ``captions_for_image``: the model, with its beam when the rows' beams
    differ, and its precision and runtime too when a model has several rows."""
    many_beams = rows["beam"].nunique() > 1
    repeated = rows["model"].duplicated(keep=False)
    out = []
    for (_, r), again in zip(rows.iterrows(), repeated, strict=True):
        if again:
            out.append(f"{r['model']} (beam {r['beam']} · {r['precision']} {r['runtime']})")
        else:
            out.append(f"{r['model']} (beam {r['beam']})" if many_beams else str(r["model"]))
    return out


def disagreements(df: pd.DataFrame, order: int = 4, top: int = 25) -> pd.DataFrame:
    """Images whose ResNet and VGG captions (same decoder and split) differ most in BLEU-n.

    Each model is taken at its own default decoding (the ``default`` rows), so models tuned to
    different beams still pair. Columns: ``split, decoder, image``, then for each side
    (``resnet_``, ``vgg_``) ``model, beam, caption, bleu, confidence``, then ``gap`` (resnet
    minus vgg), largest |gap| first. One image can pair several models of one family with the
    same model of the other (``resnet50-merge`` and ``resnet50-merge-ft`` with ``vgg16-merge``).
    """
    col = f"bleu{order}"
    df = df[df["default"].astype(bool)]
    if "confidence" not in df:
        df = df.assign(confidence=float("nan"))
    fam = df["encoder"].map(encoder_family)
    keys = ["split", "decoder", "image"]
    cols = [*keys, "model", "beam", "caption", col, "confidence"]
    res, vgg = df.loc[fam == "resnet", cols], df.loc[fam == "vgg", cols]
    pairs = res.merge(vgg, on=keys, suffixes=("_r", "_v"))
    out = pd.DataFrame(
        {
            **{k: pairs[k] for k in keys},
            "resnet_model": pairs["model_r"],
            "resnet_beam": pairs["beam_r"],
            "resnet_caption": pairs["caption_r"],
            "resnet_bleu": pairs[f"{col}_r"],
            "resnet_confidence": pairs["confidence_r"],
            "vgg_model": pairs["model_v"],
            "vgg_beam": pairs["beam_v"],
            "vgg_caption": pairs["caption_v"],
            "vgg_bleu": pairs[f"{col}_v"],
            "vgg_confidence": pairs["confidence_v"],
        }
    )
    out["gap"] = out["resnet_bleu"] - out["vgg_bleu"]
    out = out.assign(_abs=out["gap"].abs()).sort_values(
        ["_abs", "image", "resnet_model", "vgg_model"], ascending=[False, True, True, True]
    )
    return out.drop(columns="_abs").head(top).reset_index(drop=True)


# ---------------------------------------------------------------- metrics, history, latency


def corpus_metrics(bundles: Sequence[BundleInfo], split: str = "test") -> pd.DataFrame:
    """One row per model: ``model, beam, n_images`` and every metric (None when not computed),
    at the model's default decoding (``reports.default_summary``)."""
    rows = []
    for b in reports.order_bundles(bundles):
        m = reports.default_summary(b, split)
        if m is None:
            continue
        rows.append(
            {
                "model": b.name,
                "beam": m.get("beam"),
                "n_images": m.get("n_images"),
                **{k: m.get(k) for k in METRIC_LABELS},
            }
        )
    cols = ["model", "beam", "n_images", *METRIC_LABELS]
    return pd.DataFrame(rows, columns=cols).astype({k: "float64" for k in METRIC_LABELS})


def score_summary(bundles: Sequence[BundleInfo], split: str) -> pd.DataFrame:
    """Per model on ``split`` at its default decoding: corpus BLEU-4 and CIDEr-D and the
    distinct-caption and repeated-trigram shares (%) (``reports.default_scores``)."""
    rows = []
    for b in reports.order_bundles(bundles):
        m = reports.default_scores(b, split)
        if m is not None:
            rows.append(
                {"model": b.name, "beam": m.get("beam"), **{k: m.get(k) for k in SUMMARY_METRICS}}
            )
    cols = ["model", "beam", *SUMMARY_METRICS]
    return pd.DataFrame(rows, columns=cols).astype({k: "float64" for k in SUMMARY_METRICS})


def metrics_long(wide: pd.DataFrame, metrics: Sequence[str] = CHART_METRICS) -> pd.DataFrame:
    """``corpus_metrics`` melted to ``model, metric, label, value`` for a grouped bar chart."""
    long = wide.melt(id_vars=["model", "beam"], value_vars=list(metrics), var_name="metric")
    long["label"] = long["metric"].map(METRIC_LABELS)
    return long


def read_history(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Every bundle's epochs (``history.history_lines``) in one long table: ``model`` names the
    line (a soup has one per member it averaged, ``"soup · member"``), ``bundle`` the bundle it
    belongs to, then HISTORY_COLUMNS."""
    rows = [e for b in reports.order_bundles(bundles) for e in history.history_lines(b)]
    cols = ["model", "bundle", *HISTORY_COLUMNS]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows).rename(columns={"line": "model"})
    for c in cols:
        if c not in out:
            out[c] = float("nan")
    return out[cols]


def soups(history: pd.DataFrame) -> list[str]:
    """The bundles of ``read_history`` rows drawn as member lines (a soup's runs), in order."""
    lines = history[["model", "bundle"]].astype(str)
    return list(dict.fromkeys(lines.loc[lines["model"] != lines["bundle"], "bundle"]))


def bundle_lines(history: pd.DataFrame) -> pd.DataFrame:
    """``read_history`` rows as one line per bundle, with ``runs``: the runs each point averages.

    A soup's member lines become one line named after the soup: per epoch, the mean of the
    members that ran it, with the first of their stages. Other bundles' lines are unchanged
    (``runs`` 1).
    """
    history = history.assign(runs=1)
    soup_rows = history["bundle"].isin(soups(history))
    if not soup_rows.any():
        return history.reset_index(drop=True)
    numbers = [c for c in HISTORY_COLUMNS if c not in ("epoch", "stage")]
    rows = history[soup_rows].assign(
        **{c: pd.to_numeric(history.loc[soup_rows, c], errors="coerce") for c in numbers}
    )
    groups = rows.groupby(["bundle", "epoch"], sort=False)
    merged = groups[numbers].mean().join(groups["stage"].first())
    merged["runs"] = groups["model"].nunique()
    merged = merged.reset_index()
    merged["model"] = merged["bundle"]
    out = pd.concat([history[~soup_rows], merged[history.columns]], ignore_index=True)
    order = {b: i for i, b in enumerate(dict.fromkeys(history["bundle"]))}
    out = out.assign(_k=out["bundle"].map(order)).sort_values("_k", kind="stable")
    return out.drop(columns="_k").reset_index(drop=True)


def shown_history(history: pd.DataFrame, bundles: Sequence[str], members: bool) -> pd.DataFrame:
    """The lines of ``bundles`` the Training page draws: each soup member's own line when
    ``members``, else one line per bundle (``bundle_lines``)."""
    chosen = history[history["bundle"].isin(list(bundles))]
    return chosen.assign(runs=1).reset_index(drop=True) if members else bundle_lines(chosen)


SUMMARY_COLUMNS = (
    "model",
    "epochs",
    "stages",
    "best epoch",
    "dev BLEU-4",
    "dev CIDEr-D",
    "s / epoch",
    "samples / s",
)


def training_summary(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Per line (``history.training_summary``): epochs and stages run, the epoch the weights
    come from, its dev BLEU-4 and CIDEr-D, mean seconds per epoch and samples per second."""
    rows = [
        [s.line, s.epochs, s.stages_label, s.best_epoch]
        + [s.dev_bleu4, s.dev_cider, s.epoch_seconds, s.samples_per_s]
        for b in reports.order_bundles(bundles)
        for s in history.training_summary(b)
    ]
    numbers = {c: "float64" for c in SUMMARY_COLUMNS[4:]}
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).astype(numbers)


def shown_summary(
    summary: pd.DataFrame, history: pd.DataFrame, bundles: Sequence[str], members: bool
) -> pd.DataFrame:
    """The ``training_summary`` rows of ``bundles``, as ``shown_history`` draws their lines.

    Without ``members`` a soup's member rows become one row named after the soup: ``stages``
    "soup of N runs", its last epoch, and the mean seconds per epoch and samples per second of
    its members' epochs. It has no best epoch or dev scores (NaN): its weights are the
    average of its members', from no epoch of theirs.
    """
    lines = history[["model", "bundle"]].astype(str).drop_duplicates()
    bundle_of = dict(zip(lines["model"], lines["bundle"], strict=True))
    rows = summary[summary["model"].map(bundle_of).isin(list(bundles))]
    if members:
        return rows.reset_index(drop=True)
    out = []
    for bundle in dict.fromkeys(rows["model"].map(bundle_of)):
        mine = rows[rows["model"].map(bundle_of) == bundle]
        if bundle not in soups(history):
            out.append(mine)
            continue
        epochs = history[history["bundle"] == bundle]
        numbers = {
            c: pd.to_numeric(epochs[k], errors="coerce").mean()
            for c, k in (("s / epoch", "epoch_seconds"), ("samples / s", "samples_per_s"))
        }
        soup = {"model": bundle, "epochs": int(mine["epochs"].max())}
        soup |= {"stages": f"soup of {len(mine)} runs", "best epoch": None, **numbers}
        out.append(pd.DataFrame([soup], columns=list(SUMMARY_COLUMNS)))
    if not out:
        return rows.iloc[0:0].reset_index(drop=True)
    return pd.concat(out, ignore_index=True).astype({c: "float64" for c in SUMMARY_COLUMNS[4:]})


def dev_decoding(bundles: Sequence[BundleInfo]) -> str:
    """How training decoded dev for ``bundles``: ``greedy`` or e.g. ``beam 1/3``."""
    beams = sorted({history.dev_beam(b.config) for b in bundles})
    return "greedy" if beams in ([], [1]) else "beam " + "/".join(map(str, beams))


LATENCY_COLUMNS = (
    "model",
    "status",
    *(f"beam {k} {q} ms" for k in latency.BENCH_BEAMS for q in ("p50", "p90")),
    "encode p50 ms",
    "decode p50 ms",
    "images / s",
)
NOT_BENCHMARKED = "not benchmarked"


def latency_table(bundles: Sequence[BundleInfo]) -> pd.DataFrame:
    """Per model (``latency.bench_summary``): precision, p50/p90 total ms at beams 1/3/5,
    encode/decode p50 and images/s. Models without ``bench.json`` get
    ``status = NOT_BENCHMARKED`` and empty numbers."""
    rows = []
    for b in reports.order_bundles(bundles):
        s = latency.bench_summary(b)
        if s is None:
            rows.append([b.name, NOT_BENCHMARKED, *[None] * (len(LATENCY_COLUMNS) - 2)])
            continue
        totals = [ms for beam in latency.BENCH_BEAMS for ms in s.total_ms.get(beam, (None, None))]
        rows.append([b.name, s.precision, *totals, s.encode_p50, s.decode_p50, s.images_per_s])
    df = pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))
    return df.astype({c: "float64" for c in LATENCY_COLUMNS[2:]})


def nbest_table(nbest: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """A beam's n-best list: rank, caption, log-prob and log-prob per token (words + end)."""
    rows = []
    for rank, (text, logprob) in enumerate(nbest, start=1):
        tokens = len(text.split()) + 1  # the log-prob includes the end token
        rows.append(
            {"rank": rank, "caption": text, "log-prob": logprob, "per token": logprob / tokens}
        )
    return pd.DataFrame(rows, columns=["rank", "caption", "log-prob", "per token"])
