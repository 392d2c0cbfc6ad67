"""A bundle's training history (``history.json``): its epochs, their stages and the best epoch.

Training writes one dict per epoch: ``epoch``, ``train_loss``, ``dev_loss``, the dev scores
(``dev_bleu1..4``, ``dev_cider``, 0-100), ``lr``, ``epoch_seconds``, ``samples_per_s``; and, in a
bundle started from another (``train --init``), the ``stage`` of each epoch ("xe" cross-entropy,
"finetune" cross-entropy with the encoder's last block tuned, "scst" with the raw CIDEr-D
``reward`` of the sampled train captions) and the run's own ``stage_epoch``. A soup's history
holds its members' epochs, each tagged with the ``member`` run it belongs to.

``config.json`` records which epoch the bundle's weights come from (``best_epoch``) and the
history field that chose it (``select_metric``). ``history_lines`` gives the epochs ready to plot
(one line per run), ``training_summary`` one summary per line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from captioning.bundle.catalog import BundleInfo, resolve_bundle
from captioning.bundle.format import BundleError, read_config
from captioning.core.files import read_json

SELECT_METRIC = "dev_cider"
"""The history field a checkpoint is kept by (the best dev CIDEr-D epoch), as trained bundles
record it in ``select_metric``; it chooses the best epoch of a line whose bundle records none."""
STAGES = ("xe", "finetune", "scst")
MEMBER_SEP = " · "  # a soup member's line: "soup · member"
REWARD_SCALE = 100.0  # history.json keeps the SCST reward as a raw CIDEr-D; dev scores are ×100


def read_history(path: Path) -> list[dict]:
    """``history.json`` of a bundle: one dict per epoch (empty when absent or unreadable)."""
    try:
        data = read_json(path / "history.json")
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [r for r in data if isinstance(r, dict) and "epoch" in r]


def unmarked_stage(config: dict) -> str:
    """The stage of an epoch that names none: "finetune" when the run tuned its encoder block
    from the start (``train --finetune``), else "xe"."""
    return "finetune" if (config.get("train_config") or {}).get("finetune") else "xe"


def dev_beam(config: dict) -> int:
    """The beam training decoded the dev split with (1: greedy) for its dev scores."""
    return int((config.get("train_config") or {}).get("dev_beam", 1))


def line_name(bundle: BundleInfo, epoch: dict) -> str:
    """The line an epoch belongs to: the bundle, or ``"soup · member"`` for a soup's member."""
    member = epoch.get("member")
    return f"{bundle.name}{MEMBER_SEP}{member}" if member else bundle.name


def history_lines(bundle: BundleInfo) -> list[dict]:
    """The bundle's epochs ready to plot, in file order: each is the ``history.json`` row plus
    ``bundle`` (its name), ``line`` (``line_name``) and ``stage`` (``unmarked_stage`` where the
    row names none), with ``reward`` on the dev scores' ×100 scale."""
    unmarked = unmarked_stage(bundle.config)
    out = []
    for epoch in read_history(bundle.path):
        row = {**epoch, "bundle": bundle.name, "line": line_name(bundle, epoch)}
        row["stage"] = epoch.get("stage") or unmarked
        if isinstance(row.get("reward"), int | float):
            row["reward"] = row["reward"] * REWARD_SCALE
        out.append(row)
    return out


def best_epoch(epochs: list[dict], metric: str = SELECT_METRIC) -> int | None:
    """The epoch training keeps: the first with the highest ``metric`` (None if none has it)."""
    scored = [e for e in epochs if isinstance(e.get(metric), int | float)]
    if not scored:
        return None
    return int(max(scored, key=lambda e: e[metric])["epoch"])  # max keeps the first of equals


def _recorded(config: dict) -> tuple[int | None, str | None]:
    epoch = config.get("best_epoch")
    return (int(epoch) if isinstance(epoch, int) else None), config.get("select_metric")


def _member_config(bundle: BundleInfo, member: str) -> dict:
    """The config of a soup's member run when its bundle lies beside the soup, else {} (also
    when the soup took the member's name: it records no epoch of its own)."""
    try:
        path = resolve_bundle(member, bundle.path.parent)
        return {} if path.resolve() == bundle.path.resolve() else read_config(path)
    except BundleError:
        return {}


def line_best_epoch(bundle: BundleInfo, line: str, epochs: list[dict]) -> int | None:
    """The epoch a line's weights come from: the one its bundle records (``best_epoch``), else
    the best of the ``select_metric`` it records (``SELECT_METRIC`` when none does).

    A soup's member line reads the member's bundle when it lies beside the soup.
    """
    config = bundle.config
    if line != bundle.name:
        config = _member_config(bundle, line.removeprefix(bundle.name + MEMBER_SEP))
    epoch, metric = _recorded(config)
    if epoch is not None:
        return epoch
    return best_epoch(epochs, metric or bundle.config.get("select_metric") or SELECT_METRIC)


@dataclass(frozen=True)
class LineSummary:
    """One line of a bundle's history: how long it trained and the epoch its weights come from."""

    line: str
    epochs: int  # the last epoch number
    stages: dict[str, int] = field(default_factory=dict)  # epochs per stage, in order
    best_epoch: int | None = None
    dev_bleu4: float | None = None  # at the best epoch
    dev_cider: float | None = None
    epoch_seconds: float | None = None  # mean over the line's epochs
    samples_per_s: float | None = None

    @property
    def stages_label(self) -> str:
        """e.g. ``"8 xe + 5 finetune"``."""
        return " + ".join(f"{n} {stage}" for stage, n in self.stages.items())


def _mean(epochs: list[dict], key: str) -> float | None:
    values = [float(e[key]) for e in epochs if isinstance(e.get(key), int | float)]
    return fmean(values) if values else None


def training_summary(bundle: BundleInfo) -> list[LineSummary]:
    """One ``LineSummary`` per line of ``history_lines(bundle)``, in order."""
    by_line: dict[str, list[dict]] = {}
    for epoch in history_lines(bundle):
        by_line.setdefault(epoch["line"], []).append(epoch)
    out = []
    for line, epochs in by_line.items():
        best = line_best_epoch(bundle, line, epochs)
        row = next((e for e in reversed(epochs) if e["epoch"] == best), {})
        out.append(
            LineSummary(
                line=line,
                epochs=max(int(e["epoch"]) for e in epochs),
                stages=dict(Counter(e["stage"] for e in epochs)),
                best_epoch=best,
                dev_bleu4=row.get("dev_bleu4"),
                dev_cider=row.get("dev_cider"),
                epoch_seconds=_mean(epochs, "epoch_seconds"),
                samples_per_s=_mean(epochs, "samples_per_s"),
            )
        )
    return out
