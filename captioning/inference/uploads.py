"""Many uploaded photos, or zips of photos, captioned in chunks into one table.

``expand_uploads(files)`` turns ``(name, bytes)`` uploads into ``UploadItem``s in upload order:
a photo is one item; a ``.zip`` is opened in memory (never extracted to disk) and gives one item
per entry in archive order, at the zip's position. Before any entry is read, the zip's central
directory is checked: its entry count, the uncompressed size of its photos and the safety of its
paths; a zip that cannot be opened or holds an absolute or ``..`` path is one item with the
reason. While reading, no entry may yield more than its declared size. Directories, hidden files
and ``__MACOSX`` folders are skipped (as ``caption`` skips hidden files in folders); every other
entry that is no photo, or is itself an archive, is an item with its error. Uploads over the
``UploadLimits`` raise ``UploadError`` and nothing is read.

``caption_uploads(cap, items, beam)`` captions the items in chunks, each chunk inside one
acquisition of ``slot`` (an inference slot shared with other callers), while threads decode the
next chunks' images; it yields one ``UploadRow`` per item, in order, a failed one with its error.
``rows_to_csv`` and ``rows_to_json`` write the rows for download.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

from captioning.data.images import ACCEPTED_FORMATS, IMAGE_EXTENSIONS, ImageLoadError
from captioning.inference.captioner import Captioner, CaptionResult
from captioning.models.encoders import preprocess
from captioning.runtime.pixels import load_rgb, prefetch

MB = 1024 * 1024
CHUNK = 16  # images captioned per slot acquisition
THUMB_SIDE = 96  # px, the longer side of a row's thumbnail
THUMB_QUALITY = 80
READ_BLOCK = MB  # zip entries are read in blocks of this many bytes
ZIP_EXTENSION = ".zip"
ARCHIVE_EXTENSIONS = (
    ".zip",
    ".tar",
    ".gz",
    ".tgz",
    ".bz2",
    ".tbz",
    ".tbz2",
    ".xz",
    ".txz",
    ".lz",
    ".lzma",
    ".zst",
    ".7z",
    ".rar",
    ".cab",
    ".jar",
)
ARCHIVE_SIGNATURES = {  # first bytes -> format
    b"PK\x03\x04": "ZIP",
    b"PK\x05\x06": "ZIP",
    b"PK\x07\x08": "ZIP",
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"Rar!\x1a\x07": "RAR",
    b"\x28\xb5\x2f\xfd": "Zstandard",
    b"LZIP": "lzip",
    b"MSCF": "CAB",
}
TAR_MAGIC_OFFSET = 257  # "ustar" sits here in a tar header
ROW_FIELDS = ("file", "caption", "confidence", "logprob", "error")

Slot = Callable[[], AbstractContextManager]


class UploadError(ValueError):
    """Uploads refused as a whole (over a limit); the message says which and by how much."""


@dataclass(frozen=True)
class UploadLimits:
    """What one batch of uploads may hold.

    ``max_files`` counts each uploaded file and each photo inside a zip; ``max_bytes`` counts
    each uploaded file's bytes and, for a zip, the uncompressed size of its photos (from the
    central directory, before reading). ``max_zip_entries`` bounds the entries of any kind in
    one zip (directories included).
    """

    max_files: int = 200
    max_bytes: int = 200 * MB
    max_zip_entries: int = 1000


@dataclass(frozen=True)
class UploadItem:
    """One file to caption: ``name`` is the upload's, or ``ZIP/ENTRY`` for a zip entry;
    ``data`` is None when it cannot be captioned, and ``error`` says why."""

    name: str
    data: bytes | None
    error: str | None = None


@dataclass(frozen=True)
class UploadRow:
    """The outcome of one item: its caption, confidence in [0, 1] and log-probability, or its
    error; ``thumbnail`` is a small JPEG of the photo (None when it could not be decoded)."""

    file: str
    caption: str | None = None
    confidence: float | None = None
    logprob: float | None = None
    error: str | None = None
    thumbnail: bytes | None = None

    def record(self) -> dict:
        """The row's ``ROW_FIELDS`` (the thumbnail left out)."""
        return {k: getattr(self, k) for k in ROW_FIELDS}


# ---------------------------------------------------------------- expanding uploads


def megabytes(n: int) -> str:
    """``n`` bytes as megabytes, e.g. ``12.3 MB``."""
    return f"{n / MB:.1f} MB"


def plural(n: int, word: str) -> str:
    """``1 photo``, ``3 photos``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def is_archive_name(name: str) -> bool:
    """Whether ``name`` has an archive's extension (``.zip``, ``.tar.gz``, ``.7z``, …)."""
    return PurePosixPath(name.lower()).suffix in ARCHIVE_EXTENSIONS


def archive_format(data: bytes) -> str | None:
    """The archive format the first bytes of ``data`` announce (e.g. "ZIP", "tar"), or None."""
    for magic, fmt in ARCHIVE_SIGNATURES.items():
        if data.startswith(magic):
            return fmt
    if data[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return None


def _suffix(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).suffix.lower()


def _not_an_image(name: str) -> str:
    kind = f"a {_suffix(name)} file" if _suffix(name) else "a file without an extension"
    *first, last = ACCEPTED_FORMATS.values()
    return f"{name}: {kind}, not a photo; use {', '.join(first)} or {last}"


def _unsafe_path(entry: str) -> bool:
    """An absolute path, a drive letter or a ``..`` component: a name no archive of photos
    needs, made to write outside the folder it is extracted to."""
    parts = entry.replace("\\", "/").split("/")
    drive = len(entry) >= 2 and entry[1] == ":" and entry[0].isalpha()
    return entry.startswith(("/", "\\")) or drive or ".." in parts


def _skipped(entry: str) -> bool:
    """Directories, hidden files and folders, and macOS's ``__MACOSX`` metadata."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    return entry.endswith(("/", "\\")) or any(p.startswith(".") or p == "__MACOSX" for p in parts)


@dataclass
class _Zip:
    """A zip whose central directory passed the checks: what it holds, not yet read."""

    name: str
    archive: zipfile.ZipFile
    entries: list[tuple[str, zipfile.ZipInfo | None, str | None]]  # (name, photo, error)

    @property
    def photos(self) -> list[zipfile.ZipInfo]:
        return [info for _, info, _ in self.entries if info is not None]


def _open_zip(name: str, data: bytes, limits: UploadLimits) -> _Zip | UploadItem:
    """The zip's entries from its central directory, or an item saying why it is refused.

    Raises UploadError when it has more than ``limits.max_zip_entries`` entries.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        return UploadItem(name, None, f"{name}: not a readable zip archive ({e})")
    if len(infos) > limits.max_zip_entries:
        raise UploadError(
            f"{name} holds {len(infos):,} entries, over the limit of {limits.max_zip_entries:,} "
            "per zip; nothing was captioned. Split it into smaller zips."
        )
    if bad := next((i.filename for i in infos if _unsafe_path(i.filename)), None):
        return UploadItem(
            name, None, f"{name}: refused, its entry '{bad}' has an absolute or '..' path"
        )
    entries: list[tuple[str, zipfile.ZipInfo | None, str | None]] = []
    for info in infos:
        entry = f"{name}/{info.filename}"
        if info.is_dir() or _skipped(info.filename):
            continue
        if is_archive_name(info.filename):
            entries.append((entry, None, f"{entry}: an archive inside the zip; not opened"))
        elif info.flag_bits & 0x1:
            entries.append((entry, None, f"{entry}: encrypted; zips with a password are refused"))
        elif _suffix(info.filename) not in IMAGE_EXTENSIONS:
            entries.append((entry, None, _not_an_image(entry)))
        else:
            entries.append((entry, info, None))
    if not entries:
        return UploadItem(name, None, f"{name}: holds no photos")
    return _Zip(name, archive, entries)


def _check_limits(planned: list[_Zip | UploadItem], limits: UploadLimits) -> None:
    """Raise UploadError when the photos or their bytes exceed ``limits``."""
    zips = [p for p in planned if isinstance(p, _Zip)]
    files = sum(len(z.photos) for z in zips) + sum(isinstance(p, UploadItem) for p in planned)
    size = sum(i.file_size for z in zips for i in z.photos)
    size += sum(len(p.data) for p in planned if isinstance(p, UploadItem) and p.data)
    inside = "; ".join(
        f"{z.name} holds {plural(len(z.photos), 'photo')}, "
        f"{megabytes(sum(i.file_size for i in z.photos))} uncompressed"
        for z in zips
    )
    inside = f" ({inside})" if inside else ""
    if files > limits.max_files:
        raise UploadError(
            f"{files} files to caption{inside}, over the limit of {limits.max_files} per "
            "batch; nothing was captioned. Remove some and caption them in another batch."
        )
    if size > limits.max_bytes:
        raise UploadError(
            f"{megabytes(size)} of photos{inside}, over the limit of "
            f"{megabytes(limits.max_bytes)} per batch; nothing was captioned. Remove some and "
            "caption them in another batch."
        )


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """The entry's bytes, read in blocks: never more than its declared size nor ``budget``.

    Raises ValueError when the data runs past either (a header that lies about its size).
    """
    limit = min(info.file_size, budget)
    out = bytearray()
    with archive.open(info) as f:
        while block := f.read(min(READ_BLOCK, limit + 1 - len(out))):
            out += block
            if len(out) > limit:
                raise ValueError(f"holds more than the {info.file_size:,} bytes it declares")
    return bytes(out)


def _read_zip(z: _Zip, budget: int) -> tuple[list[UploadItem], int]:
    """The zip's items in archive order, and the bytes read."""
    items, used = [], 0
    for entry, info, error in z.entries:
        if info is None:
            items.append(UploadItem(entry, None, error))
            continue
        try:
            data = _read_entry(z.archive, info, budget - used)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
            items.append(UploadItem(entry, None, f"{entry}: cannot be read from the zip ({e})"))
            continue
        used += len(data)
        if fmt := archive_format(data):
            items.append(UploadItem(entry, None, f"{entry}: a {fmt} archive, not opened"))
        else:
            items.append(UploadItem(entry, data))
    return items, used


def expand_uploads(
    files: Sequence[tuple[str, bytes]], limits: UploadLimits | None = None
) -> list[UploadItem]:
    """One item per photo of ``files`` (name, bytes), in upload order; a zip's photos in archive
    order at its position. Files that cannot be captioned are items with their error.

    Raises UploadError, before reading any zip entry, when the uploads exceed ``limits``.
    """
    limits = limits or UploadLimits()
    planned: list[_Zip | UploadItem] = []
    for name, data in files:
        suffix = _suffix(name)
        if suffix == ZIP_EXTENSION:
            planned.append(_open_zip(name, data, limits))
        elif suffix in IMAGE_EXTENSIONS:
            planned.append(UploadItem(name, data))
        elif is_archive_name(name):
            planned.append(UploadItem(name, None, f"{name}: only .zip archives are opened"))
        else:
            planned.append(UploadItem(name, None, _not_an_image(name)))
    _check_limits(planned, limits)
    items: list[UploadItem] = []
    budget = limits.max_bytes - sum(
        len(p.data) for p in planned if isinstance(p, UploadItem) and p.data
    )
    for p in planned:
        if isinstance(p, UploadItem):
            items.append(p)
            continue
        read, used = _read_zip(p, budget)
        items.extend(read)
        budget -= used
    return items


# ---------------------------------------------------------------- captioning in chunks


def thumbnail_jpeg(rgb, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of the image (uint8 [H, W, 3] or PIL) whose longer side is at most ``side``."""
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def _confidence(result: CaptionResult) -> float | None:
    """The result's confidence; None when the model's word probabilities gave none (nan)."""
    return None if math.isnan(result.confidence) else float(result.confidence)


def caption_uploads(
    cap: Captioner,
    items: Sequence[UploadItem],
    beam: int | None = None,
    *,
    chunk: int = CHUNK,
    slot: Slot = contextlib.nullcontext,
    thumb_side: int = THUMB_SIDE,
    workers: int | None = None,
) -> Iterator[UploadRow]:
    """Caption ``items`` with the ``Captioner`` ``cap``; one ``UploadRow`` per item, in order.

    Threads decode the photos of the next chunks (and draw their thumbnails) while a chunk of
    at most ``chunk`` photos is encoded and beam-searched inside one ``slot()``, released between
    chunks: with first-come-first-served slots (the dashboard's ``limits.inference_slot``),
    another caller of the same slots waits for one chunk at most. The photos are decoded and
    captioned as ``caption`` does; only the best caption is searched for (``n_best=1``). A
    confidence the model does not give is None.
    """
    cfg = cap.decode_config(beam, n_best=1)  # a bad setting fails before any image
    thumbs: dict[int, bytes] = {}

    def load(source: tuple[int, UploadItem]):
        index, item = source
        if item.data is None:
            raise ImageLoadError(item.error or f"{item.name}: no data")
        rgb = load_rgb(item.data, name=item.name)
        thumbs[index] = thumbnail_jpeg(rgb, thumb_side)
        return preprocess(rgb)

    for batch in prefetch(enumerate(items), chunk, workers=workers, load=load):
        results = []
        if batch.pixels is not None:
            with slot():  # released between chunks: a fair slot lets a waiting caller in
                results = cap.caption_pixels(batch.pixels, cfg.beam_size, n_best=cfg.n_best)
        done = iter(results)
        for pos, (index, item) in enumerate(batch.sources):
            if pos in batch.errors:
                yield UploadRow(item.name, error=str(batch.errors[pos]))
                continue
            res = next(done)
            yield UploadRow(
                item.name,
                caption=res.text,
                confidence=_confidence(res),
                logprob=res.score,
                thumbnail=thumbs.pop(index, None),
            )


# ---------------------------------------------------------------- downloads


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def rows_to_csv(rows: Sequence[UploadRow], model: str, beam: int) -> str:
    """The rows as CSV, one line per row in order: ``ROW_FIELDS`` then model and beam; empty
    cells where a row has no value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*ROW_FIELDS, "model", "beam"])
    for row in rows:
        rec = row.record()
        rec["confidence"] = _rounded(rec["confidence"])
        rec["logprob"] = _rounded(rec["logprob"])
        writer.writerow([*("" if rec[k] is None else rec[k] for k in ROW_FIELDS), model, beam])
    return buf.getvalue()


def rows_to_json(rows: Sequence[UploadRow], model: str, beam: int, **meta) -> str:
    """The rows as one JSON object: ``model``, ``beam``, any ``meta`` (e.g. runtime), and
    ``rows``, a list of ``ROW_FIELDS`` objects in order (null where a row has no value)."""
    records = []
    for row in rows:
        rec = row.record()
        rec["confidence"] = _rounded(rec["confidence"])
        rec["logprob"] = _rounded(rec["logprob"])
        records.append(rec)
    return json.dumps({"model": model, "beam": beam, **meta, "rows": records}, indent=1)
