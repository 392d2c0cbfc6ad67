"""The data set every reader returns: captions, splits, and a record of what was left out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from captioning.core.settings import DATA_ENV

SPLITS = ("train", "dev", "test")
SPLIT_SOURCES = ("official", "karpathy", "coco2017", "hash", "seeded")
FIX_HELP = f"Pass --data DIR or set the {DATA_ENV} environment variable to the data folder."
MAX_LISTED = 10


class DataError(RuntimeError):
    """Missing or unusable data directory or files; the message says what and how to fix it."""


@dataclass
class CaptionDataset:
    """Captions and train/dev/test splits of one data set, read from one layout.

    ``captions`` maps an image name to all its reference captions (every one is kept: COCO has
    5-7 per image). ``image_path(name)`` is ``images_dir / name``; COCO names carry their folder
    (``train2017/000000000009.jpg``). ``layout`` is an id of ``captioning.data.LAYOUTS``;
    ``split_source`` says where the split comes from (one of ``SPLIT_SOURCES``) and
    ``split_note`` explains it in a sentence. ``skipped`` explains every input entry left out.
    """

    root: Path
    images_dir: Path
    layout: str
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    name: str = "Flickr8k"
    split_source: str = "official"
    split_note: str = ""
    split_seed: int | None = None
    skipped: list[str] = field(default_factory=list)
    skip_counts: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_lines(self) -> int:
        """Total caption entries (lines or JSON captions) left out, over all reasons."""
        return sum(self.skip_counts.values())

    def image_path(self, name: str) -> Path:
        return self.images_dir / name

    def split_captions(self, split: str) -> dict[str, list[str]]:
        """Image name → captions for the images of ``split`` ("train", "dev" or "test")."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        return {name: self.captions[name] for name in self.splits[split]}

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.splits.get(s, [])) for s in SPLITS}

    def describe(self) -> str:
        """One line for a model card: data set, layout and split."""
        sizes = " / ".join(f"{n} {s}" for s, n in self.split_sizes().items())
        return f"{self.name} ({self.layout} layout), {self.split_note} ({sizes} images)"

    def summary(self) -> str:
        n_captions = sum(len(c) for c in self.captions.values())
        per_image = sorted({len(c) for c in self.captions.values()}) or [0]
        refs = str(per_image[0]) if len(per_image) == 1 else f"{per_image[0]}-{per_image[-1]}"
        sizes = ", ".join(f"{s} {n}" for s, n in self.split_sizes().items())
        reasons = ", ".join(f"{n} {why}" for why, n in self.skip_counts.items() if n) or "none"
        lines = [
            f"{self.name} ({self.layout} layout) at {self.root}",
            f"  images:   {self.images_dir}",
            f"  captions: {n_captions} for {len(self.captions)} images ({refs} per image)",
            f"  splits:   {sizes} ({self.split_note}; split source: {self.split_source})",
            f"  skipped lines: {self.skipped_lines} ({reasons})",
        ]
        lines += [f"    - {report}" for report in self.skipped[:MAX_LISTED]]
        if len(self.skipped) > MAX_LISTED:
            lines.append(f"    ... and {len(self.skipped) - MAX_LISTED} more reports")
        return "\n".join(lines)


def resolve_data_dir(arg: str | Path | None, *, allow_file: bool = False) -> Path:
    """The data folder: ``arg`` if given, else ``$CAPTIONING_DATA``; it must exist.

    With ``allow_file`` a file (a Karpathy split JSON) is accepted as well.
    """
    if arg is not None and str(arg) != "":
        path, source = Path(arg).expanduser(), "--data"
    elif os.environ.get(DATA_ENV):
        path, source = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        raise DataError(f"no data directory given. {FIX_HELP}")
    fix = f" {FIX_HELP}" if source != "--data" else ""  # a given --data needs no reminder of it
    if not path.exists():
        raise DataError(f"data directory {path} (from {source}) does not exist.{fix}")
    if not path.is_dir() and not (allow_file and path.is_file()):
        raise DataError(f"data directory {path} (from {source}) is not a directory.{fix}")
    return path
