"""Flickr30k captions: results_20130124.token (official) or the Kaggle results.csv.

Flickr30k ships no split files. With ``dataset_flickr30k.json`` beside the captions the
Karpathy split is used (29000 train / 1014 dev / 1000 test, the one papers report on);
without it, a deterministic seeded split: images sorted by SHA-1 of ``"SEED:name"``, 1000 dev,
1000 test, the rest train (``n // 8`` each below 8000 images). ``split_source`` and the
summary say which.
"""

from __future__ import annotations

from pathlib import Path

from captioning.data.dataset import FIX_HELP, CaptionDataset, DataError, resolve_data_dir
from captioning.data.flickr8k import read_token_file
from captioning.data.karpathy import read_karpathy_splits, split_sources
from captioning.data.layouts import (
    FLICKR30K_IMAGE_DIRS,
    FLICKR30K_KAGGLE_CSV,
    FLICKR30K_TOKENS,
    KARPATHY_FILES,
    layouts_help,
)
from captioning.data.reading import (
    Collector,
    clean_splits,
    find_images_dir,
    hash_order,
    list_images,
    read_lines,
)

NAME = "Flickr30k"
KARPATHY_FILE = next(f for f, d in KARPATHY_FILES.items() if d == "flickr30k")
SEEDED_EVAL_IMAGES = 1000  # dev and test each, in the seeded split
DEFAULT_SEED = 0
HELP = layouts_help("flickr30k-token", "flickr30k-kaggle")
KAGGLE_HEADER = ["image_name", "comment_number", "comment"]


def load_flickr30k(
    root: str | Path | None = None, *, check_images: bool = True, seed: int = DEFAULT_SEED
) -> CaptionDataset:
    """Read Flickr30k from ``root``: the token file if present, else the Kaggle CSV.

    Bad lines, absent images, empty and duplicate captions are skipped and reported, as for
    Flickr8k. ``seed`` only matters without ``dataset_flickr30k.json``.
    """
    root = resolve_data_dir(root)
    if (root / FLICKR30K_TOKENS).is_file():
        layout, source = "flickr30k-token", FLICKR30K_TOKENS
    elif (root / FLICKR30K_KAGGLE_CSV).is_file():
        layout, source = "flickr30k-kaggle", FLICKR30K_KAGGLE_CSV
    else:
        raise DataError(
            f"no Flickr30k captions file in {root}: expected {FLICKR30K_TOKENS} or "
            f"{FLICKR30K_KAGGLE_CSV}. {HELP} {FIX_HELP}"
        )
    images_dir = find_images_dir(root, FLICKR30K_IMAGE_DIRS, check_images, HELP)
    names = list_images(images_dir) if check_images else None
    col = Collector(source, names, f"{images_dir.name}/", HELP)
    if layout == "flickr30k-token":
        read_token_file(root / source, col)
    else:
        read_kaggle_csv(root / source, col)
    col.finish()
    ds = CaptionDataset(
        root=root,
        images_dir=images_dir,
        layout=layout,
        captions=col.captions,
        splits={},
        name=NAME,
        skipped=col.skipped,
        skip_counts=dict(col.counts),
    )
    if (root / KARPATHY_FILE).is_file():
        _karpathy_split(ds, root / KARPATHY_FILE, names)
    else:
        _seeded_split(ds, seed)
    return ds


def read_kaggle_csv(path: Path, col: Collector) -> None:
    """Lines ``image| number| caption`` (a space after each ``|``), after a header line."""
    for line_no, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("|", 2)]
        if line_no == 1 and [c.lower() for c in cells] == KAGGLE_HEADER:
            continue
        if len(cells) < 3 or not cells[0]:
            col.bad_line(line_no, "expected image| number| caption", line)
        elif not cells[1].isdigit():
            col.bad_line(line_no, f"comment number {cells[1][:20]!r} is not a number", line)
        else:
            col.add(line_no, cells[0], cells[2])


def _karpathy_split(ds: CaptionDataset, file: Path, names: set[str] | None) -> None:
    raw, reports = read_karpathy_splits(file)
    ds.skipped += reports
    where = f"{ds.images_dir.name}/"
    ds.splits = clean_splits(raw, split_sources(file), ds.captions, names, where, ds.skipped)
    in_split = {n for split in ds.splits.values() for n in split}
    outside = len(ds.captions) - len(in_split)
    if outside:
        ds.skipped.append(f"{file.name}: {outside} captioned image(s) are in no split")
    ds.split_source = "karpathy"
    ds.split_note = f"Karpathy split from {file.name} (val as dev, restval counted as train)"


def _seeded_split(ds: CaptionDataset, seed: int) -> None:
    ordered = hash_order(list(ds.captions), seed)
    n = len(ordered)
    k = SEEDED_EVAL_IMAGES if n >= 8 * SEEDED_EVAL_IMAGES else n // 8
    ds.splits = {
        "train": ordered[: n - 2 * k],
        "dev": ordered[n - 2 * k : n - k],
        "test": ordered[n - k :],
    }
    ds.split_source = "seeded"
    ds.split_seed = seed
    ds.split_note = (
        f"NOT the Karpathy split: no {KARPATHY_FILE} here, so images are sorted by SHA-1 of "
        f"'{seed}:file name' (seed {seed}); the last {k} are test, the {k} before them dev, "
        "the rest train"
    )
