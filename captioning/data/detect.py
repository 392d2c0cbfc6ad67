"""Pick the layout of a data folder (or file) and read it: ``load_dataset`` for every consumer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioning.data.coco import load_coco
from captioning.data.dataset import FIX_HELP, CaptionDataset, DataError, resolve_data_dir
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
    layouts_help,
)

READERS: dict[str, Callable[..., CaptionDataset]] = {
    "flickr8k-official": load_flickr8k,
    "flickr8k-kaggle": load_flickr8k,
    "coco2017": load_coco,
    "karpathy": load_karpathy,
    "flickr30k-token": load_flickr30k,
    "flickr30k-kaggle": load_flickr30k,
}
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
    split file, then the Flickr8k Kaggle ``captions.txt``.
    """
    path = resolve_data_dir(path, allow_file=True)
    if path.is_file():
        return _detect_file(path)
    if (path / FLICKR8K_TOKENS).is_file():
        return "flickr8k-official", path
    if any((path / COCO_ANNOTATIONS_DIR / f).is_file() for f in COCO_CAPTIONS.values()):
        return "coco2017", path
    if (path / FLICKR30K_TOKENS).is_file():
        return "flickr30k-token", path
    if (path / FLICKR30K_KAGGLE_CSV).is_file():
        return "flickr30k-kaggle", path
    if any((path / f).is_file() for f in KARPATHY_FILES):
        return "karpathy", path
    if (path / FLICKR8K_KAGGLE_CAPTIONS).is_file():
        return "flickr8k-kaggle", path
    others = sorted(p.name for p in path.glob("*.json"))
    found = f" (found {', '.join(others[:5])}, which match none of them)" if others else ""
    raise DataError(f"no known caption layout in {path}{found}. {layouts_help()} {FIX_HELP}")


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
        return "karpathy", path  # its reader names every layout if the JSON is not Karpathy's
    raise DataError(f"{path} is not a caption file of a known layout. {layouts_help()}")
