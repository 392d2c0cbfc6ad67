"""Finding bundles: by name in the models folder or by path, and listing the complete ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from captioning.bundle.format import BundleError, read_config
from captioning.bundle.records import read_records
from captioning.core.paths import models_dir_default


def resolve_bundle(name_or_path: str | Path, models_dir: Path | None = None) -> Path:
    models_dir = models_dir or models_dir_default()
    p = Path(name_or_path)
    if p.is_dir():
        return p
    cand = models_dir / str(name_or_path)
    if cand.is_dir():
        return cand
    names = [b.name for b in list_bundles(models_dir)]
    raise BundleError(
        f"no model bundle {str(name_or_path)!r} (looked for a directory and in "
        f"{models_dir}); available: {', '.join(names) or 'none'}"
    )


@dataclass
class BundleInfo:
    name: str
    path: Path
    encoder: str
    decoder: str
    config: dict
    records: list[dict] = field(default_factory=list)  # see ``read_records``


def list_bundles(models_dir: Path | None = None) -> list[BundleInfo]:
    """Every complete bundle under ``models_dir`` (default ``artifacts/models``), sorted."""
    root = models_dir or models_dir_default()
    out = []
    for d in sorted(root.glob("*/")) if root.is_dir() else []:
        try:
            cfg = read_config(d)
        except BundleError:
            continue
        try:
            records = read_records(d)
        except BundleError:  # unreadable metrics.json: still a usable model
            records = []
        out.append(BundleInfo(d.name, d, cfg["encoder"], cfg["decoder"], cfg, records))
    return out
