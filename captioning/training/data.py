"""What a run trains on: the vocabulary, cached features, encoded captions, and batches of them.

Batches are groups of images with all their captions, so per-image work (projecting the grid,
initialising the state) runs once per image, not once per caption. The order of the train images
in an epoch depends only on the seed and the epoch, never on the number of processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from captioning.core.machine import resolve_device, resolve_precision
from captioning.data import CaptionDataset
from captioning.data.vocab import Vocabulary, pad_batch
from captioning.models.decoders import DecoderConfig
from captioning.runtime.encoders import load_encoder
from captioning.runtime.features import FeatureCache, Features, extract
from captioning.training import finetune
from captioning.training.config import TrainConfig


@dataclass
class TrainData:
    vocab: Vocabulary
    feats: Features  # train + dev images
    train_images: list[str]
    dev_images: list[str]
    captions: dict[str, list[list[int]]]  # encoded, truncated
    dev_refs: dict[str, list[str]]
    encoder_sha256: str = ""  # of the weights that made ``feats``
    encoder_runtime: str = "torch"  # what ran the encoder that made ``feats``
    encoder_precision: str = ""  # its precision label (bf16+cl, fp32); "" = not known


def encoder_features(
    ds: CaptionDataset, cfg: TrainConfig, names: list[str], cache_root: Path | None
) -> tuple[Features, str, str, str]:
    """The frozen encoder's cached features of ``names`` (extracted first when missing):
    (features, weights sha256, runtime that made them, precision label)."""
    device = resolve_device(cfg.device)
    runtime = cfg.runtime if device == "cpu" else "torch"  # OpenVINO runs on CPUs only
    enc = load_encoder(cfg.encoder, resolve_precision(cfg.precision, device), runtime)
    cache = FeatureCache.for_encoder(enc, cache_root)
    cached = cache.cached_names()  # one manifest read, not one per image
    missing = [n for n in names if n not in cached]
    if missing:
        print(f"extracting {len(missing)} missing {cfg.encoder} features first", file=sys.stderr)
        extract(enc, [(n, ds.image_path(n)) for n in missing], cache)
    need_grid = DecoderConfig(kind=cfg.decoder).uses_grid
    feats = cache.load(names, with_grid=need_grid)
    return feats, enc.sha256, enc.runtime, enc.precision.label


def prepare_data(ds: CaptionDataset, cfg: TrainConfig, cache_root: Path | None) -> TrainData:
    """Vocabulary from train captions only; features from the cache (extracted when missing)."""
    train, dev = ds.splits["train"], ds.splits["dev"]
    vocab = Vocabulary.build((c for n in train for c in ds.captions[n]), min_freq=cfg.min_freq)
    if cfg.finetune:  # the cached inputs of the block that trains (training.finetune)
        feats, sha, label = finetune.block_input_features(ds, cfg, train + dev, cache_root)
        made_by = "torch"
    else:
        feats, sha, made_by, label = encoder_features(ds, cfg, train + dev, cache_root)
    caps: dict[str, list[list[int]]] = {}
    for n in train + dev:
        caps[n] = []
        for c in ds.captions[n]:
            ids = vocab.encode(c)  # [<start>, w1..wn, <end>]
            if len(ids) > cfg.max_words + 2:
                ids = ids[: cfg.max_words + 1] + [vocab.end_id]
            caps[n].append(ids)
    refs = {n: ds.captions[n] for n in dev}
    return TrainData(vocab, feats, train, dev, caps, refs, sha, made_by, label)


def image_feats(data: TrainData, names: list[str], uses_grid: bool) -> torch.Tensor:
    rows = data.feats.rows(names)
    src = data.feats.grid if uses_grid else data.feats.pooled
    return src.index_select(0, rows).float()  # [N, L, C] or [N, D]


def make_batch(
    data: TrainData, names: list[str], uses_grid: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of the images once, plus every caption with the index of its image:
    (feats [N, ...], owner [B], tokens [B, T]).

    Captions come longest first, so the attention decoder's teacher forcing shrinks its batch
    as captions end instead of computing padding.
    """
    pairs = [(c, i) for i, n in enumerate(names) for c in data.captions[n]]
    pairs.sort(key=lambda p: -len(p[0]))  # stable: ties keep the image order
    seqs, owner = [c for c, _ in pairs], [i for _, i in pairs]
    tokens, _ = pad_batch(seqs)  # [B, T]
    return image_feats(data, names, uses_grid), torch.tensor(owner), tokens


def epoch_order(images: list[str], seed: int, epoch: int) -> list[str]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [images[i] for i in torch.randperm(len(images), generator=g).tolist()]


def batch_counts(data: TrainData, names: list[str]) -> tuple[int, int]:
    """(next-word targets, captions) of these images: what ``caption_loss`` averages over."""
    caps = [c for n in names for c in data.captions[n]]
    return sum(len(c) - 1 for c in caps), len(caps)
