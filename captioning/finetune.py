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

import copy
import hashlib
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import load_file
from torch import nn

from captioning.bundle import BLOCK_FILE, BLOCK_KEY, BundleError
from captioning.decoders import Decoder, DecoderConfig, build_decoder
from captioning.encoders import (
    Encoder,
    EncoderOutput,
    LoadedEncoder,
    build_encoder,
    get_spec,
    weights_sha256,
)
from captioning.features import FeatureCache, Features, extract
from captioning.fileio import atomic_save_safetensors, sha256_file
from captioning.precision import Precision, resolve_device, resolve_precision

FINETUNE_LR_SHARE = 0.1  # the block's peak LR when ``finetune_lr`` is 0: lr * this


@dataclass(frozen=True)
class BlockSpec:
    """Where an encoder's last block starts in ``Encoder.body`` and what goes into it."""

    name: str  # the --finetune choice
    arch: str  # the architecture family it belongs to (EncoderSpec.arch starts with this)
    start: int  # index of the block's first module in Encoder.body
    input_name: str  # what is cached (the cache key's suffix)
    input_channels: int
    input_side: int  # the cached grid is input_side x input_side cells at 224x224 input


FINETUNE_BLOCKS: Mapping[str, BlockSpec] = MappingProxyType(
    {
        # body = conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4
        "layer4": BlockSpec("layer4", "resnet50", 7, "layer3", 1024, 14),
        # body = VGG16 features[:30]; 23 is pool4, 24..29 conv5_1 .. conv5_3 + ReLU
        "block5": BlockSpec("block5", "vgg16", 24, "pool4", 512, 14),
    }
)


def block_spec(encoder: str, block: str) -> BlockSpec:
    """The block ``block`` of encoder ``encoder``; a ValueError names the right choice."""
    arch = get_spec(encoder).arch
    fits = [b.name for b in FINETUNE_BLOCKS.values() if arch.startswith(b.arch)]
    if block not in FINETUNE_BLOCKS:
        raise ValueError(f"unknown --finetune block {block!r}; choose from {', '.join(fits)}")
    if block not in fits:
        raise ValueError(
            f"--finetune {block} is {FINETUNE_BLOCKS[block].arch}'s last block; encoder "
            f"{encoder!r} takes --finetune {' or '.join(fits) or '(none)'}"
        )
    return FINETUNE_BLOCKS[block]


def block_lr(cfg) -> float:
    """The block's peak learning rate: ``cfg.finetune_lr``, or ``cfg.lr * FINETUNE_LR_SHARE``."""
    return cfg.finetune_lr or cfg.lr * FINETUNE_LR_SHARE


# ---------------------------------------------------------------- the cached block input


class StemModel(nn.Module):
    """The encoder up to the block: RGB [B,3,224,224] -> the block's input as an EncoderOutput.

    ``grid`` [B, HW, C] is the block input in the cache's layout; ``pooled`` [B, C] its mean.
    """

    def __init__(self, norm: nn.Module, stem: nn.Module) -> None:
        super().__init__()
        self.norm, self.stem = norm, stem

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        fmap = self.stem(self.norm(x)).float()  # [B, C, h, w]
        grid = fmap.flatten(2).transpose(1, 2).contiguous()  # [B, hw, C]
        return EncoderOutput(pooled=grid.mean(1), grid=grid)


@dataclass
class BlockInputEncoder(LoadedEncoder):
    """A ``LoadedEncoder`` whose output is the block's input; its label names that input, so
    ``features.FeatureCache`` keys it ``<encoder>-<sha12>-<precision>-<input>``."""

    block: BlockSpec | None = None

    @property
    def label(self) -> str:
        return f"{super().label}-{self.block.input_name}"


def block_input_encoder(
    encoder: str, block: str, precision: str | Precision = "auto"
) -> BlockInputEncoder:
    """The frozen trunk before ``block`` of ``encoder``, at ``precision``, for extraction."""
    spec = block_spec(encoder, block)
    enc = build_encoder(encoder, precision)
    stem = StemModel(enc.model.norm, enc.model.body[: spec.start]).eval()
    return BlockInputEncoder(stem, enc.spec, enc.sha256, enc.precision, block=spec)


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


def frozen_block_model(encoder: str, block: str, decoder: Decoder, bundle: Path,
                       config: dict) -> FinetuneModel:  # fmt: skip
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
        groups += [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay,
             "lr": lr},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr},
        ]  # fmt: skip
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


def swap_block(model: Encoder, spec: BlockSpec, state: Mapping[str, torch.Tensor]) -> Encoder:
    """``model`` with a copy of its block holding ``state``; everything else is shared with it
    (the same modules), and ``model`` itself is unchanged. Raises ValueError if ``state`` does
    not fit the block."""
    keep = [model.norm, *model.body[: spec.start]] + ([model.fc] if model.fc is not None else [])
    tuned = copy.deepcopy(model, memo={id(m): m for m in keep})
    load_block_weights(tuned.body[spec.start :], spec, state)
    return tuned


def load_block_weights(
    block: nn.Module, spec: BlockSpec, state: Mapping[str, torch.Tensor]
) -> None:
    """Copy ``block_state``-keyed weights (``body.N.…``, fp16 or fp32) into ``block`` (a slice
    of the encoder's body, which keeps its own dtype); ValueError if they do not fit it."""
    prefix = "body."
    if any(not k.startswith(prefix) for k in state):
        raise ValueError(f"block weights must be keyed {prefix}…, got {sorted(state)[:3]}")
    missing, unexpected = block.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit {spec.name}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def checked_block_file(bundle: Path, config: dict) -> tuple[BlockSpec, str, Path]:
    """(block spec, sha256, path) of a fine-tuned bundle's block file, after checking it against
    ``config.json``: BundleError for a malformed entry, a missing file or another sha256."""
    entry = config[BLOCK_KEY]
    if not isinstance(entry, dict) or entry.get("file") != BLOCK_FILE or "sha256" not in entry:
        raise BundleError(f"{bundle / 'config.json'}: malformed {BLOCK_KEY} entry {entry!r}")
    try:
        spec = block_spec(config["encoder"], entry.get("block", ""))
    except ValueError as e:
        raise BundleError(f"{bundle / 'config.json'}: {e}") from None
    path = bundle / BLOCK_FILE
    if not path.is_file():
        raise BundleError(f"bundle {bundle.name} is incomplete: missing {BLOCK_FILE}")
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        raise BundleError(
            f"bundle {bundle.name}: {BLOCK_FILE} has sha256 {sha[:12]}…, but config.json "
            f"records {entry['sha256'][:12]}…; the fine-tuned block was changed or damaged"
        )
    return spec, sha, path


def bundle_block_state(bundle: Path, config: dict) -> dict[str, torch.Tensor]:
    """A fine-tuned bundle's block weights (checked), keyed as ``block_state`` writes them."""
    _, _, path = checked_block_file(bundle, config)
    return load_file(str(path))


def tuned_sha256(base_sha256: str, block: str, block_sha256: str) -> str:
    """The identity of an encoder with a tuned block: keys its feature caches and compiles."""
    return hashlib.sha256(f"{base_sha256}:{block}:{block_sha256}".encode()).hexdigest()


_TUNED: dict[tuple, LoadedEncoder] = {}  # one tuned encoder per (block file, precision, runtime)
_TUNED_LOCK = threading.Lock()
MAX_TUNED = 8


def cached_tuned_encoder(
    bundle: Path, config: dict, precision: str | Precision
) -> LoadedEncoder | None:
    """A fine-tuned bundle's encoder straight from the OpenVINO compile cache, without building
    the torch trunk (torchvision's import and the weights' load are most of ``caption``'s
    start-up); None when it is not cached, or when the shipped encoder weights are not the ones
    the bundle records (``Captioner.load``'s slow path then says so). The block file is checked
    as ``tuned_encoder`` checks it."""
    from captioning.runtime import cached_encoder

    spec, sha, _ = checked_block_file(bundle, config)
    try:
        base_sha = weights_sha256(config["encoder"])
    except FileNotFoundError:
        return None
    if base_sha != config["encoder_sha256"]:
        return None
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision)
    key = (config["encoder"], base_sha, prec, spec.name, sha, "openvino")
    if (known := _recall(key)) is not None:
        return known
    enc = cached_encoder(config["encoder"], tuned_sha256(base_sha, spec.name, sha), prec)
    return None if enc is None else _remember(key, enc)


def _recall(key: tuple) -> LoadedEncoder | None:
    with _TUNED_LOCK:
        return _TUNED.get(key)


def _remember(key: tuple, enc: LoadedEncoder) -> LoadedEncoder:
    """Keep ``enc`` under ``key`` (at most ``MAX_TUNED``, oldest out); returns the kept one."""
    with _TUNED_LOCK:
        if len(_TUNED) >= MAX_TUNED:
            _TUNED.pop(next(iter(_TUNED)))
        return _TUNED.setdefault(key, enc)


def tuned_encoder(base: LoadedEncoder, bundle: Path, config: dict, runtime: str) -> LoadedEncoder:
    """The encoder of a fine-tuned bundle: ``base`` (the shared torch encoder, already checked
    against ``config["encoder_sha256"]``) with the bundle's block swapped in.

    Refuses (BundleError) a block file that is missing, renamed or whose sha256 differs from the
    one ``config.json`` records. ``runtime`` "openvino" compiles the tuned encoder (an fp32
    trace) under its own identity; a failed compile runs it on torch.
    """
    spec, sha, path = checked_block_file(bundle, config)
    key = (base.spec.name, base.sha256, base.precision, spec.name, sha, runtime)
    if (known := _recall(key)) is not None:
        return known
    try:
        state = load_file(str(path))
        model = swap_block(base.model, spec, state)
    except (ValueError, RuntimeError, OSError) as e:
        raise BundleError(f"{path}: {e}") from None
    enc = LoadedEncoder(model, base.spec, tuned_sha256(base.sha256, spec.name, sha), base.precision)
    if runtime != "torch":
        from captioning.runtime import accelerate_encoder

        def fp32_model() -> nn.Module:  # traced in fp32, so bf16 rounding never reaches the IR
            if base.precision.dtype == "fp32":
                return model
            ref = build_encoder(base.spec.name, "fp32")
            return swap_block(ref.model, spec, state)

        enc = accelerate_encoder(enc, runtime, fp32_model=fp32_model)
    return _remember(key, enc)
