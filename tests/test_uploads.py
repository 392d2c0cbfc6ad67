"""Uploads for the Batch page: zip checks on archives built here, limits, the CSV and JSON rows,
and (slow, on the tiny world) captioning in chunks that leave the inference slot to others."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from captioning.inference.uploads import (
    MB,
    ROW_FIELDS,
    UploadError,
    UploadItem,
    UploadLimits,
    UploadRow,
    caption_uploads,
    expand_uploads,
    rows_to_csv,
    rows_to_json,
)
from tests import hostile

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "artifacts" / "samples").glob("*.jpg"))
JPEG = hostile.encode(hostile.photo("chelsea", (64, 48)), "JPEG", quality=80)


def make_zip(entries: list[tuple[str, bytes | None]], method=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``entries`` (name, data) in order; data None makes a directory entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries:
            if data is None:
                z.mkdir(name)
            else:
                z.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buf.getvalue()


def patch_sizes(data: bytes, size: int) -> bytes:
    """``data`` (a zip of one entry) with the entry's uncompressed size set to ``size`` in both
    its local header and its central directory record."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    out[local + 22 : local + 26] = struct.pack("<I", size)
    central = out.find(b"PK\x01\x02")
    out[central + 24 : central + 28] = struct.pack("<I", size)
    return bytes(out)


def names(items: list[UploadItem]) -> list[str]:
    return [i.name for i in items]


def errors(items: list[UploadItem]) -> dict[str, str]:
    return {i.name: i.error for i in items if i.error is not None}


# ---------------------------------------------------------------- expanding uploads


def test_photos_and_a_zip_keep_upload_order_and_archive_order():
    archive = make_zip([("trip/", None), ("trip/b.jpg", JPEG), ("trip/a.jpg", JPEG)])
    items = expand_uploads([("one.jpg", JPEG), ("trip.zip", archive), ("two.png", JPEG)])
    assert names(items) == ["one.jpg", "trip.zip/trip/b.jpg", "trip.zip/trip/a.jpg", "two.png"]
    assert all(i.data == JPEG and i.error is None for i in items)  # the directory is skipped


def test_a_non_image_entry_is_a_row_with_its_error():
    archive = make_zip([("a.jpg", JPEG), ("notes.txt", b"hello"), ("b.jpg", JPEG)])
    items = expand_uploads([("x.zip", archive)])
    assert names(items) == ["x.zip/a.jpg", "x.zip/notes.txt", "x.zip/b.jpg"]
    assert errors(items) == {
        "x.zip/notes.txt": "x.zip/notes.txt: a .txt file, not a photo; use JPEG, PNG, WebP, "
        "BMP, GIF or TIFF"
    }


def test_hidden_files_and_macos_metadata_are_skipped_like_in_folders():
    archive = make_zip(
        [("a.jpg", JPEG), ("__MACOSX/._a.jpg", b"\x00\x05"), (".DS_Store", b"x"), ("d/.h.jpg", b"")]
    )
    assert names(expand_uploads([("x.zip", archive)])) == ["x.zip/a.jpg"]


@pytest.mark.parametrize("bad", ["../evil.jpg", "photos/../../evil.jpg", "/etc/evil.jpg"])
def test_an_absolute_or_dotdot_path_refuses_the_whole_zip(bad):
    archive = make_zip([("fine.jpg", JPEG), (bad, JPEG)])
    items = expand_uploads([("before.jpg", JPEG), ("x.zip", archive)])
    assert names(items) == ["before.jpg", "x.zip"]  # no entry of it is read
    assert items[1].data is None
    assert items[1].error == f"x.zip: refused, its entry '{bad}' has an absolute or '..' path"


def test_a_windows_drive_or_backslash_path_is_refused_too():
    for bad in ("C:/evil.jpg", "..\\evil.jpg"):
        archive = make_zip([(bad, JPEG)])
        (item,) = expand_uploads([("x.zip", archive)])
        assert "absolute or '..' path" in item.error, bad


def test_nested_archives_are_refused_by_extension_and_by_their_bytes():
    inner = make_zip([("a.jpg", JPEG)])
    archive = make_zip(
        [
            ("inner.zip", inner),
            ("backup.tar.gz", gzip.compress(b"x" * 100)),
            ("disguised.jpg", inner),
            ("packed.png", gzip.compress(JPEG)),
            ("ok.jpg", JPEG),
        ]
    )
    items = expand_uploads([("outer.zip", archive)])
    assert names(items)[-1] == "outer.zip/ok.jpg" and items[-1].error is None
    assert errors(items) == {
        "outer.zip/inner.zip": "outer.zip/inner.zip: an archive inside the zip; not opened",
        "outer.zip/backup.tar.gz": "outer.zip/backup.tar.gz: an archive inside the zip; not opened",
        "outer.zip/disguised.jpg": "outer.zip/disguised.jpg: a ZIP archive, not opened",
        "outer.zip/packed.png": "outer.zip/packed.png: a gzip archive, not opened",
    }


def test_too_many_entries_refuse_everything_before_reading():
    archive = make_zip([(f"{i}.jpg", JPEG) for i in range(6)])
    with pytest.raises(UploadError, match=r"x\.zip holds 6 entries, over the limit of 5 per zip"):
        expand_uploads([("x.zip", archive)], UploadLimits(max_zip_entries=5))


def test_photos_in_a_zip_count_toward_the_file_limit():
    archive = make_zip([(f"{i}.jpg", JPEG) for i in range(3)])
    uploads = [("a.jpg", JPEG), ("b.jpg", JPEG), ("x.zip", archive)]
    assert len(expand_uploads(uploads, UploadLimits(max_files=5))) == 5
    with pytest.raises(UploadError) as e:
        expand_uploads(uploads, UploadLimits(max_files=4))
    assert str(e.value).startswith("5 files to caption (x.zip holds 3 photos, ")
    assert "over the limit of 4 per batch; nothing was captioned" in str(e.value)


def test_uploaded_bytes_count_toward_the_size_limit():
    with pytest.raises(UploadError, match=r"over the limit of 0\.0 MB per batch"):
        expand_uploads([("a.jpg", JPEG)], UploadLimits(max_bytes=len(JPEG) - 1))
    assert len(expand_uploads([("a.jpg", JPEG)], UploadLimits(max_bytes=len(JPEG)))) == 1


def test_a_bomb_entry_is_refused_by_its_declared_size_before_reading():
    zeros = make_zip([("bomb.jpg", b"\x00" * (3 * MB))])
    assert len(zeros) < 20_000  # a few KB that would inflate to 3 MB
    with pytest.raises(UploadError) as e:
        expand_uploads([("bomb.zip", zeros)], UploadLimits(max_bytes=2 * MB))
    assert "3.0 MB of photos (bomb.zip holds 1 photo, 3.0 MB uncompressed)" in str(e.value)
    claims = patch_sizes(make_zip([("huge.jpg", JPEG)]), 3_000_000_000)  # a header that says 3 GB
    with pytest.raises(UploadError, match=r"2861\.0 MB of photos .* over the limit of 200\.0 MB"):
        expand_uploads([("huge.zip", claims)])


def test_an_entry_is_never_read_past_its_declared_size():
    payload = b"\xff\xd8" + bytes(range(256)) * 400  # 100 KB
    lying = patch_sizes(make_zip([("a.jpg", payload)]), 1000)
    (item,) = expand_uploads([("x.zip", lying)])
    assert item.data is None and item.error.startswith("x.zip/a.jpg: cannot be read from the zip")


def test_a_corrupt_zip_is_a_row_with_a_clear_message():
    good = make_zip([("a.jpg", JPEG)])
    for data in (b"this is not a zip", good[: len(good) // 2], b""):
        items = expand_uploads([("a.jpg", JPEG), ("x.zip", data), ("b.jpg", JPEG)])
        assert names(items) == ["a.jpg", "x.zip", "b.jpg"]
        assert items[1].error.startswith("x.zip: not a readable zip archive (")


def test_a_damaged_entry_is_a_row_and_the_others_are_read():
    archive = bytearray(make_zip([("a.jpg", JPEG), ("b.jpg", JPEG)], zipfile.ZIP_STORED))
    start = archive.find(JPEG)
    archive[start + 100 : start + 110] = b"\x00" * 10  # breaks a.jpg's CRC
    items = expand_uploads([("x.zip", bytes(archive))])
    assert errors(items) == {
        "x.zip/a.jpg": "x.zip/a.jpg: cannot be read from the zip (Bad CRC-32 for file 'a.jpg')"
    }
    assert items[1].data == JPEG


def test_an_encrypted_entry_is_a_row_with_its_error():
    archive = bytearray(make_zip([("a.jpg", JPEG), ("b.jpg", JPEG)]))
    central = archive.find(b"PK\x01\x02")
    archive[central + 8] |= 0x1  # the encryption flag of a.jpg
    items = expand_uploads([("x.zip", bytes(archive))])
    assert errors(items) == {
        "x.zip/a.jpg": "x.zip/a.jpg: encrypted; zips with a password are refused"
    }


def test_a_zip_without_photos_and_other_files_still_have_rows():
    empty = make_zip([("docs/", None)])
    items = expand_uploads([("empty.zip", empty), ("notes.txt", b"hi"), ("x.tar.gz", b"x")])
    assert errors(items) == {
        "empty.zip": "empty.zip: holds no photos",
        "notes.txt": "notes.txt: a .txt file, not a photo; use JPEG, PNG, WebP, BMP, GIF or TIFF",
        "x.tar.gz": "x.tar.gz: only .zip archives are opened",
    }


# ---------------------------------------------------------------- downloads

ROWS = [
    UploadRow("a.jpg", "a dog runs", 0.61234, -4.56789, thumbnail=b"jpeg"),
    UploadRow("notes.jpg", error="notes.jpg: not an image; use JPEG"),
    UploadRow("x.zip/b.jpg", 'a "quoted", caption', None, -2.0),
]


def test_csv_has_one_row_per_file_in_order_with_the_failed_one_in_place():
    text = rows_to_csv(ROWS, "resnet50-attention", 3)
    got = list(csv.DictReader(io.StringIO(text)))
    assert list(got[0]) == [*ROW_FIELDS, "model", "beam"]
    assert [r["file"] for r in got] == ["a.jpg", "notes.jpg", "x.zip/b.jpg"]
    assert got[0] == {
        "file": "a.jpg",
        "caption": "a dog runs",
        "confidence": "0.6123",
        "logprob": "-4.5679",
        "error": "",
        "model": "resnet50-attention",
        "beam": "3",
    }
    assert got[1]["caption"] == "" and got[1]["error"] == "notes.jpg: not an image; use JPEG"
    assert got[2]["caption"] == 'a "quoted", caption' and got[2]["confidence"] == ""


def test_json_holds_the_settings_and_the_rows_in_order():
    doc = json.loads(rows_to_json(ROWS, "vgg16-inject", 5, runtime="openvino · int8"))
    assert {k: doc[k] for k in ("model", "beam", "runtime")} == {
        "model": "vgg16-inject",
        "beam": 5,
        "runtime": "openvino · int8",
    }
    assert [r["file"] for r in doc["rows"]] == ["a.jpg", "notes.jpg", "x.zip/b.jpg"]
    assert doc["rows"][0] == {
        "file": "a.jpg",
        "caption": "a dog runs",
        "confidence": 0.6123,
        "logprob": -4.5679,
        "error": None,
    }
    assert doc["rows"][1]["caption"] is None and doc["rows"][1]["error"].startswith("notes.jpg")


# ---------------------------------------------------------------- captioning (tiny world)


@pytest.fixture(scope="module")
def captioner(tiny_world, one_torch_thread):
    from captioning.inference.captioner import Captioner

    return Captioner.load(tiny_world.models / "resnet50-inject", precision="fp32", runtime="torch")


def photo_uploads() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in SAMPLES]


@pytest.mark.slow
def test_rows_follow_the_items_and_match_the_caption_command(captioner):
    photos = photo_uploads()
    truncated = photos[0][1][: len(photos[0][1]) // 3]
    archive = make_zip([("in/a.jpg", photos[1][1]), ("in/readme.md", b"# hi")])
    files = [
        photos[0],
        ("truncated.jpg", truncated),
        ("notes.jpg", b"just text\n" * 20),
        ("set.zip", archive),
        *photos[2:],
    ]
    items = expand_uploads(files)
    rows = list(caption_uploads(captioner, items, 3, chunk=2, workers=1))
    assert [r.file for r in rows] == [i.name for i in items]
    failed = {r.file: r.error for r in rows if r.error}
    assert set(failed) == {"truncated.jpg", "notes.jpg", "set.zip/in/readme.md"}
    assert "truncated" in failed["truncated.jpg"] and "not an image" in failed["notes.jpg"]
    ok = [(r, i) for r, i in zip(rows, items, strict=True) if r.error is None]
    assert len(ok) == len(SAMPLES)
    stream = captioner.caption_stream([i.data for _, i in ok], 3, n_best=1)
    for (row, _), (_, res) in zip(ok, stream, strict=True):  # the CLI's path, same captions
        assert row.caption == res.text and row.logprob == pytest.approx(res.score, abs=1e-5)
        assert row.confidence == pytest.approx(res.confidence)
        assert 0.0 <= row.confidence <= 1.0
        thumb = Image.open(io.BytesIO(row.thumbnail))
        assert thumb.format == "JPEG" and max(thumb.size) == 96
    assert all(r.thumbnail is None and r.caption is None for r in rows if r.error)


def recording_slot(sem: threading.Semaphore, log: list[str], who: str, hold_first=None):
    """A slot on ``sem`` that logs ``who`` on each acquisition; ``hold_first`` runs inside the
    first acquisition."""

    @contextlib.contextmanager
    def slot():
        with sem:
            log.append(who)
            if hold_first is not None and log.count(who) == 1:
                hold_first()
            yield

    return slot


@pytest.mark.slow
def test_each_chunk_takes_the_slot_once(captioner):
    items = expand_uploads(photo_uploads() * 5)  # 20 photos
    log: list[str] = []
    slot = recording_slot(threading.BoundedSemaphore(1), log, "batch")
    rows = list(caption_uploads(captioner, items, 1, chunk=8, slot=slot))
    assert len(rows) == 20 and not any(r.error for r in rows)
    assert log == ["batch"] * 3  # 8 + 8 + 4


@pytest.mark.slow
def test_a_waiting_caller_gets_the_slot_after_one_chunk(captioner):
    """A single photo that asks while a batch holds the dashboard's first-come-first-served slot
    goes before the batch's next chunk."""
    from dashboard.limits import FairSlots

    items = expand_uploads(photo_uploads() * 4)  # 16 photos, 4 chunks
    sem, log = FairSlots(1), []
    batch_in, single_waits = threading.Event(), threading.Event()

    def let_the_single_photo_queue():
        batch_in.set()
        assert single_waits.wait(30)
        time.sleep(0.3)  # long enough for it to block on the semaphore

    def single_photo():
        assert batch_in.wait(60)
        single_waits.set()
        with sem:
            log.append("single")
            captioner.caption(SAMPLES[0].read_bytes(), beam_size=1)

    other = threading.Thread(target=single_photo)
    other.start()
    slot = recording_slot(sem, log, "batch", hold_first=let_the_single_photo_queue)
    rows = list(caption_uploads(captioner, items, 1, chunk=4, slot=slot))
    other.join(60)
    assert len(rows) == 16
    assert log == ["batch", "single", "batch", "batch", "batch"]
