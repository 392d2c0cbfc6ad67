"""Flickr8k captions and splits, in the official or the Kaggle layout."""

from __future__ import annotations

import csv
from pathlib import Path

from captioning.data.dataset import FIX_HELP, CaptionDataset, DataError, resolve_data_dir
from captioning.data.layouts import (
    FLICKR8K_IMAGE_DIRS,
    FLICKR8K_KAGGLE_CAPTIONS,
    FLICKR8K_KAGGLE_IMAGE_DIRS,
    FLICKR8K_SPLIT_FILES,
    FLICKR8K_TOKENS,
    layouts_help,
)
from captioning.data.reading import (
    Collector,
    clean_splits,
    find_images_dir,
    hash_order,
    list_images,
    read_lines,
    require_file,
)

NAME = "Flickr8k"
OFFICIAL_NOTE = "official Flickr8k split"
KAGGLE_NOTE = (
    "NOT the official Flickr8k split: the Kaggle layout has no split files, so images are split "
    "deterministically by SHA-1 of their file name; scores are not comparable with published "
    "official-split results"
)
LAYOUTS_HELP = layouts_help("flickr8k-official", "flickr8k-kaggle")


def load_flickr8k(root: str | Path | None = None, *, check_images: bool = True) -> CaptionDataset:
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
    if (root / FLICKR8K_TOKENS).is_file():
        return load_official(root, check_images)
    if (root / FLICKR8K_KAGGLE_CAPTIONS).is_file():
        return load_kaggle(root, check_images)
    raise DataError(
        f"no Flickr8k captions file in {root}: expected {FLICKR8K_TOKENS} or "
        f"{FLICKR8K_KAGGLE_CAPTIONS}. {LAYOUTS_HELP} {FIX_HELP}"
    )


def read_token_file(path: Path, col: Collector) -> None:
    """Lines ``IMAGE#N<tab>caption`` (Flickr8k.token.txt, Flickr30k's results_20130124.token)."""
    for line_no, line in enumerate(read_lines(path), start=1):
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


def load_official(root: Path, check_images: bool) -> CaptionDataset:
    images_dir = find_images_dir(root, FLICKR8K_IMAGE_DIRS, check_images, LAYOUTS_HELP)
    names = list_images(images_dir) if check_images else None
    split_paths = {s: root / f for s, f in FLICKR8K_SPLIT_FILES.items()}
    for path in split_paths.values():
        require_file(path, "official", LAYOUTS_HELP)
    col = Collector(FLICKR8K_TOKENS, names, f"{images_dir.name}/", LAYOUTS_HELP)
    read_token_file(root / FLICKR8K_TOKENS, col)
    col.finish()
    raw_splits = {
        s: [ln.strip() for ln in read_lines(p) if ln.strip()] for s, p in split_paths.items()
    }
    splits = clean_splits(
        raw_splits, FLICKR8K_SPLIT_FILES, col.captions, names, f"{images_dir.name}/", col.skipped
    )
    return CaptionDataset(
        root=root,
        images_dir=images_dir,
        layout="flickr8k-official",
        captions=col.captions,
        splits=splits,
        name=NAME,
        split_source="official",
        split_note=OFFICIAL_NOTE,
        skipped=col.skipped,
        skip_counts=dict(col.counts),
    )


def load_kaggle(root: Path, check_images: bool) -> CaptionDataset:
    images_dir = find_images_dir(root, FLICKR8K_KAGGLE_IMAGE_DIRS, check_images, LAYOUTS_HELP)
    names = list_images(images_dir) if check_images else None
    col = Collector(FLICKR8K_KAGGLE_CAPTIONS, names, f"{images_dir.name}/", LAYOUTS_HELP)
    path = root / FLICKR8K_KAGGLE_CAPTIONS
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
    return CaptionDataset(
        root=root,
        images_dir=images_dir,
        layout="flickr8k-kaggle",
        captions=col.captions,
        splits=hash_split(list(col.captions)),
        name=NAME,
        split_source="hash",
        split_note=KAGGLE_NOTE,
        skipped=col.skipped,
        skip_counts=dict(col.counts),
    )


def hash_split(images: list[str]) -> dict[str, list[str]]:
    """Deterministic 6000/1000/rest split by SHA-1 of the name (6:1:1 when fewer than 8000)."""
    ordered = hash_order(images)
    n = len(ordered)
    n_train, n_dev = (6000, 1000) if n >= 8000 else (n - 2 * (n // 8), n // 8)
    return {
        "train": ordered[:n_train],
        "dev": ordered[n_train : n_train + n_dev],
        "test": ordered[n_train + n_dev :],
    }
