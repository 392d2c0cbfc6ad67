"""TODO docstring (encoders, features, runtime, bundle)."""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "artifacts"
SAMPLES_DIR = ARTIFACTS_DIR / "samples"
ENCODER_DIR = ARTIFACTS_DIR / "encoders"

CACHE_ENV = "CAPTIONING_CACHE"


def default_cache_dir() -> Path:
    """``$CAPTIONING_CACHE``, else ``$XDG_CACHE_HOME/captioning``, else ``~/.cache/captioning``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioning"


OV_DIR = "openvino"  # under the captioning cache root
OV_CACHE_ENV = "CAPTIONING_OV_CACHE"  # overrides <cache>/openvino (e.g. one per test session)


def openvino_cache_dir(cache_root: Path | None = None) -> Path:
    """``<cache_root>/openvino``; without a root ``$CAPTIONING_OV_CACHE``, else the feature
    cache's root (``$CAPTIONING_CACHE`` or ``~/.cache/captioning``), never the repository."""

    if cache_root is None and os.environ.get(OV_CACHE_ENV):
        return Path(os.environ[OV_CACHE_ENV]).expanduser()
    return Path(cache_root or default_cache_dir()) / OV_DIR


MODELS_DIR = ARTIFACTS_DIR / "models"
MODELS_ENV = "CAPTIONING_MODELS"  # overrides MODELS_DIR (e.g. for tests and the dashboard)


# ---------------------------------------------------------------- reading


def models_dir_default() -> Path:
    """``$CAPTIONING_MODELS`` if set, else ``artifacts/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else MODELS_DIR
