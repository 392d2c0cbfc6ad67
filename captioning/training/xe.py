"""Cross-entropy training on cached features: teacher forcing, AdamW, warmup + cosine LR.

:class:`CrossEntropy` is the objective a :class:`captioning.training.run.Run` drives: each step
is one teacher-forced batch (every caption of ``batch_images`` images), its dev score the dev
CIDEr-D of greedy (or ``dev_beam``) captions. Under ``torchrun`` every rank trains on its
contiguous share of the same global batch through DistributedDataParallel, with the loss
weighted so that the step equals one process's step on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from captioning.bundle.history import SELECT_METRIC
from captioning.core.machine import device_scope, resolve_device, resolve_precision
from captioning.data import load_dataset
from captioning.models.blocks import load_block_weights
from captioning.models.decoders import Decoder, DecoderConfig, caption_loss
from captioning.models.decoding import DecodeConfig
from captioning.models.encoders import get_spec
from captioning.training import distributed, finetune
from captioning.training.config import TrainConfig
from captioning.training.data import TrainData, batch_counts, make_batch, prepare_data
from captioning.training.distributed import Dist
from captioning.training.objective import Objective, evaluate_dev
from captioning.training.warmstart import init_history, staged_history, warm_start

# may change on --resume (patience decides only when to stop); ``epochs`` may not: the LR schedule
# is planned once for the whole run
RESUME_FREE = ("max_minutes", "checkpoint_minutes", "device", "patience")


def decoder_config(cfg: TrainConfig, vocab_size: int) -> DecoderConfig:
    spec = get_spec(cfg.encoder)
    base = DecoderConfig(kind=cfg.decoder, vocab_size=vocab_size)
    base.feat_dim = spec.grid_channels if base.uses_grid else spec.pooled_dim
    return DecoderConfig.from_dict({**base.to_dict(), **cfg.decoder_cfg})


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def batches_per_epoch(cfg: TrainConfig, data: TrainData) -> int:
    return math.ceil(len(data.train_images) / cfg.batch_images)


class TeacherForcing(nn.Module):
    """One training forward pass as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, feats, owner, tokens):  # feats [N, ...], owner [B], tokens [B, T]
        d = self.decoder
        return d(d.select(d.context(feats), owner), tokens)  # logits [B, T-1, V], alphas


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


def load_data(cfg: TrainConfig, data_dir: str | None, cache: Path | None, dist_: Dist):
    """(dataset, train data): one process per node extracts missing features, the others
    then find them cached."""
    ds = load_dataset(data_dir)
    data = None
    if dist_.local_rank == 0:
        data = prepare_data(ds, cfg, cache)
    distributed.barrier(dist_)
    if dist_.local_rank != 0:
        data = prepare_data(ds, cfg, cache)
    return ds, data


class CrossEntropy(Objective):
    """Teacher forcing with (label-smoothed) cross-entropy, plus the attention regulariser."""

    label, prefix, score_key = "epoch", "", "best_score"
    resume_free = RESUME_FREE
    logs_step_losses = True

    def __init__(
        self, cfg: TrainConfig, data_dir: str | None, cache: Path | None, dist_: Dist, warm: bool
    ) -> None:
        """Data, model (warm-started from ``cfg.init`` when ``warm``), optimizer, schedule."""
        device = resolve_device("cpu" if dist_.enabled and cfg.device == "auto" else cfg.device)
        if device != "cpu" and dist_.enabled:  # CUDA-only: torchrun training runs on the CPU
            raise ValueError("multi-process (torchrun) training runs on the CPU; pass --device cpu")
        # features are extracted where the model trains
        self.dataset, self.data = load_data(replace(cfg, device=device), data_dir, cache, dist_)
        self.cfg, self.dist, self.vocab = cfg, dist_, self.data.vocab
        self.dcfg = decoder_config(cfg, len(self.vocab))
        model = finetune.trainable_model(cfg, self.dcfg)  # the decoder, or block + decoder
        self.init_rows: list[dict] = []
        if cfg.init and warm:  # a resumed run has its own weights in its state
            decoder_state, block_state = warm_start(cfg, self.data, self.dcfg)
            finetune.decoder_of(model).load_state_dict(decoder_state)
            if block_state is not None:
                load_block_weights(model.block, model.spec, block_state)
            self.init_rows = init_history(cfg.init)
        self.model = model.to(device)
        self.device = next(self.model.parameters()).device  # the batches follow the model
        self.autocast = resolve_precision(cfg.train_precision, self.device.type).autocast()
        self.opt = torch.optim.AdamW(finetune.param_groups(self.model, cfg), lr=cfg.lr)
        total = batches_per_epoch(cfg, self.data) * cfg.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total, cfg.warmup_steps)
        )
        self.net: nn.Module = TeacherForcing(self.model)

    def fresh_state(self) -> tuple[dict, None]:
        meta = {
            "epoch": 1,
            "step": 0,
            "history": [],
            "best_score": -1.0,
            "select_metric": SELECT_METRIC,
            "best_epoch": 0,
            "bad_epochs": 0,
            "train_config": asdict(self.cfg),
            "step_losses": [],
            "init_history": self.init_rows,
        }
        return meta, None

    def begin(self, meta: dict) -> None:
        meta["world_size"] = self.dist.world
        if self.dist.enabled:  # broadcasts rank 0's parameters; all-reduces (averages) gradients
            self.net = nn.parallel.DistributedDataParallel(self.net)

    def step(self, names: list[str]) -> tuple[torch.Tensor, dict]:
        """This rank's share of the global batch ``names``: the loss, weighted under torchrun
        (an empty share runs one image at weight 0, so every rank joins the all-reduce)."""
        d, cfg, model = self.dist, self.cfg, self.model
        mine = distributed.shard(names, d.rank, d.world) if d.enabled else names
        batch = make_batch(self.data, mine or names[:1], model.cfg.uses_grid)
        feats, owner, tokens = (t.to(self.device) for t in batch)
        stats: dict = {"captions": len(owner), "share": 1.0}
        with self.autocast, device_scope(str(self.device)):
            logits, alphas = self.net(feats, owner, tokens)  # [B, T-1, V]
            if d.enabled:
                (n_tok, n_cap), (m_tok, m_cap) = (
                    batch_counts(self.data, names),
                    batch_counts(self.data, mine),
                )
                tok_share, cap_share = d.world * m_tok / n_tok, d.world * m_cap / n_cap
                smooth = cfg.label_smoothing
                loss, ce = shard_loss(
                    logits, tokens, alphas, model.cfg.alpha_c, tok_share, cap_share, smooth
                )
                stats.update(captions=n_cap, share=m_tok / n_tok)
            else:
                loss, ce = caption_loss(
                    logits, tokens, alphas, model.cfg.alpha_c, label_smoothing=cfg.label_smoothing
                )
        stats["ce"] = ce
        return loss, stats

    def account(self, acc: dict, names: list[str], loss: torch.Tensor, stats: dict) -> float:
        """Adds the global batch's cross-entropy (as one process would log it); returns it."""
        if self.dist.enabled:
            ce_value = distributed.all_sum(self.dist, float(stats["ce"]) * stats["share"])
        else:
            ce_value = float(stats["ce"])
        acc["loss_sum"] += ce_value * stats["captions"]
        acc["n"] += stats["captions"]
        return ce_value

    def postfix(self, acc: dict) -> dict[str, str]:
        return {
            "loss": f"{acc['loss_sum'] / acc['n']:.3f}",
            "lr": f"{self.sched.get_last_lr()[0]:.1e}",
        }

    def epoch_stats(self, acc: dict) -> dict:
        return {"train_loss": acc["loss_sum"] / max(acc["n"], 1)}

    def dev_score(self) -> dict[str, float]:
        decoding = DecodeConfig(beam_size=self.cfg.dev_beam)
        return evaluate_dev(self.model, self.data, decoding, precision=self.cfg.train_precision)

    def record(self, meta: dict, epoch: int, stats: dict) -> dict:
        return {"epoch": epoch, "train_loss": round(stats["train_loss"], 4)}

    def bundle_history(self, meta: dict) -> tuple[list[dict], int]:
        return staged_history(self.cfg, meta)
