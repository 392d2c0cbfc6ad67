"""Caption tokenization shared by the vocabulary and the metrics."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercase, turn every punctuation character into a space, split on whitespace."""
    return _PUNCT.sub(" ", text.lower()).split()
