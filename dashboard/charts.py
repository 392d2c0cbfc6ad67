"""Plotly figures: corpus-metric bars and training curves, one colour per model everywhere."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from captioning.models.metrics import METRIC_LABELS

# Qualitative palette (D3's category10): ten hues that stay apart on white and for most colour
# vision; bundle k in display order gets colour k, on every page.
PALETTE = (
    "#1F77B4",
    "#FF7F0E",
    "#2CA02C",
    "#D62728",
    "#9467BD",
    "#8C564B",
    "#E377C2",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
)
FALLBACK = PALETTE[7]  # a line whose bundle has no colour


def model_colors(names: Sequence[str]) -> dict[str, str]:
    """``{name: colour}`` for the bundles ``names`` in display order (``state.bundles()``): the
    same name gets the same colour on every page; after ten, colours repeat."""
    return {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(dict.fromkeys(names))}


MEMBER_SHADES = (-0.45, 0.6)  # a soup's member lines: its colour, darkest to lightest


def shade(color: str, amount: float) -> str:
    """``#rrggbb`` blended toward white by ``amount`` > 0, toward black by ``amount`` < 0."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    target = 255 if amount > 0 else 0
    return "#" + "".join(f"{round(c + (target - c) * abs(amount)):02X}" for c in rgb)


def line_colors(history: pd.DataFrame, colors: dict[str, str]) -> dict[str, str]:
    """``colors`` extended to the lines of ``history`` (``tables.read_history``) that are not a
    bundle of their own, a soup's members: shades of their bundle's colour, evenly spread from
    dark to light in line order."""
    out = dict(colors)
    lines = history[["model", "bundle"]].astype(str).drop_duplicates()
    members = lines[(lines["model"] != lines["bundle"]) & lines["bundle"].isin(list(colors))]
    dark, light = MEMBER_SHADES
    for bundle, group in members.groupby("bundle", sort=False):
        n = len(group)
        for k, line in enumerate(group["model"]):
            amount = 0.0 if n == 1 else dark + (light - dark) * k / (n - 1)
            out[line] = shade(colors[str(bundle)], amount)
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
    for fine-tuning epochs, diamonds for SCST epochs. Where ``history`` has ``runs``
    (``tables.bundle_lines``), the hover says how many runs a point averages.
    """
    fig = go.Figure()
    colors = line_colors(history, colors)
    for model, g in history.groupby("model", sort=False):
        g = g.sort_values("epoch")
        runs = g["runs"] if "runs" in g else pd.Series(1, index=g.index)
        note = [f" (mean of {n} runs)" if n > 1 else "" for n in runs]
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
                customdata=note,
                hovertemplate=f"{columns[col]}: %{{y:.4g}}%{{customdata}}<extra>{model}</extra>",
            )
    _layout(fig, title=title, ytitle=ytitle, height=320)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="epoch", dtick=1 if history["epoch"].nunique() <= 15 else None)
    if exponent:
        fig.update_yaxes(tickformat=".2~e")
    return fig


KEY_CLASS = "line-key"  # each entry of ``color_key``: a <span> of this class


def _swatch(color: str) -> str:
    """A short line with a dot, as a chart draws a line (inline SVG)."""
    return (
        "<svg width='22' height='10' aria-hidden='true' style='vertical-align:middle'>"
        f"<line x1='0' y1='5' x2='22' y2='5' stroke='{color}' stroke-width='2.5'/>"
        f"<circle cx='11' cy='5' r='3.5' fill='{color}'/></svg>"
    )


def color_key(history: pd.DataFrame, colors: dict[str, str]) -> str:
    """The lines of ``history`` as a one-paragraph key, the legend of all charts drawn from it:
    each line's colour and name in a ``KEY_CLASS`` span (HTML for ``st.markdown(...,
    unsafe_allow_html=True)``)."""
    colors = line_colors(history, colors)
    lines = dict.fromkeys(history["model"].astype(str))
    return " &nbsp; ".join(
        f"<span class='{KEY_CLASS}' style='white-space:nowrap'>"
        f"{_swatch(colors.get(line, FALLBACK))}&nbsp;{html.escape(line)}</span>"
        for line in lines
    )
