"""Starting from a trained bundle (``train --init``, SCST): its checked weights, its history."""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.bundle.catalog import resolve_bundle
from captioning.bundle.format import bundle_block_state, load_decoder, tuned_block
from captioning.bundle.history import unmarked_stage
from captioning.core.files import read_json
from captioning.models.decoders import DecoderConfig
from captioning.training.config import TrainConfig
from captioning.training.data import TrainData

# regularisation only: a warm start (--init) may change these
FREE_DECODER_FIELDS = ("dropout", "feat_dropout", "alpha_c")


def warm_start(
    cfg: TrainConfig, data: TrainData, dcfg: DecoderConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The weights of bundle ``cfg.init``, checked to fit this run (``train --init``):
    (decoder state, fine-tuned block state or None).

    The bundle must have the same encoder weights, decoder kind, vocabulary and decoder shape;
    dropout and the attention regulariser may differ. A bundle that fine-tuned its encoder's last
    block continues only as a run that fine-tunes the same block (``--finetune``), which starts
    from both its decoder and its block. Typical uses: ``--finetune`` a trained frozen-encoder
    bundle's last block, or give a fine-tuned bundle more epochs at a lower rate.
    """
    path = resolve_bundle(cfg.init)
    decoder, vocab, bcfg = load_decoder(path)
    block = tuned_block(bcfg)
    if block and block != cfg.finetune:
        raise ValueError(
            f"--init {path} fine-tuned its encoder's {block}; continue it with --finetune {block}"
        )
    if (bcfg["encoder"], bcfg["decoder"]) != (cfg.encoder, cfg.decoder):
        raise ValueError(
            f"--init {path} is a {bcfg['encoder']} + {bcfg['decoder']} bundle; this run trains "
            f"{cfg.encoder} + {cfg.decoder}"
        )
    if vocab.itos != data.vocab.itos:
        raise ValueError(
            f"--init {path}'s vocabulary ({len(vocab)} words) is not the one this data's train "
            f"split gives with min_freq={cfg.min_freq} ({len(data.vocab)} words)"
        )
    if data.encoder_sha256 and bcfg.get("encoder_sha256") != data.encoder_sha256:
        raise ValueError(f"--init {path} was trained on features of other {cfg.encoder} weights")
    theirs, ours = decoder.cfg.to_dict(), dcfg.to_dict()
    differ = [k for k in ours if k not in FREE_DECODER_FIELDS and theirs.get(k) != ours.get(k)]
    if differ:
        raise ValueError(
            f"--init {path}'s decoder differs in {', '.join(differ)} "
            f"({', '.join(f'{k}={theirs.get(k)}' for k in differ)}); drop those --set overrides"
        )
    return decoder.state_dict(), bundle_block_state(path, bcfg) if block else None


def stage_name(cfg: TrainConfig) -> str:
    """The ``stage`` of this run's epochs in a warm-started bundle's history."""
    return "finetune" if cfg.finetune else "xe"


def init_history(bundle: str | Path) -> list[dict]:
    """The bundle's history, each row marked with its stage; an unmarked row is ``finetune``
    in a bundle that tuned its encoder block from the start, else ``xe``."""
    path = resolve_bundle(bundle)
    rows = read_json(path / "history.json") if (path / "history.json").exists() else []
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    return [{"stage": unmarked_stage(config), **r} for r in rows if isinstance(r, dict)]


def staged_history(cfg: TrainConfig, meta: dict) -> tuple[list[dict], int]:
    """(history, best epoch) as the bundle records them: a warm start (``--init``) continues
    its starting bundle's history, read once when the run began and kept in the state (the
    bundle may have changed since), so its epochs are numbered after those (``stage_epoch``
    keeps the run's own number) and the Training page shows both stages."""
    earlier = meta.get("init_history", [])
    if not earlier:
        return meta["history"], meta["best_epoch"]
    offset = max(int(r.get("epoch", 0)) for r in earlier)
    mine = [
        {"stage": stage_name(cfg), **r, "epoch": offset + r["epoch"], "stage_epoch": r["epoch"]}
        for r in meta["history"]
    ]
    return earlier + mine, offset + meta["best_epoch"]
