"""Every data layout the readers accept: its files, where its images live, and its split.

The readers import their file names from here, so each name is defined once and every error
message can list the layouts that were expected.
"""

from __future__ import annotations

from dataclasses import dataclass

# Flickr8k (official release)
FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR8K_IMAGE_DIRS = ("Images", "Flicker8k_Dataset")
# Flickr8k (Kaggle copy)
FLICKR8K_KAGGLE_CAPTIONS = "captions.txt"
FLICKR8K_KAGGLE_IMAGE_DIRS = ("Images",)
# COCO 2017
COCO_ANNOTATIONS_DIR = "annotations"
COCO_CAPTIONS = {"train": "captions_train2017.json", "val": "captions_val2017.json"}
COCO_IMAGE_DIRS = {"train": "train2017", "val": "val2017"}
# Karpathy split files: file name -> the data set it describes
KARPATHY_FILES = {
    "dataset_coco.json": "coco",
    "dataset_flickr8k.json": "flickr8k",
    "dataset_flickr30k.json": "flickr30k",
}
# Flickr30k (official release and Kaggle copy)
FLICKR30K_TOKENS = "results_20130124.token"
FLICKR30K_KAGGLE_CSV = "results.csv"
FLICKR30K_IMAGE_DIRS = ("flickr30k-images", "flickr30k_images", "Images")


@dataclass(frozen=True)
class Layout:
    """One accepted layout: an id (``CaptionDataset.layout``), its data set and files."""

    id: str
    dataset: str
    files: str


def _dirs(names: tuple[str, ...]) -> str:
    return " or ".join(f"{n}/" for n in names)


LAYOUTS = {
    layout.id: layout
    for layout in (
        Layout(
            "flickr8k-official",
            "Flickr8k",
            f"{FLICKR8K_TOKENS}, {', '.join(FLICKR8K_SPLIT_FILES.values())}, images in "
            f"{_dirs(FLICKR8K_IMAGE_DIRS)}",
        ),
        Layout(
            "flickr8k-kaggle",
            "Flickr8k",
            f"{FLICKR8K_KAGGLE_CAPTIONS} (CSV with header 'image,caption'), images in "
            f"{_dirs(FLICKR8K_KAGGLE_IMAGE_DIRS)}",
        ),
        Layout(
            "coco2017",
            "COCO 2017",
            f"{COCO_ANNOTATIONS_DIR}/{COCO_CAPTIONS['train']} and "
            f"{COCO_ANNOTATIONS_DIR}/{COCO_CAPTIONS['val']}, images in "
            f"{COCO_IMAGE_DIRS['train']}/ and {COCO_IMAGE_DIRS['val']}/",
        ),
        Layout(
            "karpathy",
            "COCO, Flickr8k or Flickr30k",
            f"one of {', '.join(KARPATHY_FILES)} (images[].split, filename, filepath, "
            "sentences[].raw or tokens), images under FILEPATH/ (COCO) or in the data set's "
            "usual image folder",
        ),
        Layout(
            "flickr30k-token",
            "Flickr30k",
            f"{FLICKR30K_TOKENS} (IMAGE#N<tab>caption), images in {_dirs(FLICKR30K_IMAGE_DIRS)}",
        ),
        Layout(
            "flickr30k-kaggle",
            "Flickr30k",
            f"{FLICKR30K_KAGGLE_CSV} ('image_name| comment_number| comment'), images in "
            f"{_dirs(FLICKR30K_IMAGE_DIRS)}",
        ),
    )
}


def layouts_help(*ids: str) -> str:
    """``Accepted layouts: ID (files); ...`` for ``ids`` (default: every layout)."""
    chosen = [LAYOUTS[i] for i in ids] if ids else list(LAYOUTS.values())
    return "Accepted layouts: " + "; ".join(f"{lay.id} ({lay.files})" for lay in chosen) + "."
