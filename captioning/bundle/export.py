"""Write a trained decoder (and its fine-tuned block's record) as a self-contained bundle."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path

from captioning.bundle.format import BLOCK_KEY, BUNDLE_FORMAT, DEFAULT_RUNTIME, clear_model_outputs
from captioning.bundle.records import write_records
from captioning.core.files import atomic_save_safetensors, atomic_write_json
from captioning.core.machine import resolve_device, resolve_precision
from captioning.data.vocab import Vocabulary
from captioning.models.decoders import Decoder, DecoderConfig
from captioning.models.decoding import DecodeConfig

# ---------------------------------------------------------------- writing


def data_description(dataset) -> dict:
    """What a ``CaptionDataset`` says about itself, its layout and split (config.json, card)."""
    return {
        "name": dataset.name,
        "layout": dataset.layout,
        "split_source": dataset.split_source,
        "split": dataset.split_note,
        "images": {k: len(v) for k, v in dataset.splits.items()},
    }


def export_bundle(
    out: Path,
    model: Decoder,
    vocab: Vocabulary,
    *,
    cfg,
    dcfg: DecoderConfig,
    history: list[dict],
    best_epoch: int,
    commit: str | None,
    dataset=None,
    encoder_sha256: str | None = None,
    encoder_block: dict | None = None,
    encoder_runtime: str = DEFAULT_RUNTIME,
    encoder_precision: str = "",
    select_metric: str,
) -> None:
    """Write a self-contained bundle (weights fp16) next to the training state.

    ``select_metric``: the history field that chose ``best_epoch`` (the card names it).

    ``encoder_runtime``, ``encoder_precision``: what ran the encoder that made the training
    features (torch, openvino) and at which precision (its label, e.g. bf16+cl); without the
    label, the precision ``cfg`` resolves to on this machine.

    ``encoder_block``: the ``config.json`` entry of a fine-tuned block already written into
    ``out`` (``captioning.training.finetune.export_block``); None for a frozen encoder.

    New weights make every earlier record wrong, so metrics, predictions, bench and card of a
    previous model are removed; ``captioning.bundle.card.write_card`` renders the new card.
    """
    from captioning.models.encoders import weights_sha256

    out.mkdir(parents=True, exist_ok=True)
    clear_model_outputs(out)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save_safetensors(out / "decoder.safetensors", sd, metadata={"format": "fp16"})
    vocab.save(out / "vocab.json")
    resolved = resolve_precision(cfg.precision, resolve_device(cfg.device))  # as training does
    precision = encoder_precision or resolved.label
    train_config = {**asdict(cfg), "precision": resolved.dtype}  # "auto" made explicit
    config = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "name": out.name,
        "encoder": cfg.encoder,
        "decoder": dcfg.kind,
        "encoder_sha256": encoder_sha256 or weights_sha256(cfg.encoder),
        **({BLOCK_KEY: encoder_block} if encoder_block else {}),
        "precision": precision,  # of the encoder features the decoder was trained on
        "runtime": encoder_runtime,  # of those features
        "data": data_description(dataset) if dataset is not None else None,
        "decoder_config": dcfg.to_dict(),
        "train_config": train_config,
        "best_epoch": best_epoch,
        "select_metric": select_metric,
        "decode_defaults": asdict(DecodeConfig()),
        "git_commit": commit,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "history.json", history)
    write_records(out, [], config)
