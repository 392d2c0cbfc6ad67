"""An encoder's last block as a unit of its own: which modules it is, its cached input, and
swapping fine-tuned weights into a copy of the encoder.

ResNet50's ``layer4`` and VGG16's ``block5`` can be fine-tuned (``--finetune``); a bundle then ships
the block's weights (``encoder_block.safetensors``) and its identity is ``tuned_sha256``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import nn

from captioning.core.machine import Precision
from captioning.models.encoders import (
    Encoder,
    EncoderOutput,
    LoadedEncoder,
    build_encoder,
    get_spec,
)


@dataclass(frozen=True)
class BlockSpec:
    """Where an encoder's last block starts in ``Encoder.body`` and what goes into it."""

    name: str  # the --finetune choice
    arch: str  # the architecture family it belongs to (EncoderSpec.arch starts with this)
    start: int  # index of the block's first module in Encoder.body
    input_name: str  # what is cached (the cache key's suffix)
    input_channels: int
    input_side: int  # the cached grid is input_side x input_side cells at 224x224 input


class TunedBlock(NamedTuple):
    """A fine-tuned block file a bundle ships, checked against its record."""

    spec: BlockSpec
    sha256: str
    path: Path


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


def tuned_sha256(base_sha256: str, block: str, block_sha256: str) -> str:
    """The identity of an encoder with a tuned block: keys its feature caches and compiles."""
    return hashlib.sha256(f"{base_sha256}:{block}:{block_sha256}".encode()).hexdigest()
