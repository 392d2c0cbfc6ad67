"""Batch page: many photos, or a zip of them, through one model; a table and CSV/JSON downloads."""

from __future__ import annotations

import contextlib
import time

import streamlit as st

from captioning.bundle.format import BundleError
from captioning.inference import uploads
from dashboard import components, state

LIMITS = uploads.UploadLimits()
ROW_HEIGHT = 76  # px: a thumbnail per row, and three lines for a caption to wrap (over 64)
CAPTION_WIDTH = 300  # px: beside the thumbnail it fits a phone's width
ROWS_SHOWN = 8  # the table scrolls past this many rows
HEADER_HEIGHT = 38  # px: the table's header and border
FAILED_LISTED = 5  # files named in the note above the table
RESULT_KEY = "batch-result"

st.title("Caption many photos", anchor=False)
st.markdown(
    f"Upload up to {LIMITS.max_files} photos, or a `.zip` of them, and download every caption "
    "as CSV or JSON: one row per file, in upload order, with the reason for any file that "
    f"cannot be captioned. Photos are captioned {uploads.CHUNK} at a time, so other users' "
    "photos keep their turn."
)

bundles = components.require_bundles()
bundle, beam = components.model_and_beam(bundles, "batch")  # as on the Caption page

files = st.file_uploader(
    "Photos, or a .zip of photos",
    type=[*components.UPLOAD_TYPES, "zip"],
    accept_multiple_files=True,
    key="batch-upload",
    max_upload_size=LIMITS.max_bytes // uploads.MB,
    help=f"JPEG, PNG, WebP, BMP, GIF or TIFF, or .zip archives of them: up to "
    f"{LIMITS.max_files} photos and {uploads.megabytes(LIMITS.max_bytes)} in all (a zip counts "
    "its photos and their uncompressed size).",
)
if not files:
    st.info("Drop photos or a .zip of photos above to caption them.", icon=":material/upload:")
    st.stop()

try:
    items = state.upload_items(files)
except uploads.UploadError as e:
    st.error(components.escape_markdown(str(e)), icon=":material/block:")
    st.stop()

ready = sum(item.data is not None for item in items)
refused = len(items) - ready
note = f"{uploads.plural(ready, 'photo')} to caption from {uploads.plural(len(files), 'upload')}"
if refused:
    note += f" · {uploads.plural(refused, 'file')} refused (the table says why)"
st.caption(note)

key = (tuple((f.file_id, f.name) for f in files), bundle.name, beam)
run = st.button(
    f"Caption {uploads.plural(ready, 'photo')}",
    type="primary",
    icon=":material/play_arrow:",
    key="batch-run",
    disabled=not items,
)
if run:
    rows: list[uploads.UploadRow] = []
    try:
        with st.spinner(f"Loading {bundle.name}…"):
            runtime = state.runtime_label(bundle)  # loads the captioner once per process
    except (BundleError, OSError) as e:
        st.error(f"Cannot use the model {bundle.name}: {e}")
        st.stop()
    bar = st.progress(0.0, text=f"Captioning with {bundle.name}…")
    t0 = time.perf_counter()
    try:
        with contextlib.closing(state.caption_uploads(bundle, items, beam)) as stream:
            for row in stream:
                rows.append(row)
                if len(rows) % uploads.CHUNK == 0 or len(rows) == len(items):
                    bar.progress(
                        len(rows) / len(items),
                        text=f"Captioning with {bundle.name}… {len(rows)} of {len(items)}",
                    )
    except (BundleError, OSError, ValueError) as e:
        bar.empty()
        st.error(f"Cannot use the model {bundle.name}: {e}")
        st.stop()
    bar.empty()
    st.session_state[RESULT_KEY] = {
        "key": key,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "runtime": runtime,
    }

result = st.session_state.get(RESULT_KEY)
if result is None or result["key"] != key:
    if result is not None:
        st.caption("The files, model or beam size changed since the last run: caption again.")
    st.stop()

rows = result["rows"]
failed = sum(r.error is not None for r in rows)
done = len(rows) - failed
seconds = result["seconds"]
with st.container(horizontal=True, gap="medium", key="batch-summary"):
    st.metric("Captioned", f"{done} of {len(rows)}", width="content")
    st.metric("Failed", failed, width="content")
    st.metric("Time", f"{seconds:.1f} s", width="content")
    st.metric(
        "Photos/s",
        f"{done / seconds:.1f}" if seconds > 0 and done else "–",
        width="content",
        help=f"{bundle.name} · beam {beam} · {result['runtime']}",
    )
if failed:
    names = [r.file for r in rows if r.error is not None]
    listed = ", ".join(f"`{n}`" for n in names[:FAILED_LISTED])
    more = f" and {len(names) - FAILED_LISTED} more" if len(names) > FAILED_LISTED else ""
    st.warning(
        f"Not captioned: {listed}{more}. Each keeps its row with the reason, in the table "
        "(the error column) and in the downloads.",
        icon=":material/broken_image:",
    )

stem = f"captions-{bundle.name}-beam{beam}"
with st.container(horizontal=True, gap="small", key="batch-downloads"):
    st.download_button(
        "CSV",
        uploads.rows_to_csv(rows, bundle.name, beam),
        file_name=f"{stem}.csv",
        mime="text/csv",
        icon=":material/download:",
        on_click="ignore",
        key="batch-csv",
    )
    st.download_button(
        "JSON",
        uploads.rows_to_json(rows, bundle.name, beam, runtime=result["runtime"]),
        file_name=f"{stem}.json",
        mime="application/json",
        icon=":material/download:",
        on_click="ignore",
        key="batch-json",
    )

table = components.upload_table(rows)
columns = ["photo", "caption", *(["error"] if failed else []), "confidence", "file", "log-prob"]
with st.container(key="batch-table"):
    st.dataframe(
        table,
        hide_index=True,
        column_order=columns,
        row_height=ROW_HEIGHT,
        height=min(len(rows), ROWS_SHOWN) * ROW_HEIGHT + HEADER_HEIGHT,
        placeholder="",
        column_config={
            "photo": st.column_config.ImageColumn("photo", width="small"),
            "caption": st.column_config.TextColumn("caption", width=CAPTION_WIDTH),
            "confidence": st.column_config.ProgressColumn(
                "confidence",
                min_value=0.0,
                max_value=100.0,
                format="%.0f%%",
                width="small",
                help="How sure the model is of its caption, from its own word probabilities.",
            ),
            "file": st.column_config.TextColumn("file", width="medium"),
            "log-prob": st.column_config.NumberColumn("log-prob", format="%.2f", width="small"),
            "error": st.column_config.TextColumn("error", width=CAPTION_WIDTH),
        },
    )
