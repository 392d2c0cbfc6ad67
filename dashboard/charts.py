"""Plotly figures: corpus-metric bars and training curves, one colour per model everywhere."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from captioning.models.decoders import DECODER_KINDS
from captioning.models.metrics import METRIC_LABELS
from dashboard.tables import encoder_family

# ResNet models in blues, VGG models in oranges; darker = richer decoder.
FAMILY_SHADES = {
    "resnet": ("#8DB8E3", "#4C8CCB", "#1F5A96", "#0B2F5C"),
    "vgg": ("#F5BE82", "#EC9443", "#C0571B", "#7A3209"),
}
FALLBACK = ("#0F766E", "#7C3AED", "#DB2777", "#65A30D", "#0891B2", "#A16207", "#475569")


def model_colors(models: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    """``{name: colour}`` for ``(name, encoder, decoder)`` triples, stable across pages."""
    colors: dict[str, str] = {}
    spare = iter(FALLBACK * 4)
    for name, encoder, decoder in models:
        shades = FAMILY_SHADES.get(encoder_family(encoder))
        if shades and decoder in DECODER_KINDS[: len(shades)] and not encoder.endswith("-tv"):
            colors[name] = shades[DECODER_KINDS.index(decoder)]
        else:
            colors[name] = next(spare)
    return colors


MEMBER_TINTS = (0.0, 0.35, 0.6, 0.8)  # a soup's member lines: its colour blended toward white


def _tint(color: str, amount: float) -> str:
    """``#rrggbb`` blended toward white by ``amount`` (0 = unchanged)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02X}" for c in rgb)


def line_colors(history: pd.DataFrame, colors: dict[str, str]) -> dict[str, str]:
    """``colors`` extended to the lines of ``history`` (``tables.read_history``) that are not a
    bundle of their own, a soup's members: tints of their bundle's colour, one per line in
    order."""
    out, seen = dict(colors), {}
    lines = history[["model", "bundle"]].astype(str).drop_duplicates()
    for line, bundle in lines.itertuples(index=False):
        if line in out or bundle not in colors:
            continue
        k = seen[bundle] = seen.get(bundle, -1) + 1
        out[line] = _tint(colors[bundle], MEMBER_TINTS[k % len(MEMBER_TINTS)])
    return out


def _layout(fig: go.Figure, *, title: str, ytitle: str, height: int) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 15}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0},
        legend_title_text="",
        hovermode="x unified",
    )
    fig.update_yaxes(title_text=ytitle, rangemode="tozero")
    return fig


def metrics_bars(long: pd.DataFrame, colors: dict[str, str], *, title: str) -> go.Figure:
    """Grouped bars: one group per metric, one bar per model (``tables.metrics_long`` rows).

    Metrics missing for every model (METEOR without Java) are left out.
    """
    fig = go.Figure()
    present = long.groupby("metric", sort=False)["value"].apply(lambda v: v.notna().any())
    long = long[long["metric"].isin(present[present].index)]
    labels = [METRIC_LABELS[m] for m in dict.fromkeys(long["metric"])]
    for model, g in long.groupby("model", sort=False):
        fig.add_bar(
            name=str(model),
            x=g["label"],
            y=g["value"],
            marker_color=colors.get(str(model)),
            text=[f"{v:.1f}" if pd.notna(v) else "n/a" for v in g["value"]],
            textposition="outside",
            textfont={"size": 10},
            cliponaxis=False,
            hovertemplate="%{x}: %{y:.2f}<extra>" + str(model) + "</extra>",
        )
    # labels shrink to their bar's width; below 8 px (six models on a phone) they are hidden and
    # the hover and the table below give the numbers
    fig.update_layout(
        barmode="group", bargap=0.25, bargroupgap=0.05, uniformtext={"minsize": 8, "mode": "hide"}
    )
    fig.update_xaxes(categoryorder="array", categoryarray=labels)
    _layout(fig, title=title, ytitle="score (0–100)", height=420)
    fig.update_layout(hovermode="closest")
    return fig


STAGE_SYMBOLS = {"xe": "circle", "finetune": "square", "scst": "diamond"}


def _stage_symbols(g: pd.DataFrame) -> list[str]:
    """One marker per epoch: circles for cross-entropy epochs, squares for cross-entropy with
    the encoder block fine-tuned (``train --init … --finetune``), diamonds for SCST epochs."""
    return [STAGE_SYMBOLS.get(str(s), "circle") for s in g["stage"]]


def history_chart(
    history: pd.DataFrame,
    columns: dict[str, str],
    colors: dict[str, str],
    *,
    title: str,
    ytitle: str,
    exponent: bool = False,
) -> go.Figure:
    """Lines vs epoch, one colour per line (``line_colors``); ``columns`` maps history column
    -> hover label. No legend: the page shows one ``color_key`` for all its charts.

    With several columns (train and dev loss) the line style tells them apart: solid for
    train, dashed for dev. Markers tell the stage: circles for cross-entropy epochs, squares
    for fine-tuning epochs, diamonds for SCST epochs.
    """
    fig = go.Figure()
    colors = line_colors(history, colors)
    for model, g in history.groupby("model", sort=False):
        g = g.sort_values("epoch")
        for col in columns:
            if col not in g or g[col].isna().all():
                continue
            dev = col.startswith("dev") and len(columns) > 1
            fig.add_scatter(
                x=g["epoch"],
                y=g[col],
                name=str(model),
                mode="lines+markers",
                line={
                    "color": colors.get(str(model)),
                    "dash": "dash" if dev else "solid",
                    "width": 2,
                },
                marker={"size": 7, "symbol": _stage_symbols(g)},
                hovertemplate=f"{columns[col]}: %{{y:.4g}}<extra>{model}</extra>",
            )
    _layout(fig, title=title, ytitle=ytitle, height=320)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="epoch", dtick=1 if history["epoch"].nunique() <= 15 else None)
    if exponent:
        fig.update_yaxes(tickformat=".2~e")
    return fig


def color_key(history: pd.DataFrame, colors: dict[str, str]) -> str:
    """The lines of ``history`` as a one-paragraph key: a dot of each line's colour and its
    name (HTML for ``st.markdown(..., unsafe_allow_html=True)``)."""
    colors = line_colors(history, colors)
    lines = dict.fromkeys(history["model"].astype(str))
    return " &nbsp; ".join(
        f"<span style='white-space:nowrap'><span style='color:{colors.get(line, FALLBACK[-1])}'>"
        f"●</span>&nbsp;{html.escape(line)}</span>"
        for line in lines
    )
