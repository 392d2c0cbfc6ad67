"""Shared fixtures: where the real Flickr8k data lives, if anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FLICKR8K = REPO_ROOT.parent / "shared" / "flickr8k"


def find_flickr8k_dir() -> Path | None:
    """``$CAPTIONING_DATA`` if it is a folder, else ``../shared/flickr8k`` from the repo root."""
    env = os.environ.get("CAPTIONING_DATA")
    for candidate in (Path(env) if env else None, SHARED_FLICKR8K):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """The real Flickr8k folder; skips the test when it is not available."""
    found = find_flickr8k_dir()
    if found is None:
        pytest.skip(f"Flickr8k not found: set CAPTIONING_DATA or provide {SHARED_FLICKR8K}")
    return found


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Synthetic Flickr8k + four tiny trained bundles (see tests/tiny_world.py)."""
    from tests.tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
