"""Training page: loss, dev BLEU-4, dev CIDEr-D and learning rate per epoch, one line per bundle."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, components, state, tables

st.title("Training curves", anchor=False)
st.markdown(
    "Each bundle's `history.json`: one point per epoch. Dev scores are corpus scores on the dev "
    "split, decoded during training; the checkpoint kept is the one with the best dev CIDEr-D. "
    "A bundle started from another (`train --init`) continues that bundle's cross-entropy "
    "epochs (●) with its own: SCST epochs (◆), whose reward is the mean CIDEr-D of the "
    "captions it sampled for the train images, or epochs that fine-tune the encoder's last "
    "block with the decoder (■). A weight-averaged soup "
    "(`python -m captioning soup A B --out C`) is drawn as the mean of the runs it averaged; "
    "*Show soup members* draws each run in a shade of the soup's colour."
)

bundles = components.require_bundles()
history = state.history()
if history.empty:
    st.info("No bundle has a training history (history.json) yet.", icon=":material/show_chart:")
    st.stop()

colors = charts.model_colors([b.name for b in bundles])
available = list(dict.fromkeys(history["bundle"]))
pick, toggle = st.columns([4, 1], vertical_alignment="bottom")
chosen = pick.multiselect("Bundles", available, default=available, key="training-models")
soups = tables.soups(history[history["bundle"].isin(chosen)])
members = toggle.toggle(
    "Show soup members",
    key="training-members",
    disabled=not soups,
    help="A soup's line is the mean of the runs it averaged; on: a line per run."
    if soups
    else "None of the bundles shown is a soup.",
)
if not chosen:
    st.info("Select at least one bundle.")
    st.stop()
shown = tables.shown_history(history, chosen, members and bool(soups))
with st.container(key="training-key"):
    st.markdown(charts.color_key(shown, colors), unsafe_allow_html=True)
decoding = tables.dev_decoding([b for b in bundles if b.name in set(shown["bundle"])])

specs = [
    ({"train_loss": "train loss", "dev_loss": "dev loss"}, "Loss (solid: train, dashed: dev)",
     "cross-entropy per word", False),
    ({"dev_bleu4": "dev BLEU-4"}, f"Dev corpus BLEU-4 ({decoding})", "BLEU-4 (0–100)", False),
    ({"dev_cider": "dev CIDEr-D"}, f"Dev CIDEr-D ({decoding})", "CIDEr-D (×100)", False),
    ({"lr": "lr"}, "Learning rate (end of epoch)", "learning rate", True),
]  # fmt: skip
if shown["reward"].notna().any():  # an SCST stage: its reward curve
    specs.append(
        ({"reward": "SCST reward"}, "SCST reward (train samples' CIDEr-D)", "CIDEr-D (×100)", False)
    )
for row in (specs[i : i + 2] for i in range(0, len(specs), 2)):
    for col, (columns, title, ytitle, exponent) in zip(st.columns(2), row, strict=False):
        fig = charts.history_chart(
            shown, columns, colors, title=title, ytitle=ytitle, exponent=exponent
        )
        col.plotly_chart(fig, key=f"training-{next(iter(columns))}")

st.subheader("Summary", anchor=False)
summary = tables.shown_summary(state.training_summary(), history, chosen, members and bool(soups))
with st.container(key="training-summary"):
    st.dataframe(
        summary,
        hide_index=True,
        height=components.table_height(len(summary)),
        placeholder="—",
        key=f"training-table-{'members' if members else 'bundles'}",  # columns sized anew
        column_config={
            "model": st.column_config.TextColumn(
                width=components.text_width(list(summary["model"]))
            ),
            "best epoch": st.column_config.NumberColumn(format="%d"),
            "dev BLEU-4": st.column_config.NumberColumn(format="%.1f"),
            "dev CIDEr-D": st.column_config.NumberColumn(format="%.1f"),
            "s / epoch": st.column_config.NumberColumn(format="%.1f"),
            "samples / s": st.column_config.NumberColumn(format="%.0f"),
        },
    )
st.caption(
    "Best epoch = the epoch the bundle's weights come from, as its config records it; a soup's "
    "member row shows the epoch its run kept (the best dev CIDEr-D). A soup's own row has "
    "none: its weights are the average of its members'. Test-split scores are on Compare."
)
