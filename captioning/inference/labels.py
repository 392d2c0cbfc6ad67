"""A second opinion beside a caption: the encoder's own ImageNet classifier, its top-K labels.

The caption comes from a decoder trained on Flickr8k; the labels come from the ImageNet head the
encoder's weights were trained with (ResNet50's carry one; VGG16's converted weights hold the
convolutional layers only). They are the classifier's opinion, not the captioner's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from captioning.data.images import load_image
from captioning.models.encoders import get_spec, preprocess

MAX_LABELS = 20


@dataclass
class ClassifierLabels:
    """The top-K ImageNet labels of one image, or why an encoder cannot give them."""

    encoder: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (label, probability), best first
    unavailable: str | None = None

    @property
    def source(self) -> str:
        return f"{self.encoder} ImageNet classifier"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "top": [{"label": lb, "prob": round(p, 4)} for lb, p in self.top],
            "unavailable": self.unavailable,
        }


def check_k(k: int) -> int:
    """``k`` if it is a usable number of labels (1..MAX_LABELS), else ValueError."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_LABELS:
        raise ValueError(f"labels must be an integer 1..{MAX_LABELS}, got {k!r}")
    return k


def bundle_encoders(path, config: dict) -> list[str]:
    """The encoders a bundle's captions come from: its own, or each ensemble member's."""
    from captioning.bundle.format import is_ensemble, read_config

    if not is_ensemble(config):
        return [config["encoder"]]
    return [read_config(path.parent / m["name"])["encoder"] for m in config["members"]]


def has_classifier(encoder: str) -> bool:
    return get_spec(encoder).has_classifier


@functools.lru_cache(maxsize=2)
def _classifier(encoder: str):
    from captioning.runtime.encoders import shared_encoder

    return shared_encoder(encoder, "auto", "torch")


@functools.lru_cache(maxsize=1)
def _names() -> list[str]:
    from captioning.models.imagenet import imagenet_labels

    return imagenet_labels()


def classifier_labels(encoders: list[str], image, k: int) -> ClassifierLabels:
    """The top-``k`` labels of ``image`` (PIL, path or bytes) from the first of ``encoders``
    whose weights carry an ImageNet head; ``unavailable`` says why when none does.
    Raises ImageLoadError for an unusable image."""
    check_k(k)
    usable = [e for e in encoders if has_classifier(e)]
    if not usable:
        names = " and ".join(dict.fromkeys(encoders))
        return ClassifierLabels(
            names,
            unavailable=f"{names} weights carry no ImageNet classifier head, so there are no "
            "labels to show",
        )
    x = preprocess(load_image(image), "classify")[None]  # [1, 3, 224, 224]
    probs = _classifier(usable[0]).classify(x)[0].float()  # [1000]
    top = probs.topk(k)
    names = _names()
    rows = [(names[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    return ClassifierLabels(usable[0], rows)
