"""Shared fixtures: where the real Flickr8k data lives, if anywhere; a private feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FLICKR8K = REPO_ROOT.parent / "shared" / "flickr8k"
CACHE_ENV = "CAPTIONING_CACHE"
# A cache the caller chose on purpose (CI sets a temp dir; a developer may point at the real
# Flickr8k features): tests on real Flickr8k use it, so they do not extract 8k images again.
CALLER_CACHE = os.environ.get(CACHE_ENV)


def find_flickr8k_dir() -> Path | None:
    """``$CAPTIONING_DATA`` if it is a folder, else ``../shared/flickr8k`` from the repo root."""
    env = os.environ.get("CAPTIONING_DATA")
    for candidate in (Path(env) if env else None, SHARED_FLICKR8K):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs); for a module, use
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_restored():
    """A test that hands the cores to OpenVINO (``dedicate_cores``) leaves no trace: torch's
    threads and the threads models compile with are restored after each test."""
    import torch

    from captioning.runtime import openvino

    before, kept = torch.get_num_threads(), openvino._THREADS
    yield
    torch.set_num_threads(before)
    openvino._THREADS = kept


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


@pytest.fixture(scope="session", autouse=True)
def _session_feature_cache(tmp_path_factory):
    """Session and module fixtures that extract features write to a temp dir too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("session-feature-cache")))
        # compiled OpenVINO models (keyed by weights sha256): converted once per session
        mp.setenv("CAPTIONING_OV_CACHE", str(tmp_path_factory.mktemp("session-openvino")))
        yield


@pytest.fixture(autouse=True)
def _private_feature_cache(request, monkeypatch, tmp_path_factory):
    """No test writes into ``~/.cache``: ``$CAPTIONING_CACHE`` is a fresh temp dir per test.

    Tests that use the real Flickr8k (the ``flickr8k_dir`` fixture) keep the caller's
    ``$CAPTIONING_CACHE`` when one was set, since it holds real Flickr8k features only. A test
    may still set its own with ``monkeypatch.setenv``.
    """
    if CALLER_CACHE and "flickr8k_dir" in request.fixturenames:
        monkeypatch.setenv(CACHE_ENV, CALLER_CACHE)
    else:
        monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("feature-cache")))
