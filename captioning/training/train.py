"""Training on cached features: teacher forcing, AdamW, warmup + cosine LR, early stopping.

Shaped like torchvision's references: ``train_one_epoch``, ``evaluate_dev`` and ``main``.
Batches are groups of images with all their captions, so per-image work (projecting the grid,
initialising the state) runs once per image, not once per caption. A checkpoint is one
safetensors file (weights, AdamW moments, RNG, the best epoch's weights; the rest as JSON in its
metadata), written atomically every epoch and every few minutes; ``--resume`` continues with the
same schedule, optimizer state, RNG state and data order.

Under ``torchrun`` every rank trains on its contiguous share of the same global batch through
DistributedDataParallel, with the loss weighted so that the step equals one process's step on the
whole batch; rank 0 alone evaluates dev, writes checkpoints, history and the bundle.

An output directory holds one model: a non-empty ``out`` is refused unless the run resumes the
training state in it or ``force`` replaces everything that belonged to the old weights.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from captioning.bundle.format import bundle_block_state
from captioning.core.files import atomic_save_safetensors, atomic_write_json, read_json
from captioning.core.machine import device_scope, git_commit, resolve_device, resolve_precision
from captioning.data import CaptionDataset, load_dataset
from captioning.data.vocab import Vocabulary, pad_batch
from captioning.models.bleu import corpus_bleu_scores
from captioning.models.blocks import load_block_weights
from captioning.models.coco import coco_scores
from captioning.models.decoders import Decoder, DecoderConfig, caption_loss
from captioning.models.decoding import DecodeConfig, decode
from captioning.models.encoders import get_spec
from captioning.runtime.encoders import load_encoder
from captioning.runtime.features import FeatureCache, Features, extract
from captioning.training import distributed, finetune
from captioning.training.distributed import ONE, Dist

STATE_DIR = "train_state"  # inside --out: the resumable run
STATE_FILE = "state.safetensors"  # the whole checkpoint, one atomic file
STATE_FORMAT = "captioning-train-state-v2"
LEGACY_STATE = ("state.json", "best.safetensors")  # v1 wrote three files, one after the other
# may change on --resume (patience decides only when to stop); ``epochs`` may not: the LR schedule
# is planned once for the whole run
RESUME_FREE = ("max_minutes", "checkpoint_minutes", "device", "patience")
SELECT_METRIC = "dev_cider"  # checkpoint choice and patience: dev CIDEr-D of greedy captions


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
    finetune: str = ""  # "" = frozen encoder; "layer4"/"block5": tune it (captioning.finetune)
    finetune_lr: float = 0.0  # the tuned block's peak LR; 0 = lr / 10
    device: str = "auto"  # auto | cpu | cuda (captioning.precision.resolve_device)
    runtime: str = "torch"  # which feature cache: torch (reference) | openvino | auto
    init: str = ""  # "" = a fresh decoder; a bundle: start from its decoder (and block) weights
    label_smoothing: float = 0.0  # ε of the training loss (dev loss stays plain cross-entropy)


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


def prepare_data(ds: CaptionDataset, cfg: TrainConfig, cache_root: Path | None) -> TrainData:
    """Vocabulary from train captions only; features from the cache (extracted when missing)."""
    train, dev = ds.splits["train"], ds.splits["dev"]
    vocab = Vocabulary.build((c for n in train for c in ds.captions[n]), min_freq=cfg.min_freq)
    made_by = "torch"
    if cfg.finetune:  # the cached inputs of the block that trains (captioning.finetune)
        feats, sha, label = finetune.block_input_features(ds, cfg, train + dev, cache_root)
    else:
        device = resolve_device(cfg.device)
        runtime = cfg.runtime if device == "cpu" else "torch"  # OpenVINO runs on CPUs only
        enc = load_encoder(cfg.encoder, resolve_precision(cfg.precision, device), runtime)
        cache = FeatureCache.for_encoder(enc, cache_root)
        cached = cache.cached_names()  # one manifest read, not one per image
        missing = [n for n in train + dev if n not in cached]
        if missing:
            print(
                f"extracting {len(missing)} missing {cfg.encoder} features first", file=sys.stderr
            )
            extract(enc, [(n, ds.image_path(n)) for n in missing], cache)
        need_grid = DecoderConfig(kind=cfg.decoder).uses_grid
        feats, sha, made_by = cache.load(train + dev, with_grid=need_grid), enc.sha256, enc.runtime
        label = enc.precision.label
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
    """Features of the images once, plus every caption with the index of its image.

    Captions come longest first, so the attention decoder's teacher forcing shrinks its batch
    as captions end instead of computing padding.
    """
    pairs = [(c, i) for i, n in enumerate(names) for c in data.captions[n]]
    pairs.sort(key=lambda p: -len(p[0]))  # stable: ties keep the image order
    seqs, owner = [c for c, _ in pairs], [i for _, i in pairs]
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


# regularisation only: a warm start (--init) may change these
_FREE_DECODER_FIELDS = ("dropout", "feat_dropout", "alpha_c")


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
    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.format import load_decoder, tuned_block

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
    differ = [k for k in ours if k not in _FREE_DECODER_FIELDS and theirs.get(k) != ours.get(k)]
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
    """The ``--init`` bundle's history, each row marked with its stage; an unmarked row is
    ``finetune`` in a bundle that tuned its encoder block from the start, else ``xe``."""
    from captioning.bundle.catalog import resolve_bundle

    path = resolve_bundle(bundle)
    rows = read_json(path / "history.json") if (path / "history.json").exists() else []
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    unmarked = "finetune" if config.get("train_config", {}).get("finetune") else "xe"
    return [{"stage": unmarked, **r} for r in rows if isinstance(r, dict)]


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


# ---------------------------------------------------------------- checkpoints


def save_state(
    out: Path,
    model,
    opt,
    sched,
    meta: dict,
    best: dict[str, torch.Tensor] | None,
    rng: list[torch.Tensor] | None = None,
) -> None:
    """The whole run state as ONE safetensors file, written atomically (fsync, then rename).

    Tensors: the model (``model.*``), AdamW's moments (``opt.<param>.<name>``), torch's RNG (of
    each rank under torchrun: ``rng`` in rank order) and the best epoch's weights (``best.*``).
    Everything else (epoch, step, history, best epoch, schedule, param groups) is JSON in the
    file's metadata, so a crash leaves either the previous checkpoint or this one, never the
    weights of one with the bookkeeping of another.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for idx, st in opt_sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    for rank, state in enumerate(rng or [torch.get_rng_state()]):
        tensors[rng_key(rank)] = state
    for k, v in (best or {}).items():
        tensors[f"best.{k}"] = v
    meta = {**meta, "param_groups": opt_sd["param_groups"], "sched": sched.state_dict()}
    d = out / STATE_DIR
    atomic_save_safetensors(
        d / STATE_FILE, tensors, metadata={"format": STATE_FORMAT, "meta": json.dumps(meta)}
    )
    for name in LEGACY_STATE:  # a resumed v1 run: the new file supersedes them
        (d / name).unlink(missing_ok=True)


def rng_key(rank: int) -> str:
    return "rng.torch" if rank == 0 else f"rng.torch.{rank}"


def has_state(out: Path) -> bool:
    return (out / STATE_DIR / STATE_FILE).is_file()


def read_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the checkpoint in ``out``; reads v1's state.json + best.safetensors."""
    d = out / STATE_DIR
    with safe_open(str(d / STATE_FILE), "pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    if header.get("format") == STATE_FORMAT:
        return json.loads(header["meta"]), tensors
    meta = read_json(d / LEGACY_STATE[0])
    if (d / LEGACY_STATE[1]).exists():
        tensors.update({f"best.{k}": v for k, v in load_file(str(d / LEGACY_STATE[1])).items()})
    return meta, tensors


def load_state(
    out: Path, model, opt, sched, rank: int = 0
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, schedule and this rank's RNG; returns (meta, best or None)."""
    meta, tensors = read_state(out)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["sched"])
    if rng_key(rank) in tensors:
        torch.set_rng_state(tensors[rng_key(rank)])
    else:  # resumed with more processes than saved the state: a fresh, reproducible stream
        torch.manual_seed(rank_seed(meta["train_config"]["seed"], rank, meta["epoch"]))
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return meta, best or None


# ---------------------------------------------------------------- the output directory


def check_out(out: Path, resume: bool, force: bool) -> bool:
    """Refuse to mix two models in ``out``; True when it holds a run to resume.

    Nothing is deleted here (``clear_out`` does that once the data and model are ready), so a
    run that fails early loses nothing.
    """
    if resume and force:
        raise ValueError("--resume and --force exclude each other: continue the run or replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    shown = ", ".join(entries[:6]) + (", …" if len(entries) > 6 else "")
    if resume:
        if has_state(out):
            return True
        if entries:
            raise ValueError(
                f"--resume: {out} holds no training run ({STATE_DIR}/{STATE_FILE} is missing) "
                f"but is not empty ({shown}); pass --force to replace it, or choose a new --out"
            )
        print(f"--resume: no run in {out} yet; starting one", file=sys.stderr)
        return False
    if entries and not force:
        raise ValueError(
            f"--out {out} is not empty ({shown}); pass --resume to continue its training run, "
            "--force to replace it (its weights, metrics, predictions and card are deleted), "
            "or choose a new --out"
        )
    return False


def clear_out(out: Path) -> list[str]:
    """Delete what belonged to the old weights (the bundle's files and the training state)."""
    from captioning.bundle.format import WEIGHT_FILES, clear_model_outputs

    removed = [p.name for p in clear_model_outputs(out)]
    for name in WEIGHT_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    if (out / STATE_DIR).is_dir():
        shutil.rmtree(out / STATE_DIR)
        removed.append(STATE_DIR + "/")
    if removed:
        print(f"--force: removed {', '.join(removed)} from {out}", file=sys.stderr)
    return removed


# ---------------------------------------------------------------- loops


class TeacherForcing(nn.Module):
    """One training forward pass as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, feats, owner, tokens):  # feats [N, ...], owner [B], tokens [B, T]
        d = self.decoder
        return d(d.select(d.context(feats), owner), tokens)  # logits [B, T-1, V], alphas


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """Rank r > 0's RNG seed (dropout masks differ between ranks); rank 0 keeps ``seed``'s."""
    return seed * 100_003 + 7919 * rank + epoch


def batch_counts(data: TrainData, names: list[str]) -> tuple[int, int]:
    """(next-word targets, captions) of these images: what ``caption_loss`` averages over."""
    caps = [c for n in names for c in data.captions[n]]
    return sum(len(c) - 1 for c in caps), len(caps)


def shard_loss(
    logits, tokens, alphas, alpha_c: float, tok_share: float, cap_share: float, smooth: float = 0.0
):
    """This rank's term of the global batch's loss, scaled for DDP's gradient average.

    ``caption_loss`` is a mean over next-word targets (cross-entropy) plus a mean over captions
    (attention regulariser). The global mean is the shard means weighted by their shares of
    targets and captions; DDP divides the summed gradients by the world size, hence
    ``tok_share = world * targets_here / targets_in_batch`` (likewise ``cap_share``).
    """
    loss, ce = caption_loss(logits, tokens, alphas, alpha_c, label_smoothing=smooth)
    if alphas is None or alpha_c == 0:  # (smoothed) cross-entropy alone
        return loss * tok_share, ce
    ce_only, _ = caption_loss(logits, tokens, None, 0.0, label_smoothing=smooth)
    return ce_only * tok_share + (loss - ce_only) * cap_share, ce


def epoch_timing(stats: dict, sched, eval_started: float) -> dict:
    """The history fields every stage records per epoch: lr, train and dev seconds, samples/s."""
    return {
        "lr": sched.get_last_lr()[0],
        "epoch_seconds": round(stats["seconds"], 1),
        "eval_seconds": round(time.perf_counter() - eval_started, 1),
        "samples_per_s": round(stats["samples"] / stats["seconds"], 1),
    }


def train_one_epoch(
    model, opt, sched, data, cfg, epoch, start_step, acc, on_step, net=None, dist_: Dist = ONE
) -> dict:
    """One pass over the train images in this epoch's fixed order, from batch ``start_step``.

    ``acc`` (loss sum, caption count, seconds) carries over a resumed epoch's running totals;
    ``on_step(step, loss)`` gets the global batch's cross-entropy. Under torchrun ``net`` is the
    DistributedDataParallel wrapper of ``TeacherForcing(model)``, and this rank trains on its
    ``distributed.shard`` of every global batch (an empty share runs one image at weight 0, so
    that every rank joins the gradient all-reduce).
    """
    model.train()
    net = net or TeacherForcing(model)
    uses_grid = model.cfg.uses_grid
    order = epoch_order(data.train_images, cfg.seed, epoch)
    n_batches = batches_per_epoch(cfg, data)
    device = next(model.parameters()).device  # the batches follow the model (--device)
    autocast = resolve_precision(cfg.train_precision, device.type).autocast()
    bar = tqdm(
        range(start_step, n_batches),
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=not dist_.is_main,
    )
    t0 = time.perf_counter() - acc["seconds"]
    for step in bar:
        names = order[step * cfg.batch_images : (step + 1) * cfg.batch_images]
        mine = distributed.shard(names, dist_.rank, dist_.world) if dist_.enabled else names
        batch = make_batch(data, mine or names[:1], uses_grid)
        feats, owner, tokens = (t.to(device) for t in batch)
        with autocast, device_scope(str(device)):
            logits, alphas = net(feats, owner, tokens)
            if dist_.enabled:
                (n_tok, n_cap), (m_tok, m_cap) = batch_counts(data, names), batch_counts(data, mine)
                w = dist_.world
                loss, ce = shard_loss(
                    logits, tokens, alphas, model.cfg.alpha_c, w * m_tok / n_tok,
                    w * m_cap / n_cap, cfg.label_smoothing,
                )  # fmt: skip
            else:
                loss, ce = caption_loss(
                    logits, tokens, alphas, model.cfg.alpha_c, label_smoothing=cfg.label_smoothing
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if dist_.enabled:  # the global batch's cross-entropy, as one process would log it
            ce_value = distributed.all_sum(dist_, float(ce) * m_tok / n_tok)
        else:
            n_cap, ce_value = len(owner), float(ce)
        acc["loss_sum"] += ce_value * n_cap
        acc["n"] += n_cap
        acc["seconds"] = time.perf_counter() - t0
        bar.set_postfix(
            loss=f"{acc['loss_sum'] / acc['n']:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}"
        )
        if on_step(step + 1, ce_value):
            bar.close()
            return {"stopped": True}
    return {
        "train_loss": acc["loss_sum"] / max(acc["n"], 1),
        "samples": acc["n"],
        "seconds": acc["seconds"],
        "stopped": False,
    }


@torch.inference_mode()
def evaluate_dev(
    model: Decoder,
    data: TrainData,
    decoding: DecodeConfig,
    chunk: int = 250,
    precision: str = "fp32",
) -> dict:
    """Teacher-forced dev loss, and dev BLEU-1..4 and CIDEr-D of captions decoded by ``decoding``.

    All dev images, batched; ``precision`` "bf16" runs both passes under bf16 autocast.
    """
    model.eval()
    uses_grid = model.cfg.uses_grid
    device = next(model.parameters()).device
    autocast = resolve_precision(precision, device.type).autocast()
    tot, n = 0.0, 0
    hyps: dict[str, list[int]] = {}
    for i in range(0, len(data.dev_images), chunk):
        names = data.dev_images[i : i + chunk]
        feats, owner, tokens = (t.to(device) for t in make_batch(data, names, uses_grid))
        with autocast, device_scope(str(device)):
            ctx = model.select(model.context(feats), owner)
            logits, alphas = model(ctx, tokens)
            _, ce = caption_loss(logits, tokens, alphas, 0.0)
            nbests = decode(model, feats, replace(decoding, n_best=1))  # the best is scored
        tot += float(ce) * len(owner)
        n += len(owner)
        for name, best in zip(names, nbests, strict=True):
            hyps[name] = best[0].tokens
    texts = {k: data.vocab.decode(v) for k, v in hyps.items()}
    bleu = corpus_bleu_scores(texts, data.dev_refs)
    cider = coco_scores(texts, data.dev_refs, meteor=False)["cider"]
    return {"dev_loss": tot / n, **{f"dev_{k}": v for k, v in bleu.items()}, "dev_cider": cider}


def main(
    cfg: TrainConfig,
    data_dir: str | None,
    out: Path,
    cache: Path | None,
    resume: bool,
    force: bool = False,
    export_best: bool = False,
    export_last: bool = False,
) -> dict:
    """Train (or resume), then export the best epoch as a bundle in ``out``.

    ``out`` must be empty or absent, unless ``resume`` (continue the run in ``out/train_state``)
    or ``force`` (first delete everything that belonged to the old weights). ``export_best``
    (with ``resume``) trains no further: it exports the best finished epoch of an unfinished
    run, whose state stays as it was, so the run can still be resumed; ``export_last`` does the
    same with its latest finished epoch. Under torchrun
    (``WORLD_SIZE`` > 1) every rank runs this; see the module docstring. The result is the
    run's state, including ``step_losses``: ``[epoch, step, cross-entropy of the global batch]``
    for every step of the run (kept in the checkpoint, so across resumes too).
    """
    dist_ = distributed.from_env()
    try:
        return _main(
            cfg, data_dir, Path(out), cache, resume, force, dist_, export_best, export_last
        )
    finally:
        distributed.close(dist_)


def check_export(export_best: bool, export_last: bool, resume: bool) -> None:
    """``--export-best``/``--export-last`` read a run's state: one of them, with ``--resume``
    and that run's flags."""
    if export_best and export_last:
        raise ValueError("--export-best and --export-last: choose one")
    if (export_best or export_last) and not resume:
        which = "best" if export_best else "latest finished"
        raise ValueError(
            f"--export-{'best' if export_best else 'last'} exports the {which} epoch of the run "
            "in --out so far: pass --resume with that run's flags"
        )


def last_epoch(meta: dict, out: Path) -> int:
    """The run's latest finished epoch (``--export-last``); ValueError inside an epoch or
    before the first has finished."""
    if meta.get("step") or meta.get("partial"):
        raise ValueError(
            f"the run in {out} stopped inside epoch {meta['epoch']}; --export-last exports a "
            "finished epoch: resume it to the end of that epoch first (or use --export-best)"
        )
    if meta["epoch"] <= 1:
        raise ValueError(f"no epoch of the run in {out} has finished yet; nothing to export")
    return meta["epoch"] - 1


def _main(
    cfg, data_dir, out: Path, cache, resume: bool, force: bool, dist_: Dist,
    export_best: bool = False, export_last: bool = False,
) -> dict:  # fmt: skip
    from captioning.bundle.card import write_card
    from captioning.bundle.export import export_bundle

    check_export(export_best, export_last, resume)
    main_rank = dist_.is_main
    resuming = check_out(out, resume, force)
    distributed.barrier(dist_)  # every rank has looked at ``out`` before rank 0 changes it
    torch.manual_seed(cfg.seed)
    device = resolve_device("cpu" if dist_.enabled and cfg.device == "auto" else cfg.device)
    if device != "cpu" and dist_.enabled:  # CUDA-only: torchrun training runs on the CPU
        raise ValueError("multi-process (torchrun) training runs on the CPU; pass --device cpu")
    ds = load_dataset(data_dir)
    on_device = replace(cfg, device=device)  # features are extracted where the model trains
    if dist_.local_rank == 0:  # one process per node extracts missing features ...
        data = prepare_data(ds, on_device, cache)
    distributed.barrier(dist_)
    if dist_.local_rank != 0:  # ... the others find them cached
        data = prepare_data(ds, on_device, cache)
    dcfg = decoder_config(cfg, len(data.vocab))
    model = finetune.trainable_model(cfg, dcfg)  # the decoder, or block + decoder
    if cfg.init and not resuming:  # a resumed run has its own weights in its state
        decoder_state, block_state = warm_start(cfg, data, dcfg)
        finetune.decoder_of(model).load_state_dict(decoder_state)
        if block_state is not None:
            load_block_weights(model.block, model.spec, block_state)
    model = model.to(device)
    opt = torch.optim.AdamW(finetune.param_groups(model, cfg), lr=cfg.lr)
    n_batches = batches_per_epoch(cfg, data)
    total = n_batches * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_steps))
    meta = {
        "epoch": 1,
        "step": 0,
        "history": [],
        "best_score": -1.0,
        "select_metric": SELECT_METRIC,
        "best_epoch": 0,
        "bad_epochs": 0,
        "train_config": asdict(cfg),
        "step_losses": [],
        "init_history": init_history(cfg.init) if cfg.init and not resuming else [],
    }
    best: dict[str, torch.Tensor] | None = None  # the best epoch's weights, kept in the state
    if dist_.rank:  # dropout masks differ between ranks; rank 0 keeps one process's stream
        torch.manual_seed(rank_seed(cfg.seed, dist_.rank, 0))
    if resuming:
        meta, best = load_state(out, model, opt, sched, dist_.rank)
        saved = {**asdict(TrainConfig()), **meta["train_config"]}  # newer fields: defaults
        saved = {k: v for k, v in saved.items() if k not in RESUME_FREE}
        if saved != {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}:
            raise ValueError(
                f"{out} was trained with other settings: {meta['train_config']}; "
                "resume with the same flags"
            )
        meta["train_config"] = asdict(cfg)
        if main_rank:
            print(f"resumed at epoch {meta['epoch']}, batch {meta['step']}", file=sys.stderr)
    elif force and main_rank:
        clear_out(out)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    meta["world_size"] = dist_.world
    net = TeacherForcing(model)
    if dist_.enabled:  # broadcasts rank 0's parameters; all-reduces (averages) gradients
        net = nn.parallel.DistributedDataParallel(net)
    started = time.monotonic()
    last_ckpt = [time.monotonic()]
    step_losses = meta.setdefault("step_losses", [])  # a v1 checkpoint has none

    def checkpoint(state_meta: dict) -> None:
        rng = distributed.gather_rng(dist_)  # every rank's, so each resumes its own stream
        if main_rank:
            save_state(out, model, opt, sched, state_meta, best, rng)
        last_ckpt[0] = time.monotonic()

    def on_step(step: int, loss: float) -> bool:
        """Periodic checkpoints mid-epoch; True when the time budget is spent (rank 0 decides)."""
        step_losses.append([meta["epoch"], step, round(loss, 7)])
        over = bool(cfg.max_minutes) and (time.monotonic() - started) / 60 > cfg.max_minutes
        due = (time.monotonic() - last_ckpt[0]) / 60 > cfg.checkpoint_minutes
        over, due = (bool(v) for v in distributed.broadcast(dist_, [float(over), float(due)]))
        if over or due:
            checkpoint({**meta, "step": step})
        return over

    exporting = export_best or export_last  # no training: export from the state as it is
    while not exporting and meta["epoch"] <= cfg.epochs and meta["bad_epochs"] < cfg.patience:
        epoch = meta["epoch"]
        acc = meta.setdefault("partial", {"loss_sum": 0.0, "n": 0, "seconds": 0.0})
        stats = train_one_epoch(
            model, opt, sched, data, cfg, epoch, meta["step"], acc, on_step, net, dist_
        )
        if stats["stopped"]:
            if main_rank:
                print(f"time budget spent; resume with --resume (epoch {epoch})", file=sys.stderr)
            return {"stopped": True, **meta}
        t_eval = time.perf_counter()
        # dev evaluation on rank 0 alone: corpus BLEU/CIDEr need every caption in one place,
        # and it is a small part of an epoch; its score decides best/patience on every rank
        dev = {}
        if main_rank:
            dev = evaluate_dev(
                model, data, DecodeConfig(beam_size=cfg.dev_beam), precision=cfg.train_precision
            )
        (score,) = distributed.broadcast(dist_, [dev.get(SELECT_METRIC, 0.0)])
        record = {
            "epoch": epoch,
            "train_loss": round(stats["train_loss"], 4),
            **{k: round(v, 4) for k, v in dev.items()},
            **epoch_timing(stats, sched, t_eval),
        }
        meta["history"].append(record)
        if main_rank:
            tqdm.write(json.dumps(record))
        if score > meta["best_score"]:
            meta.update(best_score=score, best_epoch=epoch, bad_epochs=0)
            if main_rank:
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            meta["bad_epochs"] += 1
        meta.update(epoch=epoch + 1, step=0)
        meta.pop("partial")
        checkpoint(meta)  # the commit point of this epoch
        if main_rank:
            atomic_write_json(out / STATE_DIR / "history.json", meta["history"])  # to watch a run
    if export_last:  # the weights as the latest finished epoch left them
        meta = {**meta, "best_epoch": last_epoch(meta, out)}
        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if main_rank:
        if best is None:
            raise ValueError(
                f"no epoch of the run in {out} has finished yet (epochs={cfg.epochs}); "
                "nothing to export"
            )
        model.load_state_dict(best)
        block = finetune.export_block(out, model, cfg.encoder)  # None unless --finetune
        history, best_epoch = staged_history(cfg, meta)
        export_bundle(
            out,
            finetune.decoder_of(model),
            data.vocab,
            cfg=cfg,
            dcfg=dcfg,
            history=history,
            best_epoch=best_epoch,
            commit=git_commit(),
            dataset=ds,
            encoder_sha256=data.encoder_sha256,
            encoder_runtime=data.encoder_runtime,
            encoder_precision=data.encoder_precision,
            select_metric=SELECT_METRIC,
            encoder_block=block,
        )
        write_card(out)
    distributed.barrier(dist_)
    return {"stopped": False, **meta}
