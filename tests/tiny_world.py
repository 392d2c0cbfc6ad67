"""A tiny but complete world for UI and CLI tests: synthetic Flickr8k + four real bundles.

The bundles are real (trained here for a few seconds on real ResNet50/VGG16 features of the
synthetic pictures, evaluated on dev and test), so pages and commands run the same code paths as
with the shipped models. Build it with ``python -m tests.tiny_world DIR``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from captioning.data import load_flickr8k
from captioning.inference.captioner import Captioner
from captioning.inference.evaluate import evaluate, save_evaluation
from captioning.training.train import TrainConfig, main
from tests.synthetic import make_tiny_flickr

NAMES = ("resnet50-inject", "resnet50-attention", "vgg16-inject", "vgg16-attention")


@dataclass
class TinyWorld:
    data: Path
    models: Path
    cache: Path


def build_tiny_world(root: Path) -> TinyWorld:
    data = make_tiny_flickr(root / "flickr8k")
    models, cache = root / "models", root / "cache"
    small = {"embed_dim": 32, "hidden_dim": 64, "attn_dim": 32, "dropout": 0.1}
    ds = load_flickr8k(data)
    for name in NAMES:
        encoder, decoder = name.split("-")
        cfg = TrainConfig(
            encoder=encoder,
            decoder=decoder,
            epochs=2,
            batch_images=8,
            lr=3e-3,
            warmup_steps=2,
            min_freq=1,
            precision="fp32",
            decoder_cfg=small,
            checkpoint_minutes=100.0,
        )
        out = models / name
        main(cfg, str(data), out, cache, resume=False)
        cap = Captioner.load(out, precision="fp32", runtime="torch")
        for split in ("dev", "test"):
            ev = evaluate(cap, ds, split, 3, cache_root=cache, meteor=False)
            save_evaluation(ev, out)  # into the bundle, like `evaluate --record`
    return TinyWorld(data, models, cache)


if __name__ == "__main__":
    w = build_tiny_world(Path(sys.argv[1]))
    print(f"CAPTIONING_DATA={w.data} CAPTIONING_MODELS={w.models} CAPTIONING_CACHE={w.cache}")
