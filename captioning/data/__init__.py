"""Caption data sets: one reader per layout, and ``load_dataset`` that detects which.

Layouts: Flickr8k (official, Kaggle), COCO 2017, Karpathy split files (COCO, Flickr8k,
Flickr30k) and Flickr30k (token file, Kaggle CSV); see ``LAYOUTS``. Every reader returns a
``CaptionDataset`` with ``layout`` and ``split_source`` set.
"""

from captioning.data.coco import load_coco
from captioning.data.dataset import (
    DATA_ENV,
    FIX_HELP,
    SPLIT_SOURCES,
    SPLITS,
    CaptionDataset,
    DataError,
    resolve_data_dir,
)
from captioning.data.detect import detect_layout, load_dataset
from captioning.data.flickr8k import load_flickr8k
from captioning.data.flickr30k import load_flickr30k
from captioning.data.karpathy import load_karpathy
from captioning.data.layouts import LAYOUTS, layouts_help

__all__ = [
    "DATA_ENV",
    "FIX_HELP",
    "LAYOUTS",
    "SPLITS",
    "SPLIT_SOURCES",
    "CaptionDataset",
    "DataError",
    "detect_layout",
    "layouts_help",
    "load_coco",
    "load_dataset",
    "load_flickr8k",
    "load_flickr30k",
    "load_karpathy",
    "resolve_data_dir",
]
