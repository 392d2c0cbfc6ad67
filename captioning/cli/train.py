"""``train``: cross-entropy training of a decoder, or the self-critical (SCST) stage."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from captioning.cli.args import (
    BASELINE_CHOICES,
    DECODER_CHOICES,
    FINETUNE_CHOICES,
    RUNTIME_CHOICES,
    CommandParsers,
    add_cache,
    add_data,
    add_device,
    add_encoder,
    beam_arg,
    cache_root,
    nonneg_float,
    nonneg_int,
    parse_overrides,
    positive_int,
    unit_float,
)
from captioning.core.machine import FIXED_PRECISIONS

# the flags that set the TrainConfig or ScstConfig field of the same name when given
SCHEDULE_FLAGS = (
    "epochs",
    "lr",
    "batch_images",
    "patience",
    "seed",
    "max_minutes",
    "train_precision",
    "dev_beam",
)
TRAIN_FLAGS = (
    *SCHEDULE_FLAGS,
    "precision",
    "finetune",
    "finetune_lr",
    "device",
    "runtime",
    "init",
    "label_smoothing",
)
SCST_FLAGS = (*SCHEDULE_FLAGS, "samples", "baseline")


def cmd_train(args: argparse.Namespace) -> int:
    if args.objective == "scst":
        return _train_scst(args)
    if args.samples is not None or args.baseline is not None:
        raise ValueError("--samples and --baseline belong to --objective scst")
    from captioning.training.train import TrainConfig, main

    cfg = TrainConfig(
        encoder=args.encoder, decoder=args.decoder, decoder_cfg=parse_overrides(args.set)
    )
    for key in TRAIN_FLAGS:
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    _check_finetune(cfg)
    result = _run(main, cfg, args)
    if not result["stopped"] and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        summary = {
            "out": args.out,
            "best_epoch": result["best_epoch"],
            f"best_{result['select_metric']}": result["best_score"],
        }
        print(json.dumps(summary))
    return 0


def _train_scst(args: argparse.Namespace) -> int:
    """``train --objective scst --init BUNDLE``: the self-critical CIDEr-D stage."""
    from captioning.training.scst import ScstConfig, main_scst

    if not args.init:
        raise ValueError("--objective scst needs --init BUNDLE (the cross-entropy model)")
    if args.set or args.finetune or args.label_smoothing:
        raise ValueError(
            "--set, --finetune and --label-smoothing apply to cross-entropy training, not to scst"
        )
    cfg = ScstConfig(init=args.init)
    for key in SCST_FLAGS:
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    result = _run(main_scst, cfg, args)
    if not result.get("stopped"):
        print(json.dumps({"out": args.out, "best_epoch": result.get("best_epoch")}))
    return 0


def _run(entry, cfg, args: argparse.Namespace) -> dict:
    """Run a training entry point (cross-entropy or SCST) with the run flags of ``args``."""
    return entry(
        cfg,
        args.data,
        Path(args.out),
        cache_root(args),
        args.resume,
        force=args.force,
        export_best=args.export_best,
        export_last=args.export_last,
    )


def _check_finetune(cfg) -> None:
    """``--finetune``, ``--finetune-lr`` and ``--device`` errors before any data is read."""
    from captioning.core.machine import resolve_device

    resolve_device(cfg.device)
    if cfg.finetune:
        from captioning.models.blocks import block_spec

        block_spec(cfg.encoder, cfg.finetune)
        if cfg.runtime != "torch":
            raise ValueError("--finetune caches the block's input with torch: drop --runtime")
    elif cfg.finetune_lr:
        raise ValueError("--finetune-lr sets the tuned block's learning rate: add --finetune")


def add_parsers(commands: CommandParsers) -> None:
    p = commands.command(
        "train",
        cmd_train,
        "Train a decoder on cached encoder features; writes a bundle into --out.",
    )
    add_encoder(p)
    p.add_argument(
        "--decoder",
        default="attention",
        choices=DECODER_CHOICES,
        metavar="DECODER",
        help="%(choices)s (default: %(default)s)",
    )
    add_data(p)
    p.add_argument("--out", required=True, help="bundle directory, e.g. artifacts/models/NAME")
    add_cache(p)
    _add_objective(p)
    _add_schedule(p)
    _add_run_state(p)
    _add_model_options(p)
    add_device(p)


def _add_objective(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--objective",
        choices=("xe", "scst"),
        default="xe",
        help="xe = cross-entropy; scst = self-critical CIDEr-D from --init (default: xe)",
    )
    p.add_argument(
        "--init",
        metavar="BUNDLE",
        help="start from this bundle's decoder: with --objective scst, the cross-entropy model; "
        "with xe, a warm start (same encoder, decoder and vocabulary; e.g. to --finetune it; "
        "a fine-tuned bundle needs --finetune of its block and starts from that block too)",
    )
    p.add_argument("--samples", type=positive_int, help="scst: sampled captions per image (5)")
    p.add_argument(
        "--baseline",
        choices=BASELINE_CHOICES,
        metavar="BASELINE",
        help="scst: reward baseline, mean or greedy (default: mean)",
    )


def _add_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=positive_int, help="(default: 12)")
    p.add_argument("--lr", type=nonneg_float, help="peak learning rate (default: 5e-4)")
    p.add_argument("--batch-images", type=positive_int, help="images per batch (default: 32)")
    p.add_argument("--patience", type=positive_int, help="early-stopping epochs (default: 3)")
    p.add_argument("--seed", type=nonneg_int, help="(default: 0)")
    p.add_argument("--max-minutes", type=nonneg_float, help="stop resumably after M minutes")
    p.add_argument(
        "--dev-beam",
        type=beam_arg,
        metavar="K",
        help="dev decoding that picks the best epoch: 1 = greedy (default), K > 1 = beam K "
        "(with --objective scst, also the --init bundle's alpha and no_repeat_ngram)",
    )


def _add_run_state(p: argparse.ArgumentParser) -> None:
    """``--resume`` (and the exports of a resumed run) or ``--force``."""
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--export-best",
        action="store_true",
        help="with --resume: train no further, export the best finished epoch of the run in "
        "--out as its bundle (its state stays, so it can still be resumed)",
    )
    p.add_argument(
        "--export-last",
        action="store_true",
        help="with --resume: as --export-best, with the run's latest finished epoch instead "
        "(e.g. an SCST epoch that dev did not prefer alone, to make a soup of)",
    )
    state.add_argument(
        "--force",
        action="store_true",
        help="replace what --out holds (its weights, metrics, predictions and card are deleted)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train-precision",
        choices=FIXED_PRECISIONS,
        help="decoder numerics in training (bf16 = autocast; default fp32)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", *FIXED_PRECISIONS),
        help="encoder precision of the feature cache (default: auto)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        metavar="RUNTIME",
        help="which feature cache training reads, and what extracts its missing images: torch "
        "(the reference), openvino (the cache `extract --runtime openvino` writes; faster on "
        "CPUs) or auto; the decoder always trains on torch (default: torch)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="decoder config override, e.g. --set dropout=0.5 --set hidden_dim=768",
    )
    p.add_argument(
        "--finetune",
        choices=FINETUNE_CHOICES,
        metavar="BLOCK",
        help="also train the encoder's last block on cached inputs of it: layer4 (ResNet50) or "
        "block5 (VGG16); the bundle ships the tuned block (default: frozen encoder)",
    )
    p.add_argument(
        "--finetune-lr",
        type=nonneg_float,
        help="peak learning rate of the tuned block (default: --lr / 10)",
    )
    p.add_argument(
        "--label-smoothing",
        type=unit_float,
        metavar="EPS",
        help="train toward (1 - EPS) one-hot + EPS uniform (default: 0; losses report plain CE)",
    )
