"""Flickr8k captions and splits, in the official or the Kaggle layout."""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from captioning.text import tokenize

DATA_ENV = "CAPTIONING_DATA"
SPLITS = ("train", "dev", "test")
OFFICIAL_TOKENS = "Flickr8k.token.txt"
OFFICIAL_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
OFFICIAL_IMAGE_DIRS = ("Images", "Flicker8k_Dataset")
KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_IMAGE_DIR = "Images"
OFFICIAL_NOTE = "official Flickr8k split"
KAGGLE_NOTE = (
    "NOT the official Flickr8k split: the Kaggle layout has no split files, so images are split "
    "deterministically by SHA-1 of their file name; scores are not comparable with published "
    "official-split results"
)
LAYOUTS_HELP = (
    f"Accepted layouts: official ({OFFICIAL_TOKENS}, {', '.join(OFFICIAL_SPLIT_FILES.values())} "
    f"and images in {' or '.join(d + '/' for d in OFFICIAL_IMAGE_DIRS)}) or Kaggle "
    f"({KAGGLE_CAPTIONS} with header 'image,caption' and images in {KAGGLE_IMAGE_DIR}/)."
)
FIX_HELP = f"Pass --data DIR or set the {DATA_ENV} environment variable to the Flickr8k folder."
MAX_LISTED = 10


class DataError(RuntimeError):
    """Missing or unusable data directory or files; the message says what and how to fix it."""


@dataclass
class Flickr8k:
    """Captions and splits of Flickr8k; ``skipped`` explains every input line left out."""

    root: Path
    images_dir: Path
    layout: str
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)
    split_note: str = OFFICIAL_NOTE
    skip_counts: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_lines(self) -> int:
        """Total caption lines left out, over all reasons."""
        return sum(self.skip_counts.values())

    def image_path(self, name: str) -> Path:
        return self.images_dir / name

    def split_captions(self, split: str) -> dict[str, list[str]]:
        """Image name → captions for the images of ``split`` ("train", "dev" or "test")."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        return {name: self.captions[name] for name in self.splits[split]}

    def summary(self) -> str:
        n_captions = sum(len(c) for c in self.captions.values())
        sizes = ", ".join(f"{s} {len(self.splits.get(s, []))}" for s in SPLITS)
        reasons = ", ".join(f"{n} {why}" for why, n in self.skip_counts.items() if n) or "none"
        lines = [
            f"Flickr8k ({self.layout} layout) at {self.root}",
            f"  images:   {self.images_dir}",
            f"  captions: {n_captions} for {len(self.captions)} images",
            f"  splits:   {sizes} ({self.split_note})",
            f"  skipped lines: {self.skipped_lines} ({reasons})",
        ]
        lines += [f"    - {report}" for report in self.skipped[:MAX_LISTED]]
        if len(self.skipped) > MAX_LISTED:
            lines.append(f"    ... and {len(self.skipped) - MAX_LISTED} more reports")
        return "\n".join(lines)


def resolve_data_dir(arg: str | Path | None) -> Path:
    """The data folder: ``arg`` if given, else ``$CAPTIONING_DATA``; it must exist."""
    if arg is not None and str(arg) != "":
        path, source = Path(arg).expanduser(), "--data"
    elif os.environ.get(DATA_ENV):
        path, source = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        raise DataError(f"no data directory given. {FIX_HELP}")
    if not path.exists():
        raise DataError(f"data directory {path} (from {source}) does not exist. {FIX_HELP}")
    if not path.is_dir():
        raise DataError(f"data directory {path} (from {source}) is not a directory. {FIX_HELP}")
    return path


def load_flickr8k(root: str | Path | None = None, *, check_images: bool = True) -> Flickr8k:
    """Read Flickr8k from ``root`` (else ``$CAPTIONING_DATA``), detecting the layout.

    Bad caption lines never raise: malformed lines, lines whose image file is absent,
    empty captions (no words) and exact duplicates of an earlier caption of the same image
    (same tokens) are skipped and reported in ``skipped`` / ``skip_counts``. Split images
    without captions or image file are dropped with a report.

    The official layout uses the official split files. The Kaggle layout has none, so images
    are sorted by ``sha1(name).hexdigest()`` (then name) and split 6000 train / 1000 dev /
    rest test; with fewer than 8000 images, dev and test get ``n // 8`` each and train the
    rest (the same 6:1:1 proportions, all deterministic).

    With ``check_images`` the image folder is listed once and lines for absent images are
    skipped; without it the folder is not read (and need not exist) and no line is skipped
    for a missing image.
    """
    root = resolve_data_dir(root)
    if (root / OFFICIAL_TOKENS).is_file():
        return _load_official(root, check_images)
    if (root / KAGGLE_CAPTIONS).is_file():
        return _load_kaggle(root, check_images)
    raise DataError(
        f"no Flickr8k captions file in {root}: expected {OFFICIAL_TOKENS} or {KAGGLE_CAPTIONS}. "
        f"{LAYOUTS_HELP} {FIX_HELP}"
    )


@dataclass
class _Collector:
    """Accumulates captions and skip reports while reading a captions file."""

    source: str
    image_names: set[str] | None
    image_dir_name: str
    captions: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    seen: dict[str, set[str]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)
    missing_slot: dict[str, int] = field(default_factory=dict)

    def bad_line(self, line_no: int, why: str, text: str) -> None:
        self.counts["malformed"] += 1
        self.skipped.append(f"{self.source}:{line_no}: malformed line ({why}): {text[:80]!r}")

    def add(self, line_no: int, image: str, caption: str) -> None:
        caption = caption.strip()
        if self.image_names is not None and image not in self.image_names:
            self.counts["missing image"] += 1
            if image not in self.missing:
                self.missing_slot[image] = len(self.skipped)
                self.skipped.append("")  # filled in by finish(), keeping reports in line order
            self.missing.setdefault(image, []).append(line_no)
            return
        words = " ".join(tokenize(caption))
        if not words:
            self.counts["empty caption"] += 1
            self.skipped.append(f"{self.source}:{line_no}: empty caption for {image}")
            return
        seen = self.seen.setdefault(image, set())
        if words in seen:
            self.counts["duplicate"] += 1
            self.skipped.append(
                f"{self.source}:{line_no}: duplicate caption for {image}: {caption[:80]!r}"
            )
            return
        seen.add(words)
        self.captions.setdefault(image, []).append(caption)

    def finish(self) -> None:
        """Add one report per absent image and fix the order of the counts."""
        for image, line_nos in self.missing.items():
            where = f"line {line_nos[0]}" if len(line_nos) == 1 else f"lines {_ranges(line_nos)}"
            self.skipped[self.missing_slot[image]] = (
                f"{self.source}: skipped {len(line_nos)} line(s) ({where}) for {image}: "
                f"no such file in {self.image_dir_name}/"
            )
        order = ("malformed", "missing image", "empty caption", "duplicate")
        self.counts = Counter({k: self.counts[k] for k in order if self.counts[k]})
        if not self.captions:
            raise DataError(
                f"{self.source}: no usable captions ({self.summary_of_skips()}). {LAYOUTS_HELP}"
            )

    def summary_of_skips(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.counts.items()) or "file is empty"


def _load_official(root: Path, check_images: bool) -> Flickr8k:
    images_dir = _find_images_dir(root, OFFICIAL_IMAGE_DIRS, check_images)
    names = _list_images(images_dir) if check_images else None
    split_paths = {s: root / f for s, f in OFFICIAL_SPLIT_FILES.items()}
    for path in split_paths.values():
        _require_file(path, "official")
    col = _Collector(OFFICIAL_TOKENS, names, images_dir.name)
    for line_no, line in enumerate(_read_lines(root / OFFICIAL_TOKENS), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_, index = key.strip().rpartition("#")
        if not tab:
            col.bad_line(line_no, "no tab", line)
        elif not hash_ or not image or not index.strip().isdigit():
            col.bad_line(line_no, "expected IMAGE#N before the tab", line)
        else:
            col.add(line_no, image, caption)
    col.finish()
    raw_splits = {
        s: [ln.strip() for ln in _read_lines(p) if ln.strip()] for s, p in split_paths.items()
    }
    skipped = col.skipped
    splits = _clean_splits(raw_splits, col.captions, names, images_dir.name, skipped)
    return Flickr8k(
        root=root,
        images_dir=images_dir,
        layout="official",
        captions=col.captions,
        splits=splits,
        skipped=skipped,
        split_note=OFFICIAL_NOTE,
        skip_counts=dict(col.counts),
    )


def _load_kaggle(root: Path, check_images: bool) -> Flickr8k:
    images_dir = _find_images_dir(root, (KAGGLE_IMAGE_DIR,), check_images)
    names = _list_images(images_dir) if check_images else None
    col = _Collector(KAGGLE_CAPTIONS, names, images_dir.name)
    path = root / KAGGLE_CAPTIONS
    try:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.reader(f)
            for row_no, row in enumerate(reader):
                line_no = reader.line_num
                cells = [c.strip() for c in row]
                if row_no == 0 and [c.lower() for c in cells] == ["image", "caption"]:
                    continue
                if not any(cells):
                    continue
                if len(cells) < 2 or not cells[0]:
                    col.bad_line(line_no, "expected image,caption", ",".join(row))
                    continue
                # An unquoted comma splits the caption: join the pieces back.
                col.add(line_no, cells[0], ",".join(row[1:]))
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    col.finish()
    splits = _hash_split(list(col.captions))
    return Flickr8k(
        root=root,
        images_dir=images_dir,
        layout="kaggle",
        captions=col.captions,
        splits=splits,
        skipped=col.skipped,
        split_note=KAGGLE_NOTE,
        skip_counts=dict(col.counts),
    )


def _hash_split(images: list[str]) -> dict[str, list[str]]:
    """Deterministic 6000/1000/rest split by SHA-1 of the name (6:1:1 when fewer than 8000)."""
    ordered = sorted(images, key=lambda n: (hashlib.sha1(n.encode()).hexdigest(), n))
    n = len(ordered)
    n_train, n_dev = (6000, 1000) if n >= 8000 else (n - 2 * (n // 8), n // 8)
    return {
        "train": ordered[:n_train],
        "dev": ordered[n_train : n_train + n_dev],
        "test": ordered[n_train + n_dev :],
    }


def _clean_splits(
    raw: dict[str, list[str]],
    captions: dict[str, list[str]],
    names: set[str] | None,
    image_dir_name: str,
    skipped: list[str],
) -> dict[str, list[str]]:
    """Drop split entries that are repeated, in an earlier split, or have no captions/image."""
    assigned: dict[str, str] = {}
    splits: dict[str, list[str]] = {}
    for split, entries in raw.items():
        source = OFFICIAL_SPLIT_FILES[split]
        drops: dict[str, list[str]] = {}
        kept: list[str] = []
        for name in entries:
            if name in assigned:
                other = assigned[name]
                why = "listed twice" if other == split else f"already in the {other} split"
            elif names is not None and name not in names:
                why = f"no image file in {image_dir_name}/"
            elif name not in captions:
                why = "no captions"
            else:
                assigned[name] = split
                kept.append(name)
                continue
            drops.setdefault(why, []).append(name)
        for why, dropped in drops.items():
            shown = ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
            skipped.append(f"{source}: dropped {len(dropped)} image(s) ({why}): {shown}")
        splits[split] = kept
    return splits


def _find_images_dir(root: Path, candidates: tuple[str, ...], required: bool) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    if not required:
        return root / candidates[0]
    wanted = " or ".join(f"{name}/" for name in candidates)
    raise DataError(f"no image folder in {root}: expected {wanted}. {LAYOUTS_HELP} {FIX_HELP}")


def _list_images(images_dir: Path) -> set[str]:
    try:
        return set(os.listdir(images_dir))
    except OSError as e:
        raise DataError(f"cannot list image folder {images_dir}: {e.strerror or e}") from None


def _require_file(path: Path, layout: str) -> None:
    if not path.is_file():
        raise DataError(
            f"{path.name} is missing from {path.parent} (needed by the {layout} layout). "
            f"{LAYOUTS_HELP} {FIX_HELP}"
        )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return text.splitlines()


def _ranges(numbers: list[int]) -> str:
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
