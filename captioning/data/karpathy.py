"""Karpathy split files: dataset_coco.json, dataset_flickr8k.json and dataset_flickr30k.json.

Each holds ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}]}],
"dataset": ...}``. Splits map to ours as ``train`` and ``restval`` -> train, ``val`` -> dev and
``test`` -> test: the splits papers report on (COCO 113287/5000/5000, Flickr8k 6000/1000/1000,
Flickr30k 29000/1014/1000).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioning.data.dataset import (
    SPLITS,
    CaptionDataset,
    DataError,
    resolve_data_dir,
)
from captioning.data.layouts import (
    COCO_ANNOTATIONS_DIR,
    COCO_CAPTIONS,
    FLICKR8K_IMAGE_DIRS,
    FLICKR30K_IMAGE_DIRS,
    KARPATHY_FILES,
    layouts_help,
)
from captioning.data.reading import (
    Collector,
    clean_splits,
    find_images_dir,
    list_images,
    load_json,
)

SPLIT_MAP = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
DATASET_NAMES = {"coco": "COCO 2014", "flickr8k": "Flickr8k", "flickr30k": "Flickr30k"}
IMAGE_DIRS = {"flickr8k": FLICKR8K_IMAGE_DIRS, "flickr30k": FLICKR30K_IMAGE_DIRS}
HELP = layouts_help("karpathy")
EXPECTED_JSON = (
    'expected a Karpathy split file, {"images": [{"filename", "split", "sentences"}, ...]}; '
    "see `python -m captioning data --help`"
)
JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}  # the JSON name of what json.loads returns


def load_karpathy(path: str | Path | None = None, *, check_images: bool = True) -> CaptionDataset:
    """Read a Karpathy split file (``path`` itself, or the one such file in folder ``path``).

    Images live under ``FILEPATH/FILENAME`` relative to the file's folder when entries have a
    ``filepath`` (COCO: ``train2014/``, ``val2014/``), else in the data set's usual image folder
    beside the file (Flickr8k ``Images/``, Flickr30k ``flickr30k-images/``). Image names are
    ``FILEPATH/FILENAME`` or ``FILENAME``, so Flickr8k names equal the official layout's.
    Malformed entries, sentences without text, absent images, empty and duplicate captions are
    skipped and reported, as for Flickr8k.
    """
    path = resolve_data_dir(path, allow_file=True)
    file = path if path.is_file() else find_karpathy_file(path)
    root = file.parent
    data = read_karpathy_json(file)
    dataset = dataset_of(file, data)
    images: list[Any] = data["images"]
    with_paths = any(isinstance(e, dict) and e.get("filepath") for e in images)
    if with_paths:
        images_dir = root
        present = _list_subfolders(root, images, file.name) if check_images else None
    else:
        candidates = IMAGE_DIRS.get(dataset, FLICKR8K_IMAGE_DIRS)
        images_dir = find_images_dir(root, candidates, check_images, HELP)
        present = list_images(images_dir) if check_images else None
    where = f"{root.name}/" if with_paths else f"{images_dir.name}/"
    col = Collector(file.name, present, where, HELP, unit="image")
    raw: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for i, entry in enumerate(images):
        name, split, why = image_entry(entry)
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if why is None and not isinstance(sentences, list):
            why = "no sentences list"
        if why is not None:
            col.bad_line(i, why, json.dumps(entry)[:80])
            continue
        raw[split].append(name)
        for sentence in sentences:
            text = sentence_text(sentence)
            if text is None:
                col.bad_line(i, "a sentence without raw or tokens", json.dumps(sentence)[:80])
            else:
                col.add(i, name, text)
    col.finish()
    splits = clean_splits(raw, split_sources(file), col.captions, present, where, col.skipped)
    return CaptionDataset(
        root=root,
        images_dir=images_dir,
        layout="karpathy",
        captions=col.captions,
        splits=splits,
        name=DATASET_NAMES[dataset],
        split_source="karpathy",
        split_note=f"Karpathy split from {file.name} (val as dev, restval counted as train)",
        skipped=col.skipped,
        skip_counts=dict(col.counts),
    )


def read_karpathy_splits(file: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Only the split of a Karpathy file: split -> file names, and reports of unusable entries."""
    data = read_karpathy_json(file)
    raw: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    reports: list[str] = []
    for i, entry in enumerate(data["images"]):
        name, split, why = image_entry(entry)
        if why is None:
            raw[split].append(name)
        else:
            reports.append(f"{file.name} image {i}: malformed image ({why})")
    return raw, reports


def split_sources(file: Path) -> dict[str, str]:
    """How reports name each of our splits' lists: ``dataset_coco.json (val)`` for dev."""
    theirs = {ours: "+".join(k for k, v in SPLIT_MAP.items() if v == ours) for ours in SPLITS}
    return {ours: f"{file.name} ({names})" for ours, names in theirs.items()}


def find_karpathy_file(folder: Path) -> Path:
    found = [folder / f for f in KARPATHY_FILES if (folder / f).is_file()]
    if not found:
        raise DataError(f"no Karpathy split file in {folder}. {HELP}")
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise DataError(f"several Karpathy split files in {folder} ({names}): pass one as --data")
    return found[0]


def is_karpathy_json(data: Any) -> bool:
    """Whether parsed JSON has the Karpathy shape (an image entry with filename and sentences)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return False
    if "annotations" in data:
        return False
    entries = [e for e in data["images"] if isinstance(e, dict)]
    return any("filename" in e and "sentences" in e for e in entries) or not data["images"]


def read_karpathy_json(file: Path) -> dict:
    """The parsed file; a one-line error naming the file, saying what it holds and what a
    Karpathy split file holds if it is not one."""
    try:
        data = load_json(file, str(file))
    except ValueError as e:
        raise DataError(f"{e}; {EXPECTED_JSON}") from None
    if not is_karpathy_json(data):
        if isinstance(data, dict) and "annotations" in data:
            raise DataError(
                f"{file} holds COCO-style images + annotations, which are read as COCO 2017 "
                f"from DIR/{COCO_ANNOTATIONS_DIR}/{COCO_CAPTIONS['train']} and "
                f"{COCO_CAPTIONS['val']} (pass DIR)"
            )
        raise DataError(f"{file} {_shape(data)}; {EXPECTED_JSON}")
    return data


def _shape(data: Any) -> str:
    """What a JSON document that is not a Karpathy split file holds, for an error message."""
    if not isinstance(data, dict):
        return f"holds a JSON {JSON_TYPES.get(type(data), type(data).__name__)}, not an object"
    if not data:
        return "is an empty JSON object"
    if not isinstance(data.get("images"), list):
        keys = ", ".join(sorted(data)[:6]) + (", ..." if len(data) > 6 else "")
        return f'holds an object with keys {keys} but no "images" list'
    return 'has no "images" entry with "filename" and "sentences"'


def dataset_of(file: Path, data: dict) -> str:
    """``coco``, ``flickr8k`` or ``flickr30k``, from the file name, else its ``dataset`` key."""
    if file.name in KARPATHY_FILES:
        return KARPATHY_FILES[file.name]
    if data.get("dataset") in DATASET_NAMES:
        return data["dataset"]
    raise DataError(
        f"{file}: cannot tell the data set: name the file one of {', '.join(KARPATHY_FILES)} "
        f'or give it a "dataset" key ({", ".join(DATASET_NAMES)})'
    )


def image_entry(entry: Any) -> tuple[str, str, str | None]:
    """``(name, our split, None)`` for a usable image entry, else ``("", "", why not)``."""
    if not isinstance(entry, dict):
        return "", "", "not an object"
    filename, filepath = entry.get("filename"), entry.get("filepath") or ""
    if not isinstance(filename, str) or not filename.strip():
        return "", "", "no filename"
    if not isinstance(filepath, str):
        return "", "", "filepath is not a string"
    split = entry.get("split")
    if split not in SPLIT_MAP:
        return "", "", f"split {split!r} is not one of {', '.join(SPLIT_MAP)}"
    name = f"{filepath.strip('/')}/{filename.strip()}" if filepath else filename.strip()
    return name, SPLIT_MAP[split], None


def sentence_text(sentence: Any) -> str | None:
    """A sentence's ``raw`` text, else its joined ``tokens``; None if it has neither."""
    if not isinstance(sentence, dict):
        return None
    raw, tokens = sentence.get("raw"), sentence.get("tokens")
    if isinstance(raw, str) and raw.strip():
        return raw
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    return raw if isinstance(raw, str) else None


def _list_subfolders(root: Path, images: list[Any], source: str) -> set[str]:
    """``FILEPATH/FILENAME`` of every file in the folders the entries name."""
    paths = (e.get("filepath") for e in images if isinstance(e, dict))
    folders = sorted({p.strip("/") for p in paths if isinstance(p, str)} - {""})
    present: set[str] = set()
    for folder in folders:
        if not (root / folder).is_dir():
            raise DataError(
                f"no image folder {root / folder}/ (named by filepath in {source}). {HELP}"
            )
        present |= {f"{folder}/{n}" for n in list_images(root / folder)}
    return present
