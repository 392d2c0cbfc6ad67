"""COCO 2017 captions: annotations/captions_{train,val}2017.json, images in train2017/, val2017/.

COCO 2017 publishes no test captions, so the split is: test = all of val2017 (where COCO 2017
results are usually reported), dev = ``DEV_IMAGES`` train2017 images chosen by SHA-1 of their
name (``n // 8`` when train2017 has fewer than 8 x that), train = the rest of train2017. Every
reference is kept (COCO images have 5-7).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from captioning.data.dataset import CaptionDataset, DataError, resolve_data_dir
from captioning.data.layouts import (
    COCO_ANNOTATIONS_DIR,
    COCO_CAPTIONS,
    COCO_IMAGE_DIRS,
    layouts_help,
)
from captioning.data.reading import SKIP_REASONS, Collector, hash_order, list_images, load_json

NAME = "COCO 2017"
DEV_IMAGES = 5000
HELP = layouts_help("coco2017")
SPLIT_NOTE = (
    "COCO 2017 has no public test captions: test is all of val2017, dev is {n_dev} train2017 "
    "images chosen by SHA-1 of their file name, train is the rest of train2017 (not the "
    "Karpathy split: use dataset_coco.json for that)"
)


def load_coco(root: str | Path | None = None, *, check_images: bool = True) -> CaptionDataset:
    """Read COCO 2017 captions from ``root`` (the folder holding ``annotations/``).

    A missing or unreadable annotation file is reported and skipped (the other one is still
    read); annotations that are malformed, refer to an unknown image id or an absent image
    file, and empty or duplicate captions are skipped and reported. A JSON file that is not
    COCO captions is an error naming the accepted layouts.
    """
    root = resolve_data_dir(root)
    captions: dict[str, list[str]] = {}
    skipped: list[str] = []
    counts: Counter[str] = Counter()
    per_part: dict[str, list[str]] = {}
    for part, file in COCO_CAPTIONS.items():
        col = _read_part(root, part, file, check_images)
        captions.update(col.captions)
        skipped += col.skipped
        counts.update(col.counts)
        per_part[part] = list(col.captions)
    if not captions:
        raise DataError(
            f"no usable COCO captions in {root / COCO_ANNOTATIONS_DIR}/ "
            f"({'; '.join(skipped[:3]) or 'no annotations'}). {HELP}"
        )
    ordered = hash_order(per_part["train"])
    n_dev = DEV_IMAGES if len(ordered) >= 8 * DEV_IMAGES else len(ordered) // 8
    return CaptionDataset(
        root=root,
        images_dir=root,
        layout="coco2017",
        captions=captions,
        splits={"train": ordered[n_dev:], "dev": ordered[:n_dev], "test": per_part["val"]},
        name=NAME,
        split_source="coco2017",
        split_note=SPLIT_NOTE.format(n_dev=n_dev),
        skipped=skipped,
        skip_counts={k: counts[k] for k in SKIP_REASONS if counts[k]},
    )


def is_coco_captions(data: Any) -> bool:
    """Whether parsed JSON has COCO's captions shape (``images`` and ``annotations`` lists)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def _read_part(root: Path, part: str, file: str, check_images: bool) -> Collector:
    """Captions of one annotation file; names are ``train2017/FILE_NAME``."""
    folder = COCO_IMAGE_DIRS[part]
    path = root / COCO_ANNOTATIONS_DIR / file
    present = None
    if check_images and path.is_file():
        if not (root / folder).is_dir():
            raise DataError(f"no image folder {root / folder}/ for {file}. {HELP}")
        present = {f"{folder}/{n}" for n in list_images(root / folder)}
    col = Collector(file, present, f"{root.name}/", HELP, unit="annotation")
    if not path.is_file():
        col.bad_file(file, f"missing from {path.parent}/: no {part}2017 captions")
        return col
    try:
        data = load_json(path)
    except ValueError as e:
        col.bad_file(file, f"skipped: {e}")
        return col
    if not is_coco_captions(data):
        raise DataError(
            f"{path} is not a COCO captions file (no 'images' and 'annotations' lists). "
            f"{layouts_help()}"
        )
    files = {
        im["id"]: im["file_name"]
        for im in data["images"]
        if isinstance(im, dict) and isinstance(im.get("file_name"), str) and "id" in im
    }
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            col.bad_line(i, "no caption text", repr(ann))
        elif not isinstance(image_id := ann.get("image_id"), int | str) or image_id not in files:
            col.bad_line(i, f"image_id {image_id!r} is not in images", repr(ann))
        else:
            col.add(i, f"{folder}/{files[image_id]}", ann["caption"])
    col.finish(required=False)
    return col
