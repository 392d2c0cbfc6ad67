"""Caption page: one photo through one model; caption, n-best list, timings and attention."""

from __future__ import annotations

import streamlit as st

from captioning.bundle import reports
from captioning.bundle.format import BundleError
from captioning.data.images import ImageLoadError
from captioning.models.decoding import MAX_BEAM
from dashboard import components, state, tables
from dashboard.attention import attention_overlay, fit

THUMB_SIDE = 220
WORDS_PER_ROW = 4

st.title("Caption a photo", anchor=False)
st.markdown(
    "An open image captioner trained on Flickr8k. A pretrained ImageNet CNN (ResNet50 or VGG16) "
    "encodes the photo and an LSTM decoder writes the caption word by word; *attention* "
    "decoders also show where they look. Everything runs locally on the CPU."
)

bundles = components.require_bundles()
by_name = {b.name: b for b in bundles}

left, right = st.columns([5, 6], gap="large")
with left:
    picked = components.image_picker("caption")
    if picked is not None:
        st.image(picked.display(), caption=picked.name)

with right:
    c_model, c_beam = st.columns([3, 2])
    best = reports.best_bundle(bundles).name  # the best dev CIDEr-D
    name = c_model.selectbox(
        "Model", list(by_name), index=list(by_name).index(best), key="caption-model"
    )
    bundle = by_name[name]
    default_beam = reports.default_decoding(bundle).beam_size
    beam = c_beam.slider("Beam size", 1, MAX_BEAM, default_beam, key="caption-beam")
    st.caption(components.model_blurb(bundle))

    if picked is None:
        st.info("Pick a sample photo or upload one to see its caption.", icon=":material/image:")
        st.stop()
    try:
        with st.spinner(f"Captioning with {bundle.name}…"):
            result = state.caption(bundle, picked.data, picked.digest, beam)
            runtime = state.runtime_label(bundle)
    except ImageLoadError as e:  # decoded for display, yet unusable for the model
        st.error(str(e), icon=":material/broken_image:")
        st.stop()
    except (BundleError, OSError) as e:
        st.error(f"Cannot use the model {bundle.name}: {e}")
        st.stop()

    with st.container(border=True, key="caption-result"):
        precision = runtime.partition(" · ")[2]  # the runtime itself is a metric below
        st.caption(f"{bundle.name} · beam {beam}" + (f" · {precision}" if precision else ""))
        st.subheader(f"“{result.text}”" if result.text else "(empty caption)", anchor=False)
        with st.container(horizontal=True, gap="medium"):
            components.timing_metrics(result.timings, runtime)
            st.metric(
                "Log-prob",
                f"{result.score:.2f}",
                width="content",
                help="Sum of the "
                "log-probabilities of the words and the end token; closer to 0 = more "
                "confident.",
            )

    st.markdown(f"**Beam search n-best** ({len(result.nbest)} of beam {beam})")
    st.dataframe(
        tables.nbest_table(result.nbest),
        hide_index=True,
        column_config={
            "rank": st.column_config.NumberColumn("#", width="small"),
            "caption": st.column_config.TextColumn("caption", width="large"),
            "log-prob": st.column_config.NumberColumn("log-prob", format="%.2f"),
            "per token": st.column_config.NumberColumn(
                "per token", format="%.2f", help="log-prob / (words + 1)"
            ),
        },
    )

if result.attention is None:
    st.caption(
        f"{bundle.name} has no attention: its decoder sees one pooled vector for the whole "
        "photo. Choose an *attention* model to see where it looks for each word."
    )
    st.stop()
if not result.tokens:
    st.stop()

st.divider()
st.subheader("Where the model looks", anchor=False)
if note := components.attention_note(bundle):
    st.caption(note)
words = result.tokens[: result.attention.shape[0]]
gh, gw = result.attention.shape[1:]
i = 0
if len(words) > 1:
    i = st.select_slider(
        "Word",
        options=list(range(len(words))),
        format_func=lambda j: f"{j + 1}. {words[j]}",
        key=f"caption-word-{bundle.name}-{picked.digest}-{beam}",
    )
heat_col, word_col = st.columns([5, 6], gap="large")
with heat_col:  # only the word shown, drawn at display size
    st.image(attention_overlay(picked.image, result.attention[i]), caption=f"“{words[i]}”")
with word_col:
    st.markdown(
        "#### " + " ".join(f":orange-background[{w}]" if j == i else w for j, w in enumerate(words))
    )
    st.caption(
        f"Attention weights over the encoder's {gh}×{gw} grid when the decoder wrote word "
        f"{i + 1} of {len(words)}, upsampled smoothly over the photo: bright = looked at, "
        "dark = ignored."
    )
    if st.toggle("Show every word at once", key="caption-all-words"):
        small = fit(picked.image, THUMB_SIDE)  # thumbnails drawn only while the toggle is on
        for start in range(0, len(words), WORDS_PER_ROW):
            stop = min(start + WORDS_PER_ROW, len(words))
            for col, j in zip(st.columns(WORDS_PER_ROW), range(start, stop), strict=False):
                thumb = attention_overlay(small, result.attention[j], max_side=THUMB_SIDE)
                col.image(thumb, caption=f"{j + 1}. {words[j]}")
