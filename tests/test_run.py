"""The run skeleton's policies, fast: resume settings, time budget, best epoch and patience, the
run directory, the checkpoint file, and a whole run (a real objective on a linear model) that is
stopped after every batch and resumed until it ends exactly as an uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from captioning.training.checkpoint import STATE_DIR, STATE_FILE, read_state
from captioning.training.objective import Objective
from captioning.training.run import (
    Budget,
    Run,
    check_export,
    check_out,
    check_settings,
    judge_epoch,
    keep_training,
    last_epoch,
    snapshot,
)
from captioning.training.train import TrainConfig
from captioning.training.warmstart import staged_history
from captioning.training.xe import RESUME_FREE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resume_settings_check_lets_only_the_free_settings_change(tmp_path):
    saved = asdict(TrainConfig(epochs=3))
    free_changes = TrainConfig(epochs=3, patience=9, max_minutes=5.0, checkpoint_minutes=1.0)
    check_settings(tmp_path, saved, free_changes, RESUME_FREE)
    with pytest.raises(ValueError, match="other settings.*resume with the same flags"):
        check_settings(tmp_path, saved, TrainConfig(epochs=4), RESUME_FREE)  # the LR schedule
    with pytest.raises(ValueError, match="other settings"):
        check_settings(tmp_path, saved, TrainConfig(epochs=3, lr=1.0), RESUME_FREE)
    lacking = {k: v for k, v in saved.items() if k != "label_smoothing"}  # counts as the default
    check_settings(tmp_path, lacking, TrainConfig(epochs=3), RESUME_FREE)
    with pytest.raises(ValueError, match="other settings"):
        check_settings(tmp_path, lacking, TrainConfig(epochs=3, label_smoothing=0.1), RESUME_FREE)


def test_the_time_budget_and_the_periodic_checkpoint_follow_the_clock():
    now = [100.0]
    budget = Budget(max_minutes=2.0, checkpoint_minutes=0.5, clock=lambda: now[0])
    assert not budget.spent() and not budget.checkpoint_due()
    now[0] += 31
    assert budget.checkpoint_due() and not budget.spent()
    budget.checkpointed()
    assert not budget.checkpoint_due()
    now[0] += 89
    assert not budget.spent()  # 120 s: not more than 2 minutes yet
    now[0] += 1
    assert budget.spent() and budget.checkpoint_due()
    unlimited = Budget(max_minutes=0.0, checkpoint_minutes=3.0, clock=lambda: now[0])
    now[0] += 1e6
    assert not unlimited.spent()


def test_the_best_epoch_and_patience():
    meta = {"epoch": 1, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0}
    kept = []
    for score in (0.3, 0.5, 0.5, 0.4, 0.9):
        if not keep_training(meta, epochs=10, patience=2):
            break
        kept.append(judge_epoch(meta, "best_score", score, meta["epoch"]))
        meta["epoch"] += 1
    assert kept == [True, True, False, False]  # a tie is no improvement; then patience ran out
    assert (meta["best_score"], meta["best_epoch"], meta["bad_epochs"]) == (0.5, 2, 2)
    assert not keep_training({"epoch": 11, "bad_epochs": 0}, epochs=10, patience=2)
    model = nn.Linear(2, 1)
    best = snapshot(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(best["weight"], model.weight)  # a copy, not a view


def test_the_run_directory_and_the_export_flags(tmp_path, capsys):
    out = tmp_path / "out"
    assert check_out(out, resume=False, force=False) is False  # absent: a new run
    assert check_out(out, resume=True, force=False) is False
    assert "no run in" in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--resume.*--force"):
        check_out(out, resume=False, force=False)
    with pytest.raises(ValueError, match="holds no training run"):
        check_out(out, resume=True, force=False)
    with pytest.raises(ValueError, match="exclude each other"):
        check_out(out, resume=True, force=True)
    assert check_out(out, resume=False, force=True) is False
    with pytest.raises(ValueError, match="choose one"):
        check_export(True, True, resume=True)
    with pytest.raises(ValueError, match="pass --resume"):
        check_export(False, True, resume=False)
    assert last_epoch({"epoch": 3, "step": 0}, out) == 2
    with pytest.raises(ValueError, match="stopped inside epoch 3"):
        last_epoch({"epoch": 3, "step": 2}, out)
    with pytest.raises(ValueError, match="has finished yet"):
        last_epoch({"epoch": 1, "step": 0}, out)


def test_a_warm_started_run_continues_its_bundles_history():
    mine = {"history": [{"epoch": 1, "dev_cider": 5.0}, {"epoch": 2, "dev_cider": 6.0}]}
    assert staged_history(TrainConfig(), {**mine, "best_epoch": 2}) == (mine["history"], 2)
    earlier = [{"stage": "xe", "epoch": 1}, {"stage": "xe", "epoch": 3}]
    meta = {**mine, "best_epoch": 2, "init_history": earlier}
    history, best = staged_history(TrainConfig(finetune="layer4"), meta)
    assert best == 5 and history[:2] == earlier
    assert [(h["stage"], h["epoch"], h["stage_epoch"]) for h in history[2:]] == [
        ("finetune", 4, 1),
        ("finetune", 5, 2),
    ]


# ---------------------------------------------------------------- a whole run


@dataclass
class ToyConfig:
    seed: int = 0
    epochs: int = 3
    patience: int = 5
    batch_images: int = 4
    grad_clip: float = 1.0
    lr: float = 0.05
    max_minutes: float = 0.0
    checkpoint_minutes: float = 100.0


class Toy(Objective):
    """Regression of a fixed linear map on 10 inputs with noise from torch's RNG, so a resumed
    run matches only if weights, AdamW moments, schedule, RNG and epoch sums all come back."""

    resume_free = ("max_minutes", "checkpoint_minutes")
    logs_step_losses = True

    def __init__(self, cfg: ToyConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.model = cfg, nn.Linear(3, 1)
        g = torch.Generator().manual_seed(1)
        self.x = {f"im{i}": torch.randn(3, generator=g) for i in range(10)}  # [3] each
        self.y = {n: float(v @ torch.tensor([1.0, -2.0, 0.5])) for n, v in self.x.items()}
        self.data = SimpleNamespace(train_images=sorted(self.x))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1 / (1 + 0.1 * s))

    def fresh_state(self):
        meta = {"epoch": 1, "step": 0, "history": [], "best_score": -1e9, "best_epoch": 0}
        meta.update(bad_epochs=0, train_config=asdict(self.cfg), step_losses=[])
        return meta, None

    def step(self, names):
        x = torch.stack([self.x[n] for n in names]) + 0.1 * torch.randn(len(names), 3)  # [B, 3]
        y = torch.tensor([self.y[n] for n in names])  # [B]
        return ((self.model(x).squeeze(1) - y) ** 2).mean(), {}

    def account(self, acc, names, loss, stats):
        acc["loss_sum"] += float(loss.detach()) * len(names)
        acc["n"] += len(names)
        return float(loss.detach())

    def epoch_stats(self, acc):
        return {"train_loss": acc["loss_sum"] / acc["n"]}

    def dev_score(self):
        with torch.no_grad():
            x = torch.stack(list(self.x.values()))  # [10, 3]
            err = ((self.model(x).squeeze(1) - torch.tensor(list(self.y.values()))) ** 2).mean()
        return {"dev_cider": -float(err)}

    def record(self, meta, epoch, stats):
        return {"epoch": epoch, "train_loss": stats["train_loss"]}


def finished_run(out, **kw) -> tuple[int, dict, dict]:
    """Run (resuming) until the run ends: (calls that stopped, meta, tensors of the state)."""
    stops = 0
    while True:
        run = Run(out, Toy(ToyConfig(**kw)))
        run.begin(resuming=stops > 0, force=False)
        if not run.train():
            return stops, *read_state(out)
        stops += 1


def test_a_run_stopped_after_every_batch_ends_as_if_never_stopped(tmp_path):
    _, straight, a = finished_run(tmp_path / "straight")
    stops, resumed, b = finished_run(tmp_path / "resumed", max_minutes=1e-9)
    assert stops == 9  # 3 epochs of 3 batches, one batch a call
    assert a.keys() == b.keys() and {"best.weight", "rng.torch", "opt.0.exp_avg"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["step_losses"] == straight["step_losses"]
    assert [s[:2] for s in straight["step_losses"]] == [
        [e, s] for e in (1, 2, 3) for s in (1, 2, 3)
    ]
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]
    assert straight["history"][-1]["train_loss"] < straight["history"][0]["train_loss"]
    best = max(straight["history"], key=lambda h: h["dev_cider"])["epoch"]
    assert resumed["best_epoch"] == straight["best_epoch"] == best
    watched = json.loads((tmp_path / "resumed" / STATE_DIR / "history.json").read_text())
    assert watched == resumed["history"]
    with pytest.raises(ValueError, match="other settings"):
        Run(tmp_path / "resumed", Toy(ToyConfig(lr=0.5))).begin(resuming=True, force=False)


def test_a_foreign_or_damaged_state_is_refused_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    finished_run(out, epochs=1)
    state = out / STATE_DIR / STATE_FILE
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="is damaged.*--force"):
        Run(out, Toy(ToyConfig(epochs=1))).begin(resuming=True, force=False)
    save_file({"w": torch.zeros(2)}, str(state), metadata={"format": "another-program"})
    with pytest.raises(ValueError, match="not a training state of this program.*another-program"):
        read_state(out)
    save_file({"w": torch.zeros(2)}, str(state))
    with pytest.raises(ValueError, match="not a training state"):
        read_state(out)
