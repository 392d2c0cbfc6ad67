"""Fine-tuning the encoder's last block together with the decoder, on cached inputs of that block.

``train --finetune layer4`` (ResNet50) or ``--finetune block5`` (VGG16). The encoder is split at
the block: the frozen trunk before it (the *stem*) runs once per image, at extraction, and its
output is cached like any other features (``<encoder>-<sha12>-<precision>-layer3``, 14x14x1024
fp16 for ResNet50; ``...-pool4``, 14x14x512 for VGG16), so an epoch runs only the block and the
decoder. The block trains at its own, lower learning rate (``finetune_lr``, default ``lr / 10``)
with its BatchNorm layers in eval mode: running statistics stay frozen, while the conv weights and
the BN affine weights train (as detection and captioning fine-tuning recipes do).

A fine-tuned bundle ships the block as ``encoder_block.safetensors`` (fp16; BN running statistics
fp32, as the shipped encoders) with its sha256 in ``config.json`` under ``encoder_block``.
``tuned_encoder`` builds what captions with it: the shared encoder's trunk (the same modules, not
a copy) followed by a copy of the block with the tuned weights, so the shared encoder stays
untouched for every other bundle. The tuned encoder has its own identity (``sha256`` of the base
weights' and the block's sha256), so its feature caches and compiled models never mix with the
frozen encoder's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from captioning.bundle.format import BLOCK_FILE, bundle_block_state
from captioning.core.files import atomic_save_safetensors, sha256_file
from captioning.core.machine import resolve_device, resolve_precision
from captioning.models.blocks import (
    BlockInputEncoder,
    BlockSpec,
    block_input_encoder,
    block_spec,
    load_block_weights,
)
from captioning.models.decoders import Decoder, DecoderConfig, build_decoder
from captioning.models.encoders import build_encoder, get_spec, weights_sha256
from captioning.runtime.features import FeatureCache, Features, extract

FINETUNE_LR_SHARE = 0.1  # the block's peak LR when ``finetune_lr`` is 0: lr * this


def block_lr(cfg) -> float:
    """The block's peak learning rate: ``cfg.finetune_lr``, or ``cfg.lr * FINETUNE_LR_SHARE``."""
    return cfg.finetune_lr or cfg.lr * FINETUNE_LR_SHARE


def block_input_features(
    ds, cfg, names: Sequence[str], cache_root: Path | None
) -> tuple[Features, str, str]:
    """The cached block inputs of ``names`` (extracted first when missing), the weights' sha and
    the precision label of the trunk that made them.

    Both ``pooled`` and ``grid`` of the result are the block inputs [N, HW, C]: whichever the
    training loop reads, ``FinetuneModel`` turns it into the decoder's features.
    """
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    spec = block_spec(cfg.encoder, cfg.finetune)
    try:  # the cache's key needs only the weights' hash: build the trunk only to extract
        sha = weights_sha256(cfg.encoder)
        enc = BlockInputEncoder(None, get_spec(cfg.encoder), sha, precision, block=spec)
    except FileNotFoundError:  # torchvision weights not downloaded yet: building fetches them
        enc = block_input_encoder(cfg.encoder, cfg.finetune, precision)
    cache = FeatureCache.for_encoder(enc, cache_root)
    cached = cache.cached_names()
    missing = [n for n in names if n not in cached]
    if missing:
        if enc.model is None:
            enc = block_input_encoder(cfg.encoder, cfg.finetune, precision)
            if enc.sha256 != cache.weights_sha256:
                raise RuntimeError(f"the {cfg.encoder} weights changed while loading")
        what = f"{cfg.encoder} {enc.label} inputs of {cfg.finetune}"
        print(f"extracting {len(missing)} missing {what} first", file=sys.stderr)
        extract(enc, [(n, ds.image_path(n)) for n in missing], cache)
    feats = cache.load(names, with_grid=True)
    return Features(feats.names, feats.grid, feats.grid), enc.sha256, enc.precision.label


# ---------------------------------------------------------------- training


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class FinetuneModel(nn.Module):
    """The tuned block followed by the decoder, with the decoder's interface.

    ``context(inputs)`` takes cached block inputs [N, HW, C_in] (either cache tensor), runs the
    block and hands its grid [N, HW', C] (attention) or pooled mean [N, C] to the decoder;
    ``init_state``, ``step``, ``forward`` and ``select`` are the decoder's. So training, dev
    evaluation and decoding use it exactly as a decoder. ``train()`` keeps BatchNorm in eval.
    """

    def __init__(self, block: nn.Module, decoder: Decoder, spec: BlockSpec) -> None:
        super().__init__()
        self.block, self.decoder, self.spec = block, decoder, spec
        self.cfg: DecoderConfig = decoder.cfg
        self.train()

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        for m in self.block.modules():
            if is_batchnorm(m):
                m.eval()  # frozen running statistics; its weight and bias still train
        return self

    def block_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [N, HW, C_in] -> the decoder's features: grid [N, HW', C] or pooled [N, C]."""
        side = self.spec.input_side
        x = inputs.transpose(1, 2).unflatten(2, (side, side))  # [N, C_in, h, w], NHWC strides
        grid = self.block(x).float().flatten(2).transpose(1, 2)  # [N, HW', C]
        return grid if self.cfg.uses_grid else grid.mean(1)

    def context(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.context(self.block_features(inputs))

    def init_state(self, ctx):
        return self.decoder.init_state(ctx)

    def step(self, ctx, state, word):
        return self.decoder.step(ctx, state, word)

    def forward(self, ctx, tokens):
        return self.decoder(ctx, tokens)

    select = staticmethod(Decoder.select)


def fresh_block(encoder: str, spec: BlockSpec) -> nn.Module:
    """A new fp32 copy of the encoder's real block, channels-last (the cached inputs arrive as
    NHWC); the shared encoder is not touched."""
    return (
        build_encoder(encoder, "fp32")
        .model.body[spec.start :]
        .to(memory_format=torch.channels_last)
    )


def frozen_block_model(
    encoder: str, block: str, decoder: Decoder, bundle: Path, config: dict
) -> FinetuneModel:
    """``decoder`` behind bundle ``bundle``'s tuned ``block``, the block frozen (no gradients):
    a model that reads the cached block inputs, e.g. for SCST over a fine-tuned bundle."""
    spec = block_spec(encoder, block)
    body = fresh_block(encoder, spec)
    load_block_weights(body, spec, bundle_block_state(bundle, config))
    body.requires_grad_(False)
    return FinetuneModel(body, decoder, spec)


def trainable_model(cfg, dcfg: DecoderConfig) -> nn.Module:
    """What ``train`` optimises: the decoder, or (``cfg.finetune``) block + decoder.

    The block starts from the encoder's real weights, in fp32 (autocast does the rest).
    """
    decoder = build_decoder(dcfg)
    if not cfg.finetune:
        return decoder
    spec = block_spec(cfg.encoder, cfg.finetune)
    block = fresh_block(cfg.encoder, spec)
    block.requires_grad_(True)
    return FinetuneModel(block, decoder, spec)


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """AdamW groups: the decoder's at ``cfg.lr`` (weight decay on matrices other than the
    embedding), then, when fine-tuning, the block's at ``block_lr(cfg)`` (decay on conv weights,
    none on BatchNorm's weight and bias). A frozen-encoder run gets exactly the decoder groups."""
    decoder = model.decoder if isinstance(model, FinetuneModel) else model
    named = list(decoder.named_parameters())
    decay = [p for n, p in named if p.ndim > 1 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim > 1 and "embed" not in n)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if isinstance(model, FinetuneModel):
        params = [p for p in model.block.parameters() if p.requires_grad]
        lr = block_lr(cfg)
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": matrices, "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": vectors, "weight_decay": 0.0, "lr": lr},
        ]
    return groups


def decoder_of(model: nn.Module) -> Decoder:
    """The decoder inside what ``train`` optimised (itself for a frozen-encoder run)."""
    return model.decoder if isinstance(model, FinetuneModel) else model


# ---------------------------------------------------------------- the bundle's block


def block_state(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """The block's weights under the encoder's own keys (``body.7.…``), fp16 except the BN
    running statistics (fp32, as in the shipped encoders: a variance may pass fp16's range)."""
    return {
        f"body.{k}": (v.float() if "running_" in k else v.half()).cpu()
        for k, v in model.block.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def export_block(out: Path, model: nn.Module, encoder: str) -> dict | None:
    """Write ``out/encoder_block.safetensors``; returns its ``config.json`` entry (None for a
    frozen-encoder run, which writes nothing)."""
    if not isinstance(model, FinetuneModel):
        return None
    path = out / BLOCK_FILE
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "fp16", "encoder": encoder, "block": model.spec.name}
    atomic_save_safetensors(path, block_state(model), metadata=meta)
    return {
        "block": model.spec.name,
        "file": BLOCK_FILE,
        "sha256": sha256_file(path),
        "cached_input": model.spec.input_name,
    }
