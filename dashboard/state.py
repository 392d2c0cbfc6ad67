"""Cached access to bundles, captioners, the data set and the tables of the dashboard.

Captioners and the data set are loaded once per process (``st.cache_resource``); tables and
caption results are cached with ``st.cache_data``. Every cache key includes the folder and a
stamp of its files, so new or retrained bundles show up without restarting the app. Inference
runs inside ``limits.inference_slot``, so concurrent sessions queue for the cores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from captioning.bundle import reports
from captioning.bundle.catalog import BundleInfo, list_bundles
from captioning.core.paths import SAMPLES_DIR, models_dir_default
from captioning.data import CaptionDataset, DataError, load_flickr8k, resolve_data_dir
from captioning.data.images import IMAGE_EXTENSIONS
from captioning.inference.captioner import Captioner, CaptionResult, dedicate_cores
from captioning.inference.labels import ClassifierLabels
from dashboard import limits, tables


@dataclass(frozen=True)
class DataStatus:
    """The Flickr8k data set if ``$CAPTIONING_DATA`` points at a usable folder, else why not."""

    dataset: CaptionDataset | None
    message: str | None = None


def folder_stamp(root: Path) -> tuple:
    """(relative path, mtime, size) of the files of every bundle in ``root``: a cache key."""
    if not root.is_dir():
        return ()
    out = []
    for bundle in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(bundle.iterdir()):
            if f.is_file() and f.suffix in (".json", ".csv", ".safetensors"):
                st_ = f.stat()
                out.append((f"{bundle.name}/{f.name}", st_.st_mtime_ns, st_.st_size))
    return tuple(out)


def _bundle_stamp(bundle: BundleInfo) -> int:
    """Changes when the bundle's weights do (an ensemble's: when any member's do)."""
    return sum(f.stat().st_mtime_ns for f in reports.weight_files(bundle))


@st.cache_data(show_spinner=False, max_entries=8)
def _bundles(root: str, stamp: tuple) -> list[BundleInfo]:
    return reports.order_bundles(list_bundles(Path(root)))


def bundles() -> list[BundleInfo]:
    """Every complete bundle, ordered by encoder then decoder (inject before attention)."""
    root = models_dir_default()
    return _bundles(str(root), folder_stamp(root))


@st.cache_resource(show_spinner=False, max_entries=16)
def _captioner(path: str, stamp: int) -> Captioner:
    # the CLI's default: OpenVINO where it is installed (compiled once, then cached), else torch
    cap = Captioner.load(Path(path), runtime="auto")
    dedicate_cores(cap)  # the app's captioners all run on the same runtime
    return cap


def captioner(bundle: BundleInfo) -> Captioner:
    """The bundle's ``Captioner``, loaded once per process (encoders are shared)."""
    return _captioner(str(bundle.path), _bundle_stamp(bundle))


def runtime_label(bundle: BundleInfo) -> str:
    """What runs the bundle's models here, e.g. ``torch · fp32`` or ``openvino · bf16``."""
    cap = captioner(bundle)
    return f"{cap.runtime} · {cap.precision_label}"


@st.cache_data(show_spinner=False, max_entries=256)
def _caption(
    path: str, stamp: int, digest: str, beam: int, prefix: str, _data: bytes
) -> CaptionResult:
    cap = _captioner(path, stamp)
    with limits.inference_slot() as waited_s:
        result = cap.caption(_data, beam_size=beam, prefix=prefix or None)
    result.timings["queue_ms"] = waited_s * 1000
    return result


def caption(
    bundle: BundleInfo, data: bytes, digest: str, beam: int, prefix: str = ""
) -> CaptionResult:
    """Caption the image file ``data`` (identified by ``digest``) with ``bundle``, exactly as the
    CLI would, starting with ``prefix`` if given; cached per image, beam and prefix. Waits for a
    free inference slot. Raises PrefixError for a prefix the bundle cannot start with.

    A cached result keeps the timings measured when it was computed; ``timings["queue_ms"]`` is
    the time it waited for a slot.
    """
    return _caption(str(bundle.path), _bundle_stamp(bundle), digest, beam, prefix.strip(), data)


@st.cache_data(show_spinner=False, max_entries=256)
def _labels(path: str, stamp: int, digest: str, k: int, _data: bytes) -> ClassifierLabels:
    cap = _captioner(path, stamp)
    with limits.inference_slot():
        return cap.labels(_data, k)


def labels(bundle: BundleInfo, data: bytes, digest: str, k: int = 3) -> ClassifierLabels:
    """The bundle's encoder's own top-``k`` ImageNet labels of the image (a second opinion), or
    why it has none; cached per image. Waits for a free inference slot."""
    return _labels(str(bundle.path), _bundle_stamp(bundle), digest, k, data)


def digest_bytes(data: bytes) -> str:
    """A short content hash identifying an image for the caption cache."""
    return hashlib.sha1(data).hexdigest()[:20]


@st.cache_resource(show_spinner=False, max_entries=4)
def _dataset(root: str, stamp: int) -> CaptionDataset:
    return load_flickr8k(root)


def dataset() -> DataStatus:
    """Flickr8k from ``$CAPTIONING_DATA`` (loaded once), or the reason it is unavailable."""
    try:
        root = resolve_data_dir(None)
        return DataStatus(_dataset(str(root), root.stat().st_mtime_ns))
    except (DataError, OSError) as e:
        return DataStatus(None, str(e))


def samples() -> list[Path]:
    """The sample photos shipped in ``artifacts/samples``."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


_TABLES = {  # what each folder-wide table is built by, from the bundles (``dashboard.tables``)
    "predictions": tables.read_predictions,
    "history": tables.read_history,
    "scores": tables.score_summary,
    "training_summary": tables.training_summary,
}


@st.cache_data(show_spinner=False, max_entries=32)
def _table(kind: str, root: str, stamp: tuple, *args) -> pd.DataFrame:
    return _TABLES[kind](_bundles(root, stamp), *args)


def _folder_table(kind: str, *args) -> pd.DataFrame:
    """The ``kind`` table of every bundle in the models folder, rebuilt when a file changes."""
    root = models_dir_default()
    return _table(kind, str(root), folder_stamp(root), *args)


def predictions() -> pd.DataFrame:
    """All predictions CSVs of all bundles in one table (see ``tables.read_predictions``)."""
    return _folder_table("predictions")


def history() -> pd.DataFrame:
    """All bundles' training histories (see ``tables.read_history``)."""
    return _folder_table("history")


def scores(split: str) -> pd.DataFrame:
    """Every bundle's scores and diversity on ``split`` (see ``tables.score_summary``)."""
    return _folder_table("scores", split)


def training_summary() -> pd.DataFrame:
    """Every history line's summary (see ``tables.training_summary``)."""
    return _folder_table("training_summary")


def upload_items(files: list) -> list:
    """The ``UploadItem``s of the files of an ``st.file_uploader`` (``uploads.expand_uploads``),
    kept in the session while the same files stay uploaded. Raises UploadError over a limit."""
    from captioning.inference.uploads import expand_uploads

    key = tuple((f.file_id, f.name, f.size) for f in files)
    held = st.session_state.get("_upload-items")
    if held is not None and held[0] == key:
        return held[1]
    items = expand_uploads([(f.name, f.getvalue()) for f in files])
    st.session_state["_upload-items"] = (key, items)
    return items


def caption_uploads(bundle: BundleInfo, items: list, beam: int):
    """Caption ``items`` with the bundle's captioner, yielding one ``UploadRow`` per item in
    order (``uploads.caption_uploads``). Each chunk of photos runs inside an inference slot of
    its own, so another session's photo waits for one chunk at most."""
    from captioning.inference.uploads import caption_uploads as caption_chunks

    return caption_chunks(captioner(bundle), items, beam, slot=limits.inference_slot)
