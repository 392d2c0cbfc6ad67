"""Where things live: the shipped artifacts, the model bundles and the caches."""

from __future__ import annotations

from pathlib import Path

from captioning.core.settings import CACHE_ENV, MODELS_ENV, OV_CACHE_ENV, setting

ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "artifacts"
SAMPLES_DIR = ARTIFACTS_DIR / "samples"  # the shipped sample photos
ENCODER_DIR = ARTIFACTS_DIR / "encoders"  # the shipped encoder weights
MODELS_DIR = ARTIFACTS_DIR / "models"  # the shipped bundles
OV_DIR = "openvino"  # compiled models, under the cache root


def models_dir_default() -> Path:
    """``$CAPTIONING_MODELS`` if set, else ``artifacts/models``."""
    env = setting(MODELS_ENV)
    return Path(env) if env else MODELS_DIR


def default_cache_dir() -> Path:
    """``$CAPTIONING_CACHE``, else ``$XDG_CACHE_HOME/captioning``, else ``~/.cache/captioning``."""
    if env := setting(CACHE_ENV):
        return Path(env).expanduser()
    base = setting("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioning"


def openvino_cache_dir(cache_root: Path | None = None) -> Path:
    """``<cache_root>/openvino``; without a root ``$CAPTIONING_OV_CACHE``, else the feature
    cache's root (``$CAPTIONING_CACHE`` or ``~/.cache/captioning``), never the repository."""
    if cache_root is None and (env := setting(OV_CACHE_ENV)):
        return Path(env).expanduser()
    return Path(cache_root or default_cache_dir()) / OV_DIR
