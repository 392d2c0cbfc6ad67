"""A bundle on every Ray node: its digest, its files, and the copy a node unpacks when it does
not hold the driver's bundle at the same path."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from captioning.bundle.format import CAPTION_FILES, is_ensemble, read_config
from captioning.core.files import sha256_file

SHIPPED_DIR = "captioning-bundles"  # under a node's temp dir: bundles the driver shipped


def bundle_sha256(bundle: Path) -> str:
    """One digest of the files that decide a bundle's captions (``CAPTION_FILES``).

    A fine-tuned bundle's block file counts as its decoder does. An ensemble has no weights of
    its own: its config holds its members' sha256, which loading checks.
    """
    h = hashlib.sha256()
    for name in CAPTION_FILES:
        if (bundle / name).exists():
            h.update(f"{name}:{sha256_file(bundle / name)}\n".encode())
    return h.hexdigest()


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """The bytes of the files that decide a bundle's captions, keyed ``NAME/FILE``.

    An ensemble's members sit beside it (``MEMBER/FILE``), as ``Captioner.load`` looks for them.
    """
    dirs = [bundle]
    cfg = read_config(bundle)
    if is_ensemble(cfg):
        dirs += [bundle.parent / m["name"] for m in cfg["members"]]
    return {
        f"{d.name}/{name}": (d / name).read_bytes()
        for d in dirs
        for name in CAPTION_FILES
        if (d / name).is_file()
    }


def local_bundle(bundle: str, sha256: str, shipped: list | None = None) -> Path:
    """The bundle with digest ``sha256`` on this node: ``bundle`` itself when this node holds
    the same files there, else a copy of the files the driver shipped (``[ObjectRef]`` of
    ``bundle_files``), unpacked once per node under ``$TMPDIR/captioning-bundles/``."""
    here = Path(bundle)
    if here.is_dir() and bundle_sha256(here) == sha256:
        return here
    root = Path(tempfile.gettempdir(), SHIPPED_DIR)
    copy = root / sha256[:16] / here.name
    if not copy.is_dir():
        if not shipped:
            state = "differs from the driver's bundle" if here.exists() else "is missing"
            raise RuntimeError(f"{bundle} on this node {state} (sha256 {sha256[:12]}…)")
        import ray

        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
        for rel, data in ray.get(shipped[0]).items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(data)
        try:
            stage.rename(copy.parent)  # atomic: actors of one node may unpack at once
        except OSError:  # another actor's copy is in place
            shutil.rmtree(stage, ignore_errors=True)
    if bundle_sha256(copy) != sha256:
        raise RuntimeError(f"{copy} differs from the driver's bundle (sha256 {sha256[:12]}…)")
    return copy
