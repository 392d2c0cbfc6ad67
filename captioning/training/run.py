"""A training run in an output directory: one loop and one checkpoint for every objective.

An output directory holds one model: a non-empty ``out`` is refused unless the run resumes the
training state in it (``--resume``) or ``--force`` replaces everything that belonged to the old
weights. The run checkpoints (``training.checkpoint``) at every epoch's end and every
``checkpoint_minutes``, and stops resumably once ``max_minutes`` are spent; a resumed run goes on
with the same schedule, optimizer state, RNG state and data order, and ends as if never stopped.
After each epoch the dev score decides the best weights and patience; at the end the best epoch
is exported as a bundle next to the state (``--export-best``/``--export-last``: an unfinished
run's best or latest finished epoch, without training and without touching its state).

Under ``torchrun`` every rank runs the loop; rank 0 alone evaluates dev, writes the state, the
history and the bundle, and its decisions (the time budget, the dev score) are broadcast.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from captioning.bundle.card import write_card
from captioning.bundle.export import export_bundle
from captioning.bundle.format import WEIGHT_FILES, clear_model_outputs
from captioning.bundle.history import SELECT_METRIC
from captioning.core.files import atomic_write_json
from captioning.core.machine import git_commit
from captioning.training import distributed, finetune
from captioning.training.checkpoint import (
    STATE_DIR,
    STATE_FILE,
    apply_state,
    has_state,
    read_state,
    save_state,
)
from captioning.training.distributed import ONE, Dist, rank_seed
from captioning.training.objective import Objective, epoch_timing

HISTORY_FILE = "history.json"  # in the state directory, rewritten every epoch: to watch a run

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


# ---------------------------------------------------------------- policies of a run


def check_settings(out: Path, saved: dict, cfg, free: Sequence[str]) -> None:
    """Refuse to resume the run in ``out`` (trained with ``saved``) under other settings than
    its own; the settings named in ``free`` may change. A field that ``saved`` lacks counts as
    its default."""
    then = {**asdict(type(cfg)()), **saved}
    now = asdict(cfg)
    if {k: v for k, v in then.items() if k not in free} != {
        k: v for k, v in now.items() if k not in free
    }:
        raise ValueError(
            f"{out} was trained with other settings: {saved}; resume with the same flags"
        )


class Budget:
    """A run's clock: the time budget (``max_minutes``; 0 = none) and the periodic checkpoint
    (every ``checkpoint_minutes``), both counted on ``clock`` (seconds) from construction."""

    def __init__(
        self,
        max_minutes: float,
        checkpoint_minutes: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_minutes, self.checkpoint_minutes, self.clock = (
            max_minutes,
            checkpoint_minutes,
            clock,
        )
        self.started = self.last_checkpoint = clock()

    def spent(self) -> bool:
        """True once the run has trained longer than ``max_minutes``."""
        return bool(self.max_minutes) and (self.clock() - self.started) / 60 > self.max_minutes

    def checkpoint_due(self) -> bool:
        return (self.clock() - self.last_checkpoint) / 60 > self.checkpoint_minutes

    def checkpointed(self) -> None:
        self.last_checkpoint = self.clock()


def judge_epoch(meta: dict, score_key: str, score: float, epoch: int) -> bool:
    """Count a finished epoch with dev ``score`` (``epoch``: its number in the history): True
    when it beats ``meta[score_key]``, which it then becomes (with ``best_epoch``; patience
    restarts), else one more bad epoch."""
    if score > meta[score_key]:
        meta.update({score_key: score, "best_epoch": epoch, "bad_epochs": 0})
        return True
    meta["bad_epochs"] += 1
    return False


def keep_training(meta: dict, epochs: int, patience: int) -> bool:
    """Whether the run goes on: epochs left and fewer bad epochs in a row than ``patience``."""
    return meta["epoch"] <= epochs and meta["bad_epochs"] < patience


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights as they are now."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the run


class Run:
    """The loop of one run in ``out``: resume or start, train epochs, export the best."""

    def __init__(self, out: Path, objective: Objective, dist_: Dist = ONE) -> None:
        self.out, self.obj, self.dist = out, objective, dist_
        self.meta: dict = {}
        self.best: dict[str, torch.Tensor] | None = None  # the best epoch's weights (rank 0)
        self.budget: Budget | None = None

    def execute(self, resuming: bool, force: bool, export_best: bool, export_last: bool) -> dict:
        """Start or resume, train (unless exporting) and export; the run's state with
        ``stopped`` (True: the time budget ran out, resume to go on)."""
        self.begin(resuming, force)
        if not (export_best or export_last) and self.train():
            return {"stopped": True, **self.meta}
        self.export(export_last)
        return {"stopped": False, **self.meta}

    def begin(self, resuming: bool, force: bool) -> None:
        obj, main = self.obj, self.dist.is_main
        if self.dist.rank:  # dropout masks differ between ranks; rank 0 keeps one stream
            torch.manual_seed(rank_seed(obj.cfg.seed, self.dist.rank, 0))
        if resuming:
            meta, tensors = read_state(self.out)
            check_settings(self.out, meta["train_config"], obj.cfg, obj.resume_free)
            self.best = apply_state(meta, tensors, obj.model, obj.opt, obj.sched, self.dist.rank)
            meta["train_config"] = asdict(obj.cfg)
            self.meta = meta
            if main:
                where = f"epoch {meta['epoch']}, batch {meta['step']}"
                print(f"resumed {obj.prefix}at {where}", file=sys.stderr)
        else:
            if force and main:
                clear_out(self.out)
            self.meta, self.best = obj.fresh_state()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        obj.begin(self.meta)

    def checkpoint(self, meta: dict) -> None:
        """Every rank's RNG, then (rank 0) the state with ``meta``; restarts the periodic clock."""
        rng = distributed.gather_rng(self.dist)  # every rank's, so each resumes its own stream
        if self.dist.is_main:
            obj = self.obj
            save_state(self.out, obj.model, obj.opt, obj.sched, meta, self.best, rng)
        if self.budget is not None:
            self.budget.checkpointed()

    def on_step(self, step: int, loss: float | None) -> bool:
        """After batch ``step``: a periodic checkpoint when due; True when the time budget is
        spent (rank 0 decides for all)."""
        meta, budget = self.meta, self.budget
        if self.obj.logs_step_losses and loss is not None:
            meta["step_losses"].append([meta["epoch"], step, round(loss, 7)])
        over, due = budget.spent(), budget.checkpoint_due()
        over, due = (bool(v) for v in distributed.broadcast(self.dist, [float(over), float(due)]))
        if over or due:
            self.checkpoint({**meta, "step": step})
        return over

    def train(self) -> bool:
        """Epochs until the last, patience, or the time budget (then True)."""
        obj, meta = self.obj, self.meta
        self.budget = Budget(obj.cfg.max_minutes, obj.cfg.checkpoint_minutes)
        while keep_training(meta, obj.cfg.epochs, obj.cfg.patience):
            epoch = meta["epoch"]
            acc = meta.setdefault("partial", obj.new_acc())
            stats = obj.train_one_epoch(epoch, meta["step"], acc, self.on_step)
            if stats["stopped"]:
                if self.dist.is_main:
                    msg = f"time budget spent; resume with --resume ({obj.prefix}epoch {epoch})"
                    print(msg, file=sys.stderr)
                return True
            self.end_epoch(epoch, stats)
        return False

    def end_epoch(self, epoch: int, stats: dict) -> None:
        """Dev score, history row, best weights and patience, then the epoch's checkpoint."""
        obj, meta, main = self.obj, self.meta, self.dist.is_main
        t_eval = time.perf_counter()
        # dev evaluation on rank 0 alone: corpus BLEU/CIDEr need every caption in one place,
        # and it is a small part of an epoch; its score decides best/patience on every rank
        dev = obj.dev_score() if main else {}
        (score,) = distributed.broadcast(self.dist, [dev.get(SELECT_METRIC, 0.0)])
        record = {
            **obj.record(meta, epoch, stats),
            **{k: round(v, 4) for k, v in dev.items()},
            **epoch_timing(stats, obj.sched, t_eval),
        }
        meta["history"].append(record)
        if main:
            tqdm.write(json.dumps(record))
        if judge_epoch(meta, obj.score_key, score, record["epoch"]) and main:
            self.best = snapshot(obj.model)
        meta.update(epoch=epoch + 1, step=0)
        meta.pop("partial")
        self.checkpoint(meta)  # the commit point of this epoch
        if main:
            atomic_write_json(self.out / STATE_DIR / HISTORY_FILE, meta["history"])

    def export(self, export_last: bool) -> None:
        """The best epoch's weights (``export_last``: the latest finished epoch's) as a bundle."""
        obj = self.obj
        if export_last:  # the weights as the latest finished epoch left them
            epoch = obj.history_epoch(self.meta, last_epoch(self.meta, self.out))
            self.meta = {**self.meta, "best_epoch": epoch}
            self.best = snapshot(obj.model)
        if self.dist.is_main:
            if self.best is None:
                raise ValueError(
                    f"no epoch of the run in {self.out} has finished yet "
                    f"(epochs={obj.cfg.epochs}); nothing to export"
                )
            obj.model.load_state_dict(self.best)
            export_run(self.out, obj, self.meta)
        distributed.barrier(self.dist)


def export_run(out: Path, obj: Objective, meta: dict) -> None:
    """Write the bundle of ``obj.model`` as it is (weights, vocabulary, config, history, card)."""
    block = finetune.export_block(out, obj.model, obj.cfg.encoder)  # None for a frozen encoder
    history, best_epoch = obj.bundle_history(meta)
    data = obj.data
    export_bundle(
        out,
        finetune.decoder_of(obj.model),
        obj.vocab,
        cfg=obj.cfg,
        dcfg=obj.dcfg,
        history=history,
        best_epoch=best_epoch,
        commit=git_commit(),
        dataset=obj.dataset,
        encoder_sha256=data.encoder_sha256,
        encoder_runtime=data.encoder_runtime,
        encoder_precision=data.encoder_precision,
        select_metric=SELECT_METRIC,
        encoder_block=block,
    )
    write_card(out)
