"""Image captioning on Flickr8k: ``from captioning import Captioner``.

Imports are lazy (module ``__getattr__``) so that ``import captioning`` and
``python -m captioning --help`` do not load torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("captioning")  # one home: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = [
    "Captioner",
    "CaptionResult",
    "BundleError",
    "list_bundles",
    "load_bundle",
    "__version__",
]

if TYPE_CHECKING:
    from captioning.bundle.catalog import list_bundles
    from captioning.bundle.format import BundleError
    from captioning.inference.captioner import Captioner, CaptionResult

_LAZY = {
    "Captioner": "captioning.inference.captioner",
    "CaptionResult": "captioning.inference.captioner",
    "BundleError": "captioning.bundle.format",
    "list_bundles": "captioning.bundle.catalog",
}


def load_bundle(name_or_path, precision: str = "auto"):
    """``Captioner.load(name_or_path, precision)``: a bundle name in artifacts/models or a path."""
    from captioning.inference.captioner import Captioner

    return Captioner.load(name_or_path, precision)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'captioning' has no attribute {name!r}")
