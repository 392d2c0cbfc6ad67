"""What a training objective gives a run: one batch's loss, its bookkeeping, its dev score.

Cross-entropy (``training.xe``) and self-critical training (``training.scst``) differ only in
these; :class:`Objective` runs the epoch both share (a fixed order of the train images per epoch,
one optimizer step per batch, gradient clipping, the schedule), and :func:`evaluate_dev` scores
the dev split for both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from captioning.core.machine import device_scope, resolve_precision
from captioning.data import CaptionDataset
from captioning.data.vocab import Vocabulary
from captioning.models.bleu import corpus_bleu_scores
from captioning.models.coco import coco_scores
from captioning.models.decoders import Decoder, DecoderConfig, caption_loss
from captioning.models.decoding import DecodeConfig, decode
from captioning.training.data import TrainData, epoch_order, make_batch
from captioning.training.distributed import ONE, Dist

# on_step(step, logged loss or None) -> True to stop the epoch here (the time budget is spent)
OnStep = Callable[[int, float | None], bool]


class Objective:
    """One objective's parts of a run; :class:`captioning.training.run.Run` drives it.

    A subclass sets the attributes in its constructor and implements :meth:`step`,
    :meth:`account`, :meth:`dev_score`, :meth:`fresh_state` and :meth:`record`.
    """

    cfg: Any  # a dataclass config with seed, epochs, patience, batch_images, grad_clip, ...
    model: nn.Module  # what the optimizer trains (a decoder, or block + decoder)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    data: TrainData
    dataset: CaptionDataset
    vocab: Vocabulary  # the bundle's vocabulary
    dcfg: DecoderConfig
    dist: Dist = ONE
    label: str = "epoch"  # the progress bar's: "<label> <epoch>"
    prefix: str = ""  # in messages: "resumed <prefix>at epoch ..."
    score_key: str = "best_score"  # the state's key for the best dev score so far
    resume_free: tuple[str, ...] = ()  # settings that may change on --resume
    logs_step_losses: bool = False  # keep [epoch, step, loss] of every step in the state

    # ------------------------------------------------------------ what a subclass supplies

    def step(self, names: list[str]) -> tuple[torch.Tensor, dict]:
        """The loss of the batch of train images ``names`` (not yet backpropagated) and what
        :meth:`account` needs of it."""
        raise NotImplementedError

    def account(self, acc: dict, names: list[str], loss: torch.Tensor, stats: dict) -> float | None:
        """Add a trained batch to the epoch's running sums ``acc``; returns the loss to log
        for this step (None: the objective logs none)."""
        raise NotImplementedError

    def new_acc(self) -> dict:
        """The running sums of an epoch that has not started (they are kept in the state)."""
        return {"loss_sum": 0.0, "n": 0, "seconds": 0.0}

    def postfix(self, acc: dict) -> dict[str, str]:
        """The progress bar's figures."""
        return {}

    def epoch_stats(self, acc: dict) -> dict:
        """The epoch's figures from its running sums (besides samples and seconds)."""
        return {}

    def fresh_state(self) -> tuple[dict, dict[str, torch.Tensor] | None]:
        """(meta, best weights or None) of a run that starts now."""
        raise NotImplementedError

    def begin(self, meta: dict) -> None:
        """Called once the state is fresh or resumed, before the first step."""

    def dev_score(self) -> dict[str, float]:
        """The dev split's scores of the model as it is now (``SELECT_METRIC`` among them)."""
        raise NotImplementedError

    def record(self, meta: dict, epoch: int, stats: dict) -> dict:
        """The history row of a finished epoch, up to the dev scores and timing."""
        raise NotImplementedError

    def history_epoch(self, meta: dict, epoch: int) -> int:
        """The number of the run's epoch ``epoch`` in the state's history."""
        return epoch

    def bundle_history(self, meta: dict) -> tuple[list[dict], int]:
        """(history, best epoch) as the exported bundle records them."""
        return meta["history"], meta["best_epoch"]

    # ------------------------------------------------------------ the epoch both share

    def train_one_epoch(self, epoch: int, start_step: int, acc: dict, on_step: OnStep) -> dict:
        """One pass over the train images in this epoch's fixed order, from batch ``start_step``.

        ``acc`` carries a resumed epoch's running sums; ``on_step(step, loss)`` returns True to
        stop (the time budget): then the result is ``{"stopped": True}``.
        """
        cfg = self.cfg
        self.model.train()
        order = epoch_order(self.data.train_images, cfg.seed, epoch)
        n_batches = math.ceil(len(order) / cfg.batch_images)
        bar = tqdm(
            range(start_step, n_batches),
            desc=f"{self.label} {epoch}",
            unit="batch",
            leave=False,
            disable=not self.dist.is_main,
        )
        t0 = time.perf_counter() - acc["seconds"]
        for step in bar:
            names = order[step * cfg.batch_images : (step + 1) * cfg.batch_images]
            loss, stats = self.step(names)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            logged = self.account(acc, names, loss, stats)
            acc["seconds"] = time.perf_counter() - t0
            bar.set_postfix(**self.postfix(acc))
            if on_step(step + 1, logged):
                bar.close()
                return {"stopped": True}
        return {
            **self.epoch_stats(acc),
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
            logits, alphas = model(ctx, tokens)  # [B, T-1, V]
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


def epoch_timing(stats: dict, sched, eval_started: float) -> dict:
    """The history fields every stage records per epoch: lr, train and dev seconds, samples/s."""
    return {
        "lr": sched.get_last_lr()[0],
        "epoch_seconds": round(stats["seconds"], 1),
        "eval_seconds": round(time.perf_counter() - eval_started, 1),
        "samples_per_s": round(stats["samples"] / stats["seconds"], 1),
    }
