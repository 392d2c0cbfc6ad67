"""Every environment variable the project reads, in one place.

| variable | what it sets | default |
|---|---|---|
| ``CAPTIONING_DATA`` | the data set folder (or a Karpathy split file) | none: ``--data`` |
| ``CAPTIONING_MODELS`` | the folder of model bundles | ``artifacts/models`` |
| ``CAPTIONING_CACHE`` | the feature cache and compiled models | ``$XDG_CACHE_HOME/captioning`` |
| ``CAPTIONING_OV_CACHE`` | compiled OpenVINO models alone | ``<cache>/openvino`` |
| ``CAPTIONING_DEBUG`` | the CLI prints a traceback instead of a one-line error | off |
"""

from __future__ import annotations

import os

DATA_ENV = "CAPTIONING_DATA"
MODELS_ENV = "CAPTIONING_MODELS"
CACHE_ENV = "CAPTIONING_CACHE"
OV_CACHE_ENV = "CAPTIONING_OV_CACHE"
DEBUG_ENV = "CAPTIONING_DEBUG"


def setting(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    return os.environ.get(name) or None


def debug() -> bool:
    """Whether ``CAPTIONING_DEBUG`` asks for tracebacks."""
    return setting(DEBUG_ENV) is not None
