"""UI pieces shared by the pages: empty states, the image picker, model blurbs, the model grid."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st
from PIL import Image

from captioning.bundle import reports
from captioning.bundle.catalog import BundleInfo
from captioning.bundle.format import is_ensemble
from captioning.core.paths import models_dir_default
from captioning.core.settings import DATA_ENV, MODELS_ENV, setting
from captioning.data import FIX_HELP, CaptionDataset
from captioning.data.images import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, ImageLoadError, load_image
from captioning.models.decoding import MAX_BEAM
from dashboard import state
from dashboard.tables import pretty_encoder

PHOTO_UPLOAD_MB = 10  # one photo on the Caption and Compare pages (Batch takes more)
UPLOAD_TYPES = [ext.lstrip(".") for ext in IMAGE_EXTENSIONS]
SOURCES = {"sample": "Sample photo", "upload": "Upload", "dataset": "Flickr8k image"}
DISPLAY_BOX = (760, 520)  # photos are shown at most this large (width, height)
TRAIN_HELP = f"""\
```bash
export {DATA_ENV}=/path/to/flickr8k
python -m captioning train --encoder resnet50 --decoder attention \\
    --out artifacts/models/resnet50-attention
python -m captioning evaluate --model resnet50-attention --split test --record
```"""
DATA_HELP = f"""\
Set it before starting the dashboard:

```bash
export {DATA_ENV}=/path/to/flickr8k
python -m streamlit run dashboard/app.py
```"""


@dataclass
class PickedImage:
    """The photo chosen on a page: its file, a display-size RGB copy, a digest and provenance.

    ``image`` fits ``DISPLAY_BOX`` (pages show it and draw attention over it); the models
    caption ``data``, decoded as the CLI decodes it.
    """

    image: Image.Image
    data: bytes
    name: str
    digest: str
    references: list[str] = field(default_factory=list)
    split: str | None = None

    def display(self, box: tuple[int, int] = DISPLAY_BOX) -> Image.Image:
        """A copy no larger than ``box`` (width, height), small enough to send to the browser."""
        out = self.image.copy()
        out.thumbnail(box)
        return out


def require_bundles() -> list[BundleInfo]:
    """The bundles, or an empty state with training instructions (and the page stops)."""
    found = state.bundles()
    if not found:
        empty_state(models_dir_default())
        st.stop()
    return found


def empty_state(root: Path) -> None:
    """What to do when no model bundle exists yet."""
    with st.container(border=True):
        st.markdown("#### No trained models yet")
        st.markdown(
            f"The dashboard looks for model bundles in `{root}` (set `{MODELS_ENV}` to use "
            "another folder). Train and evaluate one, then reload this page:"
        )
        st.markdown(TRAIN_HELP)
        st.caption("`python -m captioning models` lists the bundles it finds.")


def data_note(message: str | None = None, extra: str = "") -> None:
    """How to point the dashboard at Flickr8k (and why the configured folder is unusable)."""
    reason = ""
    if message and setting(DATA_ENV):  # configured but unusable: say why
        reason = f" ({message.replace(FIX_HELP, '').strip().rstrip('.')})"
    st.info(
        f"Flickr8k images and reference captions need the data folder{reason}. {extra}\n\n"
        + DATA_HELP,
        icon=":material/folder_off:",
    )


def attention_note(bundle: BundleInfo) -> str | None:
    """Whose attention an ensemble's caption shows (``reports.attending_member``)."""
    member = reports.attending_member(bundle)
    if member is None:
        return None
    return (
        f"{bundle.name} is an ensemble: the maps show where its member {member} "
        "looked while the ensemble wrote the caption."
    )


def model_and_beam(bundles: list[BundleInfo], key: str) -> tuple[BundleInfo, int]:
    """A model picker (opening on the best single model on dev) beside a beam-size slider
    (opening on that model's default beam), with the model's blurb below; the pick."""
    by_name = {b.name: b for b in bundles}
    c_model, c_beam = st.columns([3, 2])
    best = reports.best_single_bundle(bundles).name  # dev, never test, chooses
    name = c_model.selectbox(
        "Model", list(by_name), index=list(by_name).index(best), key=f"{key}-model"
    )
    bundle = by_name[name]
    default_beam = reports.default_decoding(bundle).beam_size
    beam = c_beam.slider("Beam size", 1, MAX_BEAM, default_beam, key=f"{key}-beam")
    st.caption(model_blurb(bundle))
    return bundle, beam


def model_blurb(bundle: BundleInfo) -> str:
    """One line about a model: architecture and its test score, if evaluated."""
    m = reports.default_summary(bundle, "test")
    score = (
        f"test corpus BLEU-4 {m['bleu4']:.1f}, CIDEr-D {m['cider']:.1f} (beam {m.get('beam')})"
        if m and m.get("bleu4") is not None and m.get("cider") is not None
        else "not evaluated on test yet"
    )
    if is_ensemble(bundle.config):
        members = " and ".join(reports.member_names(bundle))
        what = f"ensemble of {members} (their word probabilities averaged)"
    else:
        what = f"{pretty_encoder(bundle.encoder)} encoder, {bundle.decoder} LSTM decoder"
    return f"{what} · {score} · default beam {reports.default_decoding(bundle).beam_size}"


def image_picker(key: str, *, allow_dataset: bool = False) -> PickedImage | None:
    """Source switch (sample, upload, and optionally a Flickr8k dev/test image) and its input.

    Unusable uploads show ``st.error`` with the reason and give None.
    """
    options = [k for k in SOURCES if allow_dataset or k != "dataset"]
    source = st.segmented_control(
        "Image",
        options,
        format_func=SOURCES.__getitem__,
        default="sample",
        required=True,
        key=f"{key}-source",
    )
    if source == "upload":
        return _pick_upload(key)
    if source == "dataset":
        return _pick_dataset(key)
    return _pick_sample(key)


def _decode(data: bytes, name: str, **extra) -> PickedImage | None:
    """Decode for display (reduced while decoding, then fitted to ``DISPLAY_BOX``)."""
    try:
        image = load_image(data, name=name, reduce_to=max(DISPLAY_BOX))
    except ImageLoadError as e:
        st.error(str(e), icon=":material/broken_image:")
        return None
    image.thumbnail(DISPLAY_BOX)
    return PickedImage(image, data, name, state.digest_bytes(data), **extra)


def _pick_upload(key: str) -> PickedImage | None:
    up = st.file_uploader(
        "Upload a photo",
        type=UPLOAD_TYPES,
        key=f"{key}-upload",
        max_upload_size=PHOTO_UPLOAD_MB,
        help=f"{', '.join(ACCEPTED_FORMATS.values())} (a GIF's first frame), up to "
        f"{PHOTO_UPLOAD_MB} MB.",
    )
    if up is None:
        st.caption("Drop a photo above to caption it.")
        return None
    return _decode(up.getvalue(), up.name)


def _pick_sample(key: str) -> PickedImage | None:
    files = state.samples()
    if not files:
        st.warning("No sample photos in artifacts/samples; upload one instead.")
        return None
    path = st.selectbox(
        "Sample photo",
        files,
        format_func=lambda p: p.stem.replace("_", " ").title(),
        key=f"{key}-sample",
    )
    return _decode(path.read_bytes(), path.name)


def _pick_dataset(key: str) -> PickedImage | None:
    status = state.dataset()
    ds = status.dataset
    if ds is None:
        data_note(status.message)
        return None
    splits = [s for s in ("dev", "test") if ds.splits.get(s)]
    if not splits:
        st.warning("The data set has no dev or test images.")
        return None
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    split = c1.selectbox("Split", splits, key=f"{key}-split")
    names = ds.splits[split]
    name_key = f"{key}-image-{split}"
    c2.button(
        "Random image",
        icon=":material/casino:",
        key=f"{key}-random",
        on_click=_random_choice,
        args=(name_key, names),
    )
    name = st.selectbox(f"{split} image ({len(names)})", names, key=name_key)
    return _read_dataset_image(ds, name, split)


def _random_choice(key: str, names: list[str]) -> None:
    st.session_state[key] = random.choice(names)


def _read_dataset_image(ds: CaptionDataset, name: str, split: str) -> PickedImage | None:
    try:
        data = ds.image_path(name).read_bytes()
    except OSError as e:
        st.error(f"{name}: cannot read the image ({e.strerror or e})")
        return None
    return _decode(data, name, references=list(ds.captions.get(name, [])), split=split)


QUEUE_NOTE_MS = 50  # waits for an inference slot shorter than this are not mentioned


def timing_metrics(timings: dict[str, float], runtime: str) -> None:
    """Encode and decode time as compact ``st.metric`` and the runtime that produced them
    (inside a horizontal container)."""
    st.metric("Encode", f"{timings.get('encode_ms', 0.0):.0f} ms", width="content")
    st.metric("Decode", f"{timings.get('decode_ms', 0.0):.0f} ms", width="content")
    queue = timings.get("queue_ms", 0.0)
    st.metric(
        "Runtime",
        runtime.split(" · ")[0],
        width="content",
        help=f"Encoder and decoder ran on {runtime}."
        + (f" Waited {queue / 1000:.1f} s for a free CPU slot." if queue >= QUEUE_NOTE_MS else ""),
    )


def model_grid(
    bundles: list[BundleInfo], max_columns: int = 3
) -> list[tuple[str, list[BundleInfo | None]]]:
    """Rows of a model grid: ``(encoder group, cells)``, one row per encoder group (the encoder,
    and apart from it each fine-tuned block of it: ``reports.encoder_group``) in bundle order.

    When every encoder has each decoder kind at most once and there are at most
    ``max_columns`` kinds, each kind gets its own column (so inject, merge and attention line
    up across encoders; a missing one is a None cell). Otherwise an encoder's models fill rows
    of ``max_columns`` in order. Ensembles (of several encoders) always fill their own row.
    """
    ordered = reports.order_bundles(bundles)
    groups = [(enc, list(g)) for enc, g in itertools.groupby(ordered, key=reports.encoder_group)]
    single = [(enc, g) for enc, g in groups if not any(is_ensemble(b.config) for b in g)]
    kinds = list(dict.fromkeys(b.decoder for _, g in single for b in g))
    aligned = len(kinds) <= max_columns and all(
        len({b.decoder for b in g}) == len(g) for _, g in single
    )
    rows: list[tuple[str, list[BundleInfo | None]]] = []
    for encoder, group in groups:
        if aligned and (encoder, group) in single:  # ensembles fill a row of their own
            by_kind = {b.decoder: b for b in group}
            rows.append((encoder, [by_kind.get(k) for k in kinds]))
            continue
        for start in range(0, len(group), max_columns):
            rows.append((encoder, list(group[start : start + max_columns])))
    return rows


def references_list(refs: list[str]) -> None:
    """The human reference captions of a data-set image, numbered."""
    if refs:
        st.markdown("\n".join(f"{i}. {r}" for i, r in enumerate(refs, start=1)))
    else:
        st.caption("No reference captions for this image.")


ROW_PX = 35  # st.dataframe's row height (and its header's)


def table_height(rows: int) -> int:
    """An ``st.dataframe`` height that shows ``rows`` rows and the header without an inner
    scroll bar."""
    return (rows + 1) * ROW_PX + 3


MARKDOWN_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_[]<>~$|"})


def escape_markdown(text: str) -> str:
    """``text`` with Markdown's special characters escaped, to show it as written."""
    return text.translate(MARKDOWN_SPECIALS)


BROKEN_PHOTO_SVG = (  # a crossed-out picture: the thumbnail of a file that was not captioned
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96" viewBox="0 0 96 96">'
    '<rect x="14" y="22" width="68" height="52" rx="6" fill="#F3F6F6" stroke="#B42318" '
    'stroke-width="4"/><path d="M22 66l16-18 12 12 8-8 16 14" fill="none" stroke="#9AA5B1" '
    'stroke-width="4"/><path d="M20 80L76 16" stroke="#B42318" stroke-width="5" '
    'stroke-linecap="round"/></svg>'
)


def data_url(jpeg: bytes | None) -> str:
    """A JPEG as a ``data:`` URL for ``st.column_config.ImageColumn``; None (no photo) gives
    the crossed-out picture ``BROKEN_PHOTO_SVG``."""
    import base64

    if jpeg is None:
        return "data:image/svg+xml;base64," + base64.b64encode(BROKEN_PHOTO_SVG.encode()).decode()
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def upload_table(rows: list):
    """``UploadRow``s as a ``pandas.DataFrame``: photo (a data URL), file, caption, confidence
    (in %), log-prob and error."""
    import pandas as pd

    return pd.DataFrame(
        {
            "photo": [data_url(r.thumbnail) for r in rows],
            "file": [r.file for r in rows],
            "caption": [r.caption for r in rows],
            "confidence": [None if r.confidence is None else 100 * r.confidence for r in rows],
            "log-prob": [r.logprob for r in rows],
            "error": [r.error for r in rows],
        }
    )


CHAR_PX = 7.5  # a character of st.dataframe's text, on average


def text_width(texts: list[str], most: int = 420) -> int:
    """A column width (px) that shows the longest of ``texts`` whole, at most ``most``."""
    longest = max((len(t) for t in texts), default=0)
    return min(most, round(longest * CHAR_PX) + 24)
