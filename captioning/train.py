"""Training on cached features: teacher forcing, AdamW, warmup + cosine LR, early stopping.

Shaped like torchvision's references: ``train_one_epoch``, ``evaluate_dev`` and ``main``.
Batches are groups of images with all their captions, so per-image work (projecting the grid,
initialising the state) runs once per image, not once per caption. Checkpoints (safetensors +
JSON) are written atomically every epoch and every few minutes; ``--resume`` continues with the
same schedule, optimizer state, RNG state and data order.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from captioning.data import Flickr8k, load_flickr8k
from captioning.decoders import DECODER_KINDS, Decoder, DecoderConfig, build_decoder, caption_loss
from captioning.decoding import DecodeConfig, decode
from captioning.encoders import build_encoder, get_spec
from captioning.features import FeatureCache, Features, extract
from captioning.fileio import atomic_save_safetensors, atomic_write_json, read_json
from captioning.metrics import coco_scores, corpus_bleu_scores
from captioning.precision import resolve_precision
from captioning.vocab import Vocabulary, pad_batch

STATE_DIR = "train_state"
# may change on --resume; a new ``epochs`` re-spreads the rest of the cosine schedule
RESUME_FREE = ("max_minutes", "checkpoint_minutes", "epochs")


@dataclass
class TrainConfig:
    encoder: str = "resnet50"
    decoder: str = "attention"
    epochs: int = 12
    batch_images: int = 32  # each with all its captions (~160 captions a batch)
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 5.0
    patience: int = 3
    min_freq: int = 5
    max_words: int = 30  # captions longer than this are truncated for training
    seed: int = 0
    precision: str = "auto"  # encoder features and decoder autocast
    train_precision: str = "fp32"  # fp32 | bf16 autocast for the decoder in training
    dev_beam: int = 1  # dev decoding during training (greedy)
    checkpoint_minutes: float = 3.0
    max_minutes: float = 0.0  # stop (resumably) after this long; 0 = no limit
    decoder_cfg: dict = field(default_factory=dict)  # overrides of DecoderConfig fields


@dataclass
class TrainData:
    vocab: Vocabulary
    feats: Features  # train + dev images
    train_images: list[str]
    dev_images: list[str]
    captions: dict[str, list[list[int]]]  # encoded, truncated
    dev_refs: dict[str, list[str]]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_data(ds: Flickr8k, cfg: TrainConfig, cache_root: Path | None) -> TrainData:
    """Vocabulary from train captions only; features from the cache (extracted when missing)."""
    train, dev = ds.splits["train"], ds.splits["dev"]
    vocab = Vocabulary.build((c for n in train for c in ds.captions[n]), min_freq=cfg.min_freq)
    enc = build_encoder(cfg.encoder, cfg.precision)
    cache = FeatureCache.for_encoder(enc, cache_root)
    cached = cache.cached_names()  # one manifest read, not one per image
    missing = [n for n in train + dev if n not in cached]
    if missing:
        print(f"extracting {len(missing)} missing {cfg.encoder} features first", file=sys.stderr)
        extract(enc, [(n, ds.image_path(n)) for n in missing], cache)
    need_grid = DecoderConfig(kind=cfg.decoder).uses_grid
    feats = cache.load(train + dev, with_grid=need_grid)
    caps: dict[str, list[list[int]]] = {}
    for n in train + dev:
        caps[n] = []
        for c in ds.captions[n]:
            ids = vocab.encode(c)  # [<start>, w1..wn, <end>]
            if len(ids) > cfg.max_words + 2:
                ids = ids[: cfg.max_words + 1] + [vocab.end_id]
            caps[n].append(ids)
    return TrainData(vocab, feats, train, dev, caps, {n: ds.captions[n] for n in dev})


def decoder_config(cfg: TrainConfig, vocab_size: int) -> DecoderConfig:
    spec = get_spec(cfg.encoder)
    base = DecoderConfig(kind=cfg.decoder, vocab_size=vocab_size)
    base.feat_dim = spec.grid_channels if base.uses_grid else spec.pooled_dim
    return DecoderConfig.from_dict({**base.to_dict(), **cfg.decoder_cfg})


def image_feats(data: TrainData, names: list[str], uses_grid: bool) -> torch.Tensor:
    rows = data.feats.rows(names)
    src = data.feats.grid if uses_grid else data.feats.pooled
    return src.index_select(0, rows).float()  # [N, L, C] or [N, D]


def make_batch(data: TrainData, names: list[str], uses_grid: bool):
    """Features of the images once, plus every caption with the index of its image."""
    seqs, owner = [], []
    for i, n in enumerate(names):
        seqs += data.captions[n]
        owner += [i] * len(data.captions[n])
    tokens, _ = pad_batch(seqs)  # [B, T]
    return image_feats(data, names, uses_grid), torch.tensor(owner), tokens


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(images: list[str], seed: int, epoch: int) -> list[str]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [images[i] for i in torch.randperm(len(images), generator=g).tolist()]


def batches_per_epoch(cfg: TrainConfig, data: TrainData) -> int:
    return math.ceil(len(data.train_images) / cfg.batch_images)


# ---------------------------------------------------------------- checkpoints


def save_state(out: Path, model, opt, sched, meta: dict) -> None:
    """Model + AdamW state as safetensors, the rest as JSON; each file written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for idx, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    d = out / STATE_DIR
    atomic_save_safetensors(d / "state.safetensors", tensors)
    meta = {**meta, "param_groups": opt_sd["param_groups"], "sched": sched.state_dict()}
    atomic_write_json(d / "state.json", meta)


def load_state(out: Path, model, opt, sched) -> dict:
    d = out / STATE_DIR
    meta = read_json(d / "state.json")
    tensors = load_file(str(d / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["sched"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# ---------------------------------------------------------------- loops


def train_one_epoch(model, opt, sched, data, cfg, epoch, start_step, acc, on_step) -> dict:
    """One pass over the train images in this epoch's fixed order, from batch ``start_step``.

    ``acc`` (loss sum, caption count, seconds) carries over a resumed epoch's running totals.
    """
    model.train()
    uses_grid = model.cfg.uses_grid
    order = epoch_order(data.train_images, cfg.seed, epoch)
    n_batches = batches_per_epoch(cfg, data)
    autocast = resolve_precision(cfg.train_precision).autocast()
    bar = tqdm(range(start_step, n_batches), desc=f"epoch {epoch}", unit="batch", leave=False)
    t0 = time.perf_counter() - acc["seconds"]
    for step in bar:
        names = order[step * cfg.batch_images : (step + 1) * cfg.batch_images]
        feats, owner, tokens = make_batch(data, names, uses_grid)
        with autocast:
            ctx = model.select(model.context(feats), owner)
            logits, alphas = model(ctx, tokens)
            loss, ce = caption_loss(logits, tokens, alphas, model.cfg.alpha_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        acc["loss_sum"] += float(ce) * len(owner)
        acc["n"] += len(owner)
        acc["seconds"] = time.perf_counter() - t0
        bar.set_postfix(
            loss=f"{acc['loss_sum'] / acc['n']:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}"
        )
        if on_step(step + 1):
            bar.close()
            return {"stopped": True}
    return {
        "train_loss": acc["loss_sum"] / max(acc["n"], 1),
        "samples": acc["n"],
        "seconds": acc["seconds"],
        "stopped": False,
    }


@torch.inference_mode()
def evaluate_dev(model: Decoder, data: TrainData, beam: int = 1, chunk: int = 250) -> dict:
    """Teacher-forced dev loss, and decoded (not teacher-forced) dev BLEU-1..4 and CIDEr-D."""
    model.eval()
    uses_grid = model.cfg.uses_grid
    tot, n = 0.0, 0
    hyps: dict[str, list[int]] = {}
    for i in range(0, len(data.dev_images), chunk):
        names = data.dev_images[i : i + chunk]
        feats, owner, tokens = make_batch(data, names, uses_grid)
        ctx = model.select(model.context(feats), owner)
        logits, alphas = model(ctx, tokens)
        _, ce = caption_loss(logits, tokens, alphas, 0.0)
        tot += float(ce) * len(owner)
        n += len(owner)
        for name, best in zip(
            names, decode(model, feats, DecodeConfig(beam_size=beam)), strict=True
        ):
            hyps[name] = best[0].tokens
    texts = {k: data.vocab.decode(v) for k, v in hyps.items()}
    bleu = corpus_bleu_scores(texts, data.dev_refs)
    cider = coco_scores(texts, data.dev_refs, meteor=False)["cider"]
    return {"dev_loss": tot / n, **{f"dev_{k}": v for k, v in bleu.items()}, "dev_cider": cider}


def main(
    cfg: TrainConfig, data_dir: str | None, out: Path, cache: Path | None, resume: bool
) -> dict:
    """Train (or resume), then export the best epoch as a bundle in ``out``."""
    from captioning.bundle import export_bundle

    torch.manual_seed(cfg.seed)
    ds = load_flickr8k(data_dir)
    data = prepare_data(ds, cfg, cache)
    dcfg = decoder_config(cfg, len(data.vocab))
    model = build_decoder(dcfg)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    n_batches = batches_per_epoch(cfg, data)
    total = n_batches * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_steps))
    meta = {
        "epoch": 1,
        "step": 0,
        "history": [],
        "best_bleu4": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "train_config": asdict(cfg),
    }
    if resume and (out / STATE_DIR / "state.json").exists():
        meta = load_state(out, model, opt, sched)
        saved = {k: v for k, v in meta["train_config"].items() if k not in RESUME_FREE}
        if saved != {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}:
            raise ValueError(
                f"{out} was trained with other settings: {meta['train_config']}; "
                "resume with the same flags"
            )
        meta["train_config"] = asdict(cfg)
        print(f"resumed at epoch {meta['epoch']}, batch {meta['step']}", file=sys.stderr)
    elif (out / STATE_DIR).exists() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    data.vocab.save(out / "vocab.json")
    started = time.monotonic()
    last_ckpt = [time.monotonic()]

    def on_step(step: int) -> bool:
        """Periodic checkpoints mid-epoch; True when the time budget is spent."""
        over = cfg.max_minutes and (time.monotonic() - started) / 60 > cfg.max_minutes
        if over or (time.monotonic() - last_ckpt[0]) / 60 > cfg.checkpoint_minutes:
            save_state(out, model, opt, sched, {**meta, "step": step})
            last_ckpt[0] = time.monotonic()
        return bool(over)

    while meta["epoch"] <= cfg.epochs and meta["bad_epochs"] < cfg.patience:
        epoch = meta["epoch"]
        acc = meta.setdefault("partial", {"loss_sum": 0.0, "n": 0, "seconds": 0.0})
        stats = train_one_epoch(model, opt, sched, data, cfg, epoch, meta["step"], acc, on_step)
        if stats["stopped"]:
            print(f"time budget spent; resume with --resume (epoch {epoch})", file=sys.stderr)
            return {"stopped": True, **meta}
        t_eval = time.perf_counter()
        dev = evaluate_dev(model, data, cfg.dev_beam)
        record = {
            "epoch": epoch,
            "train_loss": round(stats["train_loss"], 4),
            **{k: round(v, 4) for k, v in dev.items()},
            "lr": sched.get_last_lr()[0],
            "epoch_seconds": round(stats["seconds"], 1),
            "eval_seconds": round(time.perf_counter() - t_eval, 1),
            "samples_per_s": round(stats["samples"] / stats["seconds"], 1),
        }
        meta["history"].append(record)
        tqdm.write(json.dumps(record))
        if dev["dev_bleu4"] > meta["best_bleu4"]:
            meta.update(best_bleu4=dev["dev_bleu4"], best_epoch=epoch, bad_epochs=0)
            atomic_save_safetensors(out / STATE_DIR / "best.safetensors", model.state_dict())
        else:
            meta["bad_epochs"] += 1
        meta.update(epoch=epoch + 1, step=0)
        meta.pop("partial")
        atomic_write_json(out / "history.json", meta["history"])
        save_state(out, model, opt, sched, meta)
        last_ckpt[0] = time.monotonic()
    best = load_file(str(out / STATE_DIR / "best.safetensors"))
    model.load_state_dict(best)
    export_bundle(
        out,
        model,
        data.vocab,
        cfg=cfg,
        dcfg=dcfg,
        history=meta["history"],
        best_epoch=meta["best_epoch"],
        commit=git_commit(),
    )
    return {"stopped": False, **meta}


# ---------------------------------------------------------------- CLI


def register_cli(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a decoder on cached features",
        description="Train a decoder on cached encoder features; writes a bundle.",
    )
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--decoder", default="attention", choices=DECODER_KINDS)
    p.add_argument("--data", help="Flickr8k directory (default: $CAPTIONING_DATA)")
    p.add_argument("--out", required=True, help="bundle directory, e.g. artifacts/models/NAME")
    p.add_argument("--cache", help="feature cache root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-images", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-minutes", type=float, help="stop resumably after M minutes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--train-precision",
        choices=("fp32", "bf16"),
        help="decoder numerics in training (bf16 = autocast; default fp32)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="encoder precision of the feature cache (default auto)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="decoder config override, e.g. --set dropout=0.5 --set hidden_dim=768",
    )
    p.set_defaults(func=cmd_train)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    fields = DecoderConfig.__dataclass_fields__
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY in {sorted(fields)}")
        out[key] = type(getattr(DecoderConfig(), key))(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        encoder=args.encoder, decoder=args.decoder, decoder_cfg=parse_overrides(args.set)
    )
    for key in (
        "epochs",
        "lr",
        "batch_images",
        "patience",
        "seed",
        "max_minutes",
        "train_precision",
        "precision",
    ):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    result = main(
        cfg, args.data, Path(args.out), Path(args.cache) if args.cache else None, args.resume
    )
    if not result["stopped"]:
        print(
            json.dumps(
                {
                    "out": args.out,
                    "best_epoch": result["best_epoch"],
                    "best_dev_bleu4": result["best_bleu4"],
                }
            )
        )
    return 0
