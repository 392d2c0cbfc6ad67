"""The Caption page in a real browser: the default model, a prompted caption and its cost, a
word outside the vocabulary, the classifier's second opinion, at 1400 px and 420 px.

Runs on the tiny world's bundles (``tests/tiny_world.py``) with Debian's Chromium, like
``tests/test_browser.py`` whose server and browser fixtures it shares.
"""

from __future__ import annotations

import pytest

from captioning.bundle import reports
from captioning.bundle.catalog import list_bundles
from tests import test_browser as tb
from tests.test_browser import (
    CAPTION,
    ERROR,
    SIZES,
    assert_no_exception,
    open_page,
    screenshot,
    wait_idle,
)

models, server, browser, page, shots = tb.models, tb.server, tb.browser, tb.page, tb.shots

pytestmark = pytest.mark.slow  # a real server and browser on the tiny world

PREFIX = ".st-key-caption-prefix input"
LABELS = ".st-key-caption-labels"
MODEL = ".st-key-caption-model input"


def set_prefix(pg, text: str) -> None:
    box = pg.locator(PREFIX)
    box.fill(text)
    box.press("Enter")
    pg.wait_for_timeout(300)  # the rerun starts
    wait_idle(pg)


def pick_model(pg, name: str) -> None:
    """Type the bundle's name into the model combobox and take the match."""
    box = pg.locator(MODEL)
    if box.input_value() == name:
        return
    box.click()
    box.fill(name)
    pg.keyboard.press("Enter")
    pg.wait_for_timeout(300)  # the rerun starts
    wait_idle(pg)
    assert box.input_value() == name


def test_the_page_opens_on_the_best_single_model_and_states_its_domain(server, page, models):
    open_page(page, server)
    page.locator(CAPTION).wait_for()
    best = reports.best_single_bundle(list_bundles(models)).name
    assert page.locator(MODEL).input_value() == best
    assert page.get_by_text("The models know Flickr8k's world").count() == 1


def test_a_prefix_starts_the_caption_and_shows_its_cost(server, page):
    open_page(page, server)
    pick_model(page, "resnet50-attention")
    free = page.locator(CAPTION).inner_text().strip()
    set_prefix(page, "a circle")
    assert_no_exception(page)
    prompted = page.locator(CAPTION).inner_text().strip()
    assert prompted.startswith("“a circle"), prompted
    assert page.get_by_text("Prefix cost").count() == 1
    assert page.get_by_text(f"Without the prefix: {free}").count() == 1
    set_prefix(page, "a zebra circle")
    error = page.locator(ERROR).first.inner_text()
    assert "'zebra' is not in the vocabulary of resnet50-attention" in error
    set_prefix(page, "")
    assert page.locator(CAPTION).inner_text().strip() == free


def test_the_second_opinion_is_the_classifiers_or_says_there_is_none(server, page):
    open_page(page, server)
    pick_model(page, "resnet50-inject")
    page.locator(LABELS, has_text="resnet50 ImageNet classifier").wait_for()
    text = page.locator(LABELS).inner_text()
    assert "not the captioner" in text and "%" in text
    pick_model(page, "vgg16-inject")
    page.locator(LABELS, has_text="vgg16 weights carry no ImageNet classifier head").wait_for()
    assert_no_exception(page)


@pytest.mark.parametrize("size", list(SIZES))
def test_the_caption_page_fits_the_window(server, page, size, shots):
    w, h = SIZES[size]
    page.set_viewport_size({"width": w, "height": h})
    open_page(page, server)
    pick_model(page, "resnet50-attention")
    set_prefix(page, "a red")
    page.locator(LABELS).wait_for()
    assert_no_exception(page)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow} px wider than the window"
    page.wait_for_timeout(800)
    screenshot(page, shots, "caption-prompted", size)
