"""Feature cache: pooled and grid features of every image, fp16, resumable, keyed by weights.

Layout: ``<cache>/<encoder>-<sha12>-<label>/`` (label: the precision, e.g. ``bf16+cl``, plus the
runtime when it is not torch, e.g. ``bf16-openvino``) holds ``manifest.json`` and shards
``shard-00000.safetensors`` (``pooled`` [n, D], ``grid`` [n, HW, C], image names in metadata).
Each shard and then the manifest are written atomically, so a killed run resumes where it stopped.
A cache whose recorded weights sha256 differs from the encoder's is refused, never read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from captioning.core.files import atomic_save_safetensors, atomic_write_json, read_json
from captioning.core.paths import default_cache_dir
from captioning.models.encoders import LoadedEncoder
from captioning.runtime.pixels import load_pixels, prefetch

FORMAT = "captioning-features"
PREPROCESS = "resize224"  # encoders.preprocess(mode="features")


def cache_key(encoder: LoadedEncoder) -> str:
    return f"{encoder.spec.name}-{encoder.sha256[:12]}-{encoder.label}"


class StaleCacheError(RuntimeError):
    """The cache was made with other weights or settings than the encoder in use."""


@dataclass
class Features:
    """Features of a set of images: rows of ``pooled`` [N, D] and ``grid`` [N, HW, C] (fp16)."""

    names: list[str]
    pooled: torch.Tensor  # [N, D] fp16
    grid: torch.Tensor  # [N, HW, C] fp16
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if n not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} images have no cached features, e.g. {missing[:3]}")
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)


@dataclass
class FeatureCache:
    """One encoder's cache directory."""

    directory: Path
    encoder_name: str
    weights_sha256: str
    precision: str

    @classmethod
    def for_encoder(cls, encoder: LoadedEncoder, root: Path | None = None) -> FeatureCache:
        root = Path(root) if root else default_cache_dir()
        return cls(root / cache_key(encoder), encoder.spec.name, encoder.sha256, encoder.label)

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {
                "format": FORMAT,
                "encoder": self.encoder_name,
                "shards": [],
                "weights_sha256": self.weights_sha256,
                "precision": self.precision,
                "preprocess": PREPROCESS,
                "failed": {},
            }
        m = read_json(self.manifest_path)
        want = (FORMAT, self.encoder_name, self.weights_sha256, self.precision, PREPROCESS)
        got = tuple(
            m.get(k) for k in ("format", "encoder", "weights_sha256", "precision", "preprocess")
        )
        if got != want:
            raise StaleCacheError(
                f"feature cache {self.directory} was made with {got}, not {want}; "
                "delete it or choose another --cache"
            )
        return m

    def cached_names(self) -> set[str]:
        return {n for s in self.manifest()["shards"] for n in s["images"]}

    def load(self, names: Sequence[str] | None = None, *, with_grid: bool = True) -> Features:
        """Read cached features (all, or just ``names``); ``with_grid=False`` skips grids."""
        m = self.manifest()
        want = set(names) if names is not None else None
        out_names, pooled, grid = [], [], []
        for shard in m["shards"]:
            imgs = shard["images"]
            keep = [i for i, n in enumerate(imgs) if want is None or n in want]
            if not keep:
                continue
            with safe_open(str(self.directory / shard["file"]), "pt") as f:
                p = f.get_tensor("pooled")
                g = (
                    f.get_tensor("grid")
                    if with_grid
                    else torch.empty(len(imgs), 0, 0, dtype=p.dtype)
                )
            if len(keep) < len(imgs):
                idx = torch.tensor(keep)
                p, g = p[idx], g[idx]
            out_names += [imgs[i] for i in keep]
            pooled.append(p)
            grid.append(g)
        if want is not None and len(out_names) < len(want):
            missing = sorted(want - set(out_names))
            raise KeyError(
                f"{len(missing)} images are not in the feature cache {self.directory}, e.g. "
                f"{missing[:3]}; run `python -m captioning extract` first"
            )
        if not out_names:
            raise KeyError(f"the feature cache {self.directory} is empty")
        return Features(out_names, torch.cat(pooled), torch.cat(grid))


@dataclass
class ExtractReport:
    directory: Path
    new_images: int
    total_images: int
    failed: dict[str, str]
    seconds: float
    bytes_on_disk: int

    @property
    def images_per_s(self) -> float:
        return self.new_images / self.seconds if self.seconds > 0 else float("nan")


def extract(
    encoder: LoadedEncoder,
    images: Sequence[tuple[str, Path]],
    cache: FeatureCache,
    *,
    batch_size: int = 32,
    shard_size: int = 256,
    progress: bool = True,
) -> ExtractReport:
    """Encode every (name, path) not yet cached; resumable at shard granularity.

    Images that failed before are tried again (the file may have been fixed since); the
    manifest's ``failed`` lists only the images whose latest attempt failed.
    """
    m = cache.manifest()
    failed = m.setdefault("failed", {})
    done = {n for s in m["shards"] for n in s["images"]}
    todo = [(n, p) for n, p in images if n not in done]
    cache.directory.mkdir(parents=True, exist_ok=True)
    start, n_done = time.perf_counter(), 0
    bar = tqdm(
        total=len(images),
        initial=len(images) - len(todo),
        unit="img",
        desc=f"extract {cache_key_label(cache)}",
        disable=not progress,
    )
    names, pooled, grid, in_shard = [], [], [], 0

    def flush() -> None:  # one shard (about shard_size images), then the manifest
        if names:
            fname = f"shard-{len(m['shards']):05d}.safetensors"
            atomic_save_safetensors(
                cache.directory / fname,
                {"pooled": torch.cat(pooled), "grid": torch.cat(grid)},
                metadata={"images": json.dumps(names)},
            )
            m["shards"].append({"file": fname, "images": list(names)})
            for name in names:
                failed.pop(name, None)
        atomic_write_json(cache.manifest_path, m)
        names.clear()
        pooled.clear()
        grid.clear()

    # threads decode the next batches while this one is encoded (captioning.runtime.pixels)
    for batch in prefetch(todo, batch_size, load=lambda item: load_pixels(item[1])):
        for i, err in batch.errors.items():
            failed[batch.sources[i][0]] = str(err)
            tqdm.write(f"skipped {batch.sources[i][0]}: {err}")
        if batch.pixels is not None:
            out = encoder.encode(batch.pixels)  # pooled [b,D], grid [b,HW,C]
            names.extend(n for n, _ in batch.loaded)
            pooled.append(out.pooled.half())
            grid.append(out.grid.half())
        in_shard += len(batch)
        n_done += len(batch)
        bar.update(len(batch))
        bar.set_postfix(img_s=f"{n_done / (time.perf_counter() - start):.1f}")
        if in_shard >= shard_size:
            flush()
            in_shard = 0
    if in_shard:
        flush()
    bar.close()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache.directory.glob("*.safetensors"))
    total = sum(len(s["images"]) for s in m["shards"])
    return ExtractReport(cache.directory, len(todo), total, failed, seconds, size)


def cache_key_label(cache: FeatureCache) -> str:
    return f"{cache.encoder_name}/{cache.precision}"
