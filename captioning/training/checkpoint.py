"""The checkpoint of a run: ONE safetensors file holding everything a resume needs.

``out/train_state/state.safetensors`` is written atomically (fsync, then rename). Its tensors are
the model (``model.*``), AdamW's moments (``opt.<param>.<name>``), torch's RNG of each rank
(``rng.torch``, ``rng.torch.<rank>``) and the best epoch's weights (``best.*``); everything else
(epoch, step, history, best epoch, settings, schedule, param groups) is JSON in the file's
metadata. A crash therefore leaves either the previous checkpoint or the new one, never the
weights of one with the bookkeeping of another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from captioning.core.files import atomic_save_safetensors
from captioning.training.distributed import rank_seed

STATE_DIR = "train_state"  # inside --out: the resumable run
STATE_FILE = "state.safetensors"  # the whole checkpoint, one atomic file
STATE_FORMAT = "captioning-train-state-v2"


def state_path(out: Path) -> Path:
    return out / STATE_DIR / STATE_FILE


def has_state(out: Path) -> bool:
    return state_path(out).is_file()


def rng_key(rank: int) -> str:
    return "rng.torch" if rank == 0 else f"rng.torch.{rank}"


def save_state(
    out: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    meta: dict,
    best: dict[str, torch.Tensor] | None,
    rng: list[torch.Tensor] | None = None,
) -> None:
    """Write the whole run state atomically; ``rng``: every rank's RNG state in rank order
    (default: this process's)."""
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
    atomic_save_safetensors(
        state_path(out), tensors, metadata={"format": STATE_FORMAT, "meta": json.dumps(meta)}
    )


def read_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the checkpoint in ``out``; ValueError for a damaged file or one that
    is not a training state of this program."""
    path = state_path(out)
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is damaged ({e}); pass --force to start the run again") from e
    if header.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path} is not a training state of this program (format "
            f"{header.get('format')!r}, expected {STATE_FORMAT!r}); pass --force to replace it"
        )
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged: its run metadata is unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is damaged: its run metadata is not a JSON object")
    return meta, tensors


def apply_state(
    meta: dict,
    tensors: dict[str, torch.Tensor],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Restore model, optimizer, schedule and this rank's RNG from a read state; returns the
    best epoch's weights (None when the state holds none)."""
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
    return best or None


def load_state(
    out: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Read the checkpoint in ``out`` and restore it; returns (meta, best or None)."""
    meta, tensors = read_state(out)
    return meta, apply_state(meta, tensors, model, opt, sched, rank)
