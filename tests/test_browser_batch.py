"""The Batch page in a real browser: photos, broken files and a zip through the real uploader,
captioned on the tiny world, the CSV downloaded and read back; the page at 1400×1000 and 420×900.

Reuses the helpers of ``tests/test_browser.py`` (Debian's Chromium, the idle wait, screenshots to
``$CAPTIONING_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest

from tests import hostile, test_browser
from tests.test_browser import (
    SIZES,
    UPLOAD_INPUT,
    assert_no_exception,
    new_page,
    open_page,
    screenshot,
    wait_idle,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "artifacts" / "samples").glob("*.jpg"))
ERROR = "[data-testid='stAlertContentError']"
TABLE = ".st-key-batch-table"
RUN = ".st-key-batch-run button"
CHIP = "[data-testid='stFileChip']"

pytestmark = pytest.mark.slow  # a real server and browser on the tiny world
browser = test_browser.browser  # Chromium, once for the module
shots = test_browser.shots  # where screenshots go


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    """The dashboard on the tiny world's bundles, on a free loopback port; yields its URL."""
    log = tmp_path_factory.mktemp("streamlit-batch") / "server.log"
    with test_browser.dashboard(tiny_world, tiny_world.models, log) as url:
        yield url


def jpeg(name: str) -> bytes:
    return hostile.encode(hostile.photo(name), "JPEG", quality=90)


def album() -> bytes:
    """A zip of a folder with two photos and a note, in that order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("album/", b"")
        z.writestr("album/coffee.jpg", SAMPLES[2].read_bytes())
        z.writestr("album/notes.txt", b"bought on Tuesday\n")
        z.writestr("album/rocket.jpg", SAMPLES[3].read_bytes())
    return buf.getvalue()


def bomb() -> bytes:
    """A small zip whose central directory says its photo inflates to 3 GB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("huge.jpg", SAMPLES[0].read_bytes())
    out = bytearray(buf.getvalue())
    central = out.find(b"PK\x01\x02")
    out[central + 24 : central + 28] = (3_000_000_000).to_bytes(4, "little")
    return bytes(out)


def upload_set() -> list[tuple[str, bytes, str]]:
    """(name, bytes, mime) in upload order: real photos, broken files and a zip mixed."""
    real = SAMPLES[0].read_bytes()
    return [
        (SAMPLES[0].name, real, "image/jpeg"),
        ("truncated.jpg", real[: len(real) // 3], "image/jpeg"),
        ("skimage-chelsea.jpg", jpeg("chelsea"), "image/jpeg"),
        ("album.zip", album(), "application/zip"),
        ("notes.jpg", b"just a text file, renamed to .jpg\n" * 20, "image/jpeg"),
        ("skimage-coffee.jpg", jpeg("coffee"), "image/jpeg"),
        (SAMPLES[1].name, SAMPLES[1].read_bytes(), "image/jpeg"),
    ]


# each row of the CSV: (file, what its caption or error must hold)
EXPECTED = [
    (SAMPLES[0].name, "caption"),
    ("truncated.jpg", "truncated"),
    ("skimage-chelsea.jpg", "caption"),
    ("album.zip/album/coffee.jpg", "caption"),
    ("album.zip/album/notes.txt", "a .txt file, not a photo"),
    ("album.zip/album/rocket.jpg", "caption"),
    ("notes.jpg", "not an image"),
    ("skimage-coffee.jpg", "caption"),
    (SAMPLES[1].name, "caption"),
]


def give(pg, files: list[tuple[str, bytes, str]]) -> None:
    pg.locator(UPLOAD_INPUT).set_input_files(
        [{"name": n, "mimeType": m, "buffer": d} for n, d, m in files]
    )


def assert_fits_the_window(pg) -> None:
    width, window = pg.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    assert width <= window, f"the Batch page is {width} px wide in a {window} px window"


def download(pg, label: str) -> str:
    with pg.expect_download() as info:
        pg.get_by_role("button", name=label, exact=True).click()
    return Path(info.value.path()).read_text(encoding="utf-8")


def test_a_mixed_upload_is_captioned_and_downloaded_in_upload_order(server, browser, shots):
    pg = new_page(browser)
    try:
        open_page(pg, f"{server}/batch")
        assert pg.locator("h1").inner_text() == "Caption many photos"
        files = upload_set()
        give(pg, files)
        photos = sum(kind == "caption" for _, kind in EXPECTED) + 2  # the broken ones have data
        pg.locator(RUN, has_text=f"Caption {photos} photos").wait_for()
        wait_idle(pg)
        assert pg.locator(CHIP).count() == len(files)
        pg.locator(RUN).click()
        pg.locator(TABLE).wait_for()
        wait_idle(pg)
        assert_no_exception(pg)
        captioned = f"{photos - 2} of {len(EXPECTED)}"  # every file has a row
        pg.locator(".st-key-batch-summary", has_text=captioned).wait_for()

        rows = list(csv.DictReader(io.StringIO(download(pg, "CSV"))))
        assert [r["file"] for r in rows] == [name for name, _ in EXPECTED]
        for row, (name, kind) in zip(rows, EXPECTED, strict=True):
            assert row["model"] and row["beam"], row
            if kind == "caption":
                assert row["error"] == "" and row["caption"].strip(), row  # tiny models: short
                assert 0.0 <= float(row["confidence"]) <= 1.0 and float(row["logprob"]) < 0
            else:
                assert row["caption"] == "" and row["confidence"] == "", row
                assert row["error"].startswith(f"{name}: ") and kind in row["error"], row
        doc = json.loads(download(pg, "JSON"))
        assert [r["file"] for r in doc["rows"]] == [name for name, _ in EXPECTED]
        assert [r["caption"] or None for r in doc["rows"]] == [r["caption"] or None for r in rows]
        assert_no_exception(pg)

        for size, (w, h) in SIZES.items():  # the same results, laid out at both sizes
            pg.set_viewport_size({"width": w, "height": h})
            pg.wait_for_timeout(800)
            table = pg.locator(TABLE)
            table.scroll_into_view_if_needed()  # the grid draws its cells once on screen
            table.locator("table tr").nth(1).wait_for(state="attached")
            assert_fits_the_window(pg)
            frame = table.bounding_box()
            assert frame["x"] + frame["width"] <= w
            shown = [t.strip() for t in table.locator("th").all_inner_texts()]  # columns in view
            assert shown[:2] == ["photo", "caption"], shown  # the captions are on screen
            pg.evaluate("() => window.scrollTo(0, 0)")
            screenshot(pg, shots, "batch", size)
            assert_fits_the_window(pg)
    finally:
        pg.context.close()


def test_over_a_limit_nothing_is_captioned_and_the_uploads_stay(server, browser):
    pg = new_page(browser)
    try:
        open_page(pg, f"{server}/batch")
        files = [*upload_set()[:3], ("bomb.zip", bomb(), "application/zip")]
        give(pg, files)
        error = pg.locator(ERROR)
        error.wait_for()
        wait_idle(pg)
        text = error.inner_text()
        assert "bomb.zip holds 1 photo, 2861.0 MB uncompressed" in text, text
        assert "over the limit of 200.0 MB per batch; nothing was captioned" in text, text
        assert pg.locator(RUN).count() == 0 and pg.locator(TABLE).count() == 0
        assert pg.locator(CHIP).count() == len(files)  # nothing lost
        pg.locator(CHIP, has_text="bomb.zip").locator("[data-testid='stFileChipDeleteBtn']").click()
        pg.locator(RUN, has_text="Caption 3 photos").wait_for()
        wait_idle(pg)
        assert pg.locator(ERROR).count() == 0 and pg.locator(CHIP).count() == len(files) - 1
        assert_no_exception(pg)
    finally:
        pg.context.close()
