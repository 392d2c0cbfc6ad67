"""``train``: a cross-entropy run (``training.xe``) in an output directory (``training.run``).

A checkpoint is one safetensors file (weights, AdamW moments, RNG, the best epoch's weights; the
rest as JSON in its metadata), written atomically every epoch and every few minutes; ``--resume``
continues with the same schedule, optimizer state, RNG state and data order. Under ``torchrun``
every rank runs :func:`main` (``training.distributed``); rank 0 alone evaluates dev and writes
checkpoints, history and the bundle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.training import distributed
from captioning.training.config import TrainConfig
from captioning.training.run import Run, check_export, check_out
from captioning.training.xe import CrossEntropy

__all__ = ["TrainConfig", "main"]


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
    same with its latest finished epoch. The result is the run's state, including
    ``step_losses``: ``[epoch, step, cross-entropy of the global batch]`` for every step of the
    run (kept in the checkpoint, so across resumes too), and ``stopped`` (the time budget ran
    out: resume to go on).
    """
    out = Path(out)
    dist_ = distributed.from_env()
    try:
        check_export(export_best, export_last, resume)
        resuming = check_out(out, resume, force)
        distributed.barrier(dist_)  # every rank has looked at ``out`` before rank 0 changes it
        torch.manual_seed(cfg.seed)
        objective = CrossEntropy(cfg, data_dir, cache, dist_, warm=not resuming)
        return Run(out, objective, dist_).execute(resuming, force, export_best, export_last)
    finally:
        distributed.close(dist_)
