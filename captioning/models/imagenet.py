"""ImageNet-1k class names, from torchvision's bundled metadata (no download)."""

from __future__ import annotations

from torchvision.models import ResNet50_Weights


def imagenet_labels() -> list[str]:
    """The 1000 class names in the standard index order (the order Keras and Caffe use too)."""
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
