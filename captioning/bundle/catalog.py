"""Finding bundles: by name in the models folder or by path, and listing the complete ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captioning.bundle.format import BundleError, read_config
from captioning.bundle.records import read_records
from captioning.core.paths import models_dir_default


def find_bundle(name_or_path: str | Path, models_dir: Path | None = None) -> Path | None:
    """The directory of a bundle given by path or by name in ``models_dir`` (default
    ``artifacts/models``); None when neither is a directory."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    cand = (models_dir or models_dir_default()) / str(name_or_path)
    return cand if cand.is_dir() else None


def resolve_bundle(name_or_path: str | Path, models_dir: Path | None = None) -> Path:
    """The directory of a bundle given by path or by name in ``models_dir``; BundleError naming
    it and the bundles there otherwise."""
    return resolve_bundles([name_or_path], models_dir)[0]


def resolve_bundles(names: Sequence[str | Path], models_dir: Path | None = None) -> list[Path]:
    """The directory of each bundle of ``names`` (paths, or names in ``models_dir``); one
    BundleError naming every one that is missing and the bundles ``models_dir`` has."""
    models_dir = models_dir or models_dir_default()
    found = [find_bundle(n, models_dir) for n in names]
    missing = [str(n) for n, p in zip(names, found, strict=True) if p is None]
    if missing:
        have = ", ".join(b.name for b in list_bundles(models_dir)) or "none"
        quoted = ", ".join(repr(m) for m in missing)
        what = f"bundle {quoted}" if len(missing) == 1 else f"bundles {quoted}"
        where = "a directory" if len(missing) == 1 else "directories"
        raise BundleError(
            f"no model {what} (looked for {where} and in {models_dir}); available: {have}"
        )
    return [p for p in found if p is not None]


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
