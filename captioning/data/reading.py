"""What every reader shares: collecting captions with skip reports, splits, and file access."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.data.dataset import DataError
from captioning.data.text import tokenize

SKIP_REASONS = ("unreadable file", "malformed", "missing image", "empty caption", "duplicate")


@dataclass
class Collector:
    """Accumulates captions and skip reports while reading one annotation source.

    Positions are line numbers (``unit="line"``, reported as ``FILE:N``) or indices into a JSON
    array (``unit="annotation"`` or ``"image"``, reported as ``FILE annotation N``). Bad entries
    never raise: malformed ones, ones whose image file is absent (``image_names`` is the set of
    files present, or None to skip that check), empty captions (no words) and exact duplicates
    of an earlier caption of the same image (same tokens) are counted and reported.
    """

    source: str
    image_names: set[str] | None
    where: str  # the image folder, as named in reports: "Images/"
    accepted: str  # the accepted layouts, for the error when nothing is usable
    unit: str = "line"
    captions: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    seen: dict[str, set[str]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)
    missing_slot: dict[str, int] = field(default_factory=dict)

    def at(self, pos: int) -> str:
        return f"{self.source}:{pos}" if self.unit == "line" else f"{self.source} {self.unit} {pos}"

    def bad_file(self, name: str, why: str) -> None:
        """A whole annotation file is absent or unreadable; the rest is still read."""
        self.counts["unreadable file"] += 1
        self.skipped.append(f"{name}: {why}")

    def bad_line(self, pos: int, why: str, text: str) -> None:
        self.counts["malformed"] += 1
        self.skipped.append(f"{self.at(pos)}: malformed {self.unit} ({why}): {text[:80]!r}")

    def add(self, pos: int, image: str, caption: str) -> None:
        caption = caption.strip()
        if self.image_names is not None and image not in self.image_names:
            self.counts["missing image"] += 1
            if image not in self.missing:
                self.missing_slot[image] = len(self.skipped)
                self.skipped.append("")  # filled in by finish(), keeping reports in order
            self.missing.setdefault(image, []).append(pos)
            return
        words = " ".join(tokenize(caption))
        if not words:
            self.counts["empty caption"] += 1
            self.skipped.append(f"{self.at(pos)}: empty caption for {image}")
            return
        seen = self.seen.setdefault(image, set())
        if words in seen:
            self.counts["duplicate"] += 1
            self.skipped.append(f"{self.at(pos)}: duplicate caption for {image}: {caption[:80]!r}")
            return
        seen.add(words)
        self.captions.setdefault(image, []).append(caption)

    def finish(self, *, required: bool = True) -> None:
        """Report each absent image once and order the counts.

        No usable caption at all is an error when ``required``.
        """
        for image, positions in self.missing.items():
            noun = "line" if self.unit == "line" else "caption"
            places = sorted(set(positions))
            where = f"{self.unit}{'s' if len(places) > 1 else ''} {ranges(places)}"
            self.skipped[self.missing_slot[image]] = (
                f"{self.source}: skipped {len(positions)} {noun}(s) ({where}) for {image}: "
                f"no such file in {self.where}"
            )
        self.counts = Counter({k: self.counts[k] for k in SKIP_REASONS if self.counts[k]})
        if required and not self.captions:
            raise DataError(
                f"{self.source}: no usable captions ({self.summary_of_skips()}). {self.accepted}"
            )

    def summary_of_skips(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.counts.items()) or "file is empty"


def hash_order(names: list[str], seed: int | None = None) -> list[str]:
    """Names sorted by SHA-1 of ``"SEED:name"`` (of the bare name without a seed), then name."""
    salt = "" if seed is None else f"{seed}:"
    return sorted(names, key=lambda n: (hashlib.sha1((salt + n).encode()).hexdigest(), n))


def clean_splits(
    raw: dict[str, list[str]],
    sources: dict[str, str],
    captions: dict[str, list[str]],
    names: set[str] | None,
    where: str,
    skipped: list[str],
) -> dict[str, list[str]]:
    """Drop split entries that are repeated, in an earlier split, or have no captions/image.

    ``sources`` names where each split's list came from, for the reports.
    """
    assigned: dict[str, str] = {}
    splits: dict[str, list[str]] = {}
    for split, entries in raw.items():
        drops: dict[str, list[str]] = {}
        kept: list[str] = []
        for name in entries:
            if name in assigned:
                other = assigned[name]
                why = "listed twice" if other == split else f"already in the {other} split"
            elif names is not None and name not in names:
                why = f"no image file in {where}"
            elif name not in captions:
                why = "no captions"
            else:
                assigned[name] = split
                kept.append(name)
                continue
            drops.setdefault(why, []).append(name)
        for why, dropped in drops.items():
            shown = ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
            skipped.append(f"{sources[split]}: dropped {len(dropped)} image(s) ({why}): {shown}")
        splits[split] = kept
    return splits


def find_images_dir(root: Path, candidates: tuple[str, ...], required: bool, accepted: str) -> Path:
    """The first of ``candidates`` under ``root`` that is a folder (an error if ``required``)."""
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    if not required:
        return root / candidates[0]
    wanted = " or ".join(f"{name}/" for name in candidates)
    raise DataError(f"no image folder in {root}: expected {wanted}. {accepted}")


def list_images(images_dir: Path) -> set[str]:
    try:
        return set(os.listdir(images_dir))
    except OSError as e:
        raise DataError(f"cannot list image folder {images_dir}: {e.strerror or e}") from None


def require_file(path: Path, layout: str, accepted: str) -> None:
    if not path.is_file():
        raise DataError(
            f"{path.name} is missing from {path.parent} (needed by the {layout} layout). {accepted}"
        )


def read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return text.splitlines()


def load_json(path: Path, name: str | None = None) -> Any:
    """Parsed JSON; ``ValueError`` (not ``DataError``) for a file that is absent, not UTF-8 text
    (as JSON is), empty or malformed, naming it as ``name`` (default: its file name)."""
    name = name or path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        byte = e.object[e.start : e.start + 1].hex()
        raise ValueError(f"{name} is not UTF-8 text (byte 0x{byte} at offset {e.start})") from None
    if not text.strip():
        raise ValueError(f"{name} is not valid JSON (the file is empty)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None


def ranges(numbers: list[int]) -> str:
    """Compact ``[1, 2, 3, 7]`` into ``"1-3, 7"``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
