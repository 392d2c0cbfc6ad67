"""Pick the layout of a data folder (or file) and read it: ``load_dataset`` for every consumer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioning.data.coco import load_coco
from captioning.data.dataset import (
    DATA_ENV,
    FIX_HELP,
    CaptionDataset,
    DataError,
    resolve_data_dir,
)
from captioning.data.flickr8k import load_flickr8k
from captioning.data.flickr30k import load_flickr30k
from captioning.data.karpathy import load_karpathy
from captioning.data.layouts import (
    COCO_ANNOTATIONS_DIR,
    COCO_CAPTIONS,
    FLICKR8K_KAGGLE_CAPTIONS,
    FLICKR8K_TOKENS,
    FLICKR30K_KAGGLE_CSV,
    FLICKR30K_TOKENS,
    KARPATHY_FILES,
    LAYOUTS,
)

READERS: dict[str, Callable[..., CaptionDataset]] = {
    "flickr8k-official": load_flickr8k,
    "flickr8k-kaggle": load_flickr8k,
    "coco2017": load_coco,
    "karpathy": load_karpathy,
    "flickr30k-token": load_flickr30k,
    "flickr30k-kaggle": load_flickr30k,
}
RECOGNISED = (
    f"recognised layouts: {', '.join(LAYOUTS)}; "
    "`python -m captioning data --help` lists their files"
)
MAX_LISTED = 5  # entries of an unrecognised folder named in the error
MAX_SUBFOLDERS = 50  # subfolders of an unrecognised folder checked for a layout
# captions files named by --data FILE instead of their folder
CAPTION_FILES = {
    FLICKR8K_TOKENS: "flickr8k-official",
    FLICKR8K_KAGGLE_CAPTIONS: "flickr8k-kaggle",
    FLICKR30K_TOKENS: "flickr30k-token",
    FLICKR30K_KAGGLE_CSV: "flickr30k-kaggle",
}


def detect_layout(path: str | Path | None = None) -> tuple[str, Path]:
    """``(layout id, what to hand its reader)`` for a data folder, or a Karpathy/COCO JSON file.

    In a folder the first match wins: the Flickr8k token file, COCO 2017 annotations, a
    Flickr30k captions file (which uses ``dataset_flickr30k.json`` for its split), a Karpathy
    split file, then the Flickr8k Kaggle ``captions.txt``. A folder that matches none is an
    error naming the folder, what it holds, and a folder beside it that matches.
    """
    source = "--data" if path is not None and str(path) != "" else f"${DATA_ENV}"
    path = resolve_data_dir(path, allow_file=True)
    if path.is_file():
        return _detect_file(path)
    layout = _folder_layout(path)
    if layout is None:
        fix = "" if source == "--data" else f"\n  {FIX_HELP}"
        raise DataError(
            f"no known caption layout in {path} (from {source}): {_what_is_there(path)}\n"
            f"  {RECOGNISED}{fix}"
        )
    return layout, path


def _folder_layout(path: Path) -> str | None:
    """The id of the layout folder ``path`` holds, or None."""
    if (path / FLICKR8K_TOKENS).is_file():
        return "flickr8k-official"
    if any((path / COCO_ANNOTATIONS_DIR / f).is_file() for f in COCO_CAPTIONS.values()):
        return "coco2017"
    if (path / FLICKR30K_TOKENS).is_file():
        return "flickr30k-token"
    if (path / FLICKR30K_KAGGLE_CSV).is_file():
        return "flickr30k-kaggle"
    if any((path / f).is_file() for f in KARPATHY_FILES):
        return "karpathy"
    if (path / FLICKR8K_KAGGLE_CAPTIONS).is_file():
        return "flickr8k-kaggle"
    return None


def _what_is_there(path: Path) -> str:
    """What a folder without a known layout holds, for the error: empty, the folder above or a
    subfolder that holds a layout, or its first entries."""
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as e:
        return f"cannot list it ({e.strerror or e})"
    for near, where in [(path.parent, "its parent folder")] + [
        (p, f"its subfolder {p.name}/") for p in entries[:MAX_SUBFOLDERS] if p.is_dir()
    ]:
        if near != path and (layout := _folder_layout(near)) is not None:
            return f"{where} holds a {layout} data set; use that folder"
    if not entries:
        return "the folder is empty"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:MAX_LISTED]]
    more = f" and {len(entries) - MAX_LISTED} more" if len(entries) > MAX_LISTED else ""
    verb = "matches" if len(entries) == 1 else "match"
    return f"found {', '.join(names)}{more}, which {verb} no layout"


def load_dataset(path: str | Path | None = None, *, check_images: bool = True) -> CaptionDataset:
    """Read any accepted layout from ``path`` (else ``$CAPTIONING_DATA``); see ``LAYOUTS``."""
    layout, target = detect_layout(path)
    return READERS[layout](target, check_images=check_images)


def _detect_file(path: Path) -> tuple[str, Path]:
    if path.name in COCO_CAPTIONS.values() and path.parent.name == COCO_ANNOTATIONS_DIR:
        return "coco2017", path.parent.parent
    if path.name in CAPTION_FILES:
        return CAPTION_FILES[path.name], path.parent
    if path.suffix.lower() == ".json":
        return "karpathy", path  # its reader says what JSON it expected if this is not it
    raise DataError(f"{path} is not a caption file of a known layout\n  {RECOGNISED}")
