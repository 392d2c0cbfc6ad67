"""Caption page: one photo through one model; caption, confidence, an optional prefix and its
cost, the classifier's second opinion, n-best list, timings and attention."""

from __future__ import annotations

import streamlit as st

from captioning.bundle.format import BundleError
from captioning.data.images import ImageLoadError
from captioning.inference.captioner import PrefixError
from dashboard import components, state, tables
from dashboard.attention import attention_overlay, fit

THUMB_SIDE = 220
WORDS_PER_ROW = 4
LABELS_K = 3
DOMAIN = (
    "The models know Flickr8k's world: people, dogs, water and sport. Other subjects (a cat, a "
    "plate of food) get described in those terms; the classifier's labels below are a second "
    "opinion."
)


def second_opinion(bundle, picked) -> None:
    """The encoder's own ImageNet labels beside the caption, named as the classifier's."""
    with st.container(border=True, key="caption-labels"):
        try:
            with st.spinner("Asking the classifier…"):
                opinion = state.labels(bundle, picked.data, picked.digest, LABELS_K)
        except (ImageLoadError, OSError) as e:
            st.caption(f"No second opinion: {e}")
            return
        st.markdown(f"**Second opinion:** the {opinion.source} (not the captioner)")
        if opinion.unavailable:
            st.caption(f"{opinion.unavailable}.")
            return
        st.markdown(" · ".join(f"{name} **{p:.0%}**" for name, p in opinion.top))


st.title("Caption a photo", anchor=False)
st.markdown(
    "An open image captioner trained on Flickr8k. A pretrained ImageNet CNN (ResNet50 or VGG16) "
    "encodes the photo and an LSTM decoder writes the caption word by word; *attention* "
    "decoders also show where they look. Everything runs locally on the CPU."
)
st.caption(DOMAIN)

bundles = components.require_bundles()

left, right = st.columns([5, 6], gap="large")
with left:
    picked = components.image_picker("caption")
    if picked is not None:
        st.image(picked.display(), caption=picked.name)

with right:
    bundle, beam = components.model_and_beam(bundles, "caption")
    prefix = st.text_input(
        "Start the caption with (optional)",
        key="caption-prefix",
        placeholder="e.g. a cat",
        max_chars=100,
        help="The caption is made to begin with these words; beam search writes the rest. "
        "Words the model never saw in training are refused by name.",
    ).strip()

    if picked is None:
        st.info("Pick a sample photo or upload one to see its caption.", icon=":material/image:")
        st.stop()
    try:
        with st.spinner(f"Captioning with {bundle.name}…"):
            result = state.caption(bundle, picked.data, picked.digest, beam, prefix)
            free = state.caption(bundle, picked.data, picked.digest, beam) if prefix else None
            runtime = state.runtime_label(bundle)
    except ImageLoadError as e:  # decoded for display, yet unusable for the model
        st.error(str(e), icon=":material/broken_image:")
        st.stop()
    except PrefixError as e:
        st.error(f"Cannot start the caption with “{prefix}”: {e}", icon=":material/edit_off:")
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
                "Confidence",
                f"{result.confidence:.0%}",
                width="content",
                help="The geometric mean of the probabilities the model gave each word and the "
                "end token. On Flickr8k dev it ranks captions by quality better than the other "
                "forms tried (Spearman with per-image CIDEr-D, docs/results.md).",
            )
            st.metric(
                "Log-prob",
                f"{result.score:.2f}",
                width="content",
                help="Sum of the "
                "log-probabilities of the words and the end token; closer to 0 = more "
                "confident.",
            )
            if free is not None:
                st.metric(
                    "Prefix cost",
                    f"{result.score - free.score:+.2f}",
                    width="content",
                    help=f"Log-prob of this prompted caption minus the free caption's "
                    f"({free.score:.2f}): “{free.text}”.",
                )
        if free is not None:
            st.caption(f"Without the prefix: “{free.text}”")
    second_opinion(bundle, picked)

    st.markdown(f"**Beam search n-best** ({len(result.nbest)} of beam {beam})")
    nbest = tables.nbest_table(result.nbest).rename(columns={"rank": "#"})
    st.table(  # a table wraps its captions: whole at 420 px too
        nbest.style.format({"log-prob": "{:.2f}", "per token": "{:.2f}"}), hide_index=True
    )
    st.caption("*per token*: the log-prob divided by the words + 1 (the end token).")

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
