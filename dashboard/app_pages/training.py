"""Training page: loss, dev BLEU-4, dev CIDEr-D and learning rate per epoch, models overlaid."""

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
    "(`python -m captioning soup A B --out C`) shows one line per member it averaged, in tints "
    "of its colour."
)

bundles = components.require_bundles()
history = state.history()
if history.empty:
    st.info("No bundle has a training history (history.json) yet.", icon=":material/show_chart:")
    st.stop()

colors = charts.model_colors([(b.name, b.encoder, b.decoder) for b in bundles])
available = list(dict.fromkeys(history["model"]))
chosen = st.multiselect("Models", available, default=available, key="training-models")
if not chosen:
    st.info("Select at least one model.")
    st.stop()
shown = history[history["model"].isin(chosen)]
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
summary = state.training_summary()
st.dataframe(
    summary[summary["model"].isin(chosen)],
    hide_index=True,
    height="content",
    column_config={
        "best epoch": st.column_config.NumberColumn(format="%d"),
        "dev BLEU-4": st.column_config.NumberColumn(format="%.1f"),
        "dev CIDEr-D": st.column_config.NumberColumn(format="%.1f"),
        "s / epoch": st.column_config.NumberColumn(format="%.1f"),
        "samples / s": st.column_config.NumberColumn(format="%.0f"),
    },
)
st.caption(
    "Best epoch = the epoch the bundle's weights come from, as its config records it; a soup's "
    "member line shows the epoch its run kept (the best dev CIDEr-D). Test-split scores are on "
    "Compare."
)
