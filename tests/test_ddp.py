"""Multi-process training under torchrun: 2 processes train exactly like 1 on the same batches.

Two ranks joined by gloo on loopback run ``python -m captioning train``: forked from the test
with torchrun's environment (fast: torch is imported once), and once through the real
``torchrun --standalone --nproc_per_node 2 -m captioning``. The global batch (7 images) is split
across the ranks, 4 + 3; the last batch of an epoch has a single image, so rank 1 gets an empty
share there. Dropout is 0, because each rank draws its own dropout masks: with dropout, runs
agree in distribution only.

Tolerance: the per-step loss within 1e-5 relative and the fp32 weights within 1e-4 absolute;
only the order of floating-point sums differs (shards, the gradient all-reduce).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioning.training import distributed

REPO = Path(__file__).resolve().parents[1]
SMALL = {"embed_dim": 32, "hidden_dim": 64, "attn_dim": 32, "dropout": 0.0}
STEP_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
# The attention score's bias shifts every logit of a softmax equally: its true gradient is 0, so
# it only ever receives rounding noise, which AdamW turns into full-size steps of either sign.
NOISE_ONLY = ("att_v.bias",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """22 train images (3 batches of 7, then 1), their features cached once for every run."""
    from captioning.data import load_flickr8k
    from captioning.models.encoders import build_encoder
    from captioning.runtime.features import FeatureCache, extract
    from tests.synthetic import make_tiny_flickr

    root = tmp_path_factory.mktemp("ddp")
    data = make_tiny_flickr(root / "flickr", sizes={"train": 22, "dev": 4, "test": 1})
    ds = load_flickr8k(data)
    enc = build_encoder("resnet50", "fp32")
    cache = root / "cache"
    names = ds.splits["train"] + ds.splits["dev"]
    extract(enc, [(n, ds.image_path(n)) for n in names], FeatureCache.for_encoder(enc, cache))
    return data, cache


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank, forked from this test (torch already imported): torchrun's environment, then
    ``python -m captioning ARGV``. Ranks other than 0 may not write: every atomic write of the
    project ends in ``os.replace`` (``captioning.core.files``), so such a write fails the run.
    """
    from captioning import cli
    from captioning.core import files as fileio

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if rank:

        def refuse(src, dst):
            raise RuntimeError(f"rank {rank} wrote {dst}")

        fileio.os.replace = refuse
    sys.exit(cli.main(argv))


def run_ranks(argv: list[str], world: int = 2, timeout: float = 600) -> None:
    """``world`` processes joined by gloo on loopback, each running ``python -m captioning``."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, argv)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"exit codes {codes}"


def _collectives(rank: int, world: int, port: int, results) -> None:
    """One rank joins the group torchrun's environment describes and runs every collective."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    d = distributed.from_env()
    torch.manual_seed(100 + rank)
    rngs = distributed.gather_rng(d)
    results.put(
        (
            rank,
            d.owns_group,
            distributed.all_sum(d, rank + 0.5),
            distributed.broadcast(d, [rank + 1.0, 7.0 * rank]),
            [torch.equal(r, rngs[rank]) for r in rngs],
        )
    )
    distributed.barrier(d)
    distributed.close(d)


def test_one_process_needs_no_group_and_shards_cover_the_batch_in_order(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = distributed.from_env()
    assert one == distributed.ONE and one.is_main and not one.enabled
    assert distributed.all_sum(one, 2.5) == 2.5 and distributed.broadcast(one, [1.5]) == [1.5]
    (rng,) = distributed.gather_rng(one)
    assert torch.equal(rng, torch.get_rng_state())
    distributed.barrier(one)
    distributed.close(one)
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [distributed.shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.shard([0], 1, 2) == []  # fewer images than ranks: an empty share
    seeds = {distributed.rank_seed(0, r, e) for r in (1, 2, 3) for e in (0, 1)}
    assert len(seeds) == 6


def test_two_ranks_share_sums_rank_zeros_decisions_and_every_rng():
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_collectives, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank, owns, total, decided, same in got:
        assert owns and total == 2.0 and decided == [1.0, 0.0]  # rank 0's values everywhere
        assert same[rank] and not same[1 - rank]  # each rank's own RNG state, in rank order


def train_flags(data: Path, cache: Path, decoder: str = "attention") -> list[str]:
    flags = ["train", "--encoder", "resnet50", "--decoder", decoder, "--data", str(data)]
    flags += ["--cache", str(cache), "--epochs", "2", "--batch-images", "7", "--lr", "0.1"]
    return flags + ["--precision", "fp32"] + [f"--set={k}={v}" for k, v in SMALL.items()]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run_and_resume(world, tmp_path):
    from captioning.cli import main as cli
    from captioning.training.checkpoint import read_state

    flags = train_flags(*world)
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli([*flags, "--out", str(one)]) == 0

    run_ranks([*flags, "--out", str(two), "--max-minutes", "1e-9"])  # rank 0 stops both
    meta, tensors = read_state(two)
    assert (meta["epoch"], meta["step"], meta["world_size"]) == (1, 1, 2)
    assert {"rng.torch", "rng.torch.1"} <= tensors.keys()  # each rank resumes its own stream
    assert not (two / "decoder.safetensors").exists()
    run_ranks([*flags, "--out", str(two), "--resume"])

    (m1, t1), (m2, t2) = read_state(one), read_state(two)
    steps1, steps2 = m1["step_losses"], m2["step_losses"]
    assert [s[:2] for s in steps1] == [[e, s] for e in (1, 2) for s in range(1, 5)]
    assert [s[:2] for s in steps2] == [s[:2] for s in steps1]
    assert [s[2] for s in steps2] == pytest.approx([s[2] for s in steps1], rel=STEP_RTOL)
    assert steps1[-1][2] < steps1[0][2] - 0.1  # it learns: not a comparison of constants
    for k in t1:
        if k.startswith(("model.", "best.")) and k.split(".", 1)[1] not in NOISE_ONLY:
            torch.testing.assert_close(t2[k], t1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    assert m2["best_epoch"] == m1["best_epoch"] and m2["world_size"] == 2
    h1, h2 = m1["history"], m2["history"]
    assert [h["train_loss"] for h in h2] == pytest.approx([h["train_loss"] for h in h1], abs=1e-4)
    assert [h["dev_cider"] for h in h2] == pytest.approx([h["dev_cider"] for h in h1], abs=0.01)
    assert (two / "decoder.safetensors").is_file() and (two / "card.md").is_file()


@pytest.mark.slow
def test_torchrun_runs_the_cli(world, tmp_path):
    """The real launcher: ``torchrun --standalone --nproc_per_node 2 -m captioning train``."""
    from captioning import Captioner
    from captioning.training.checkpoint import read_state

    out = tmp_path / "tr"
    flags = train_flags(*world, decoder="inject")
    flags[flags.index("--epochs") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "captioning", *flags, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"best_epoch": 1') == 1  # rank 0 alone prints the summary
    meta, tensors = read_state(out)
    assert meta["world_size"] == 2 and "rng.torch.1" in tensors
    cap = Captioner.load(out, precision="fp32", runtime="torch")
    assert cap.caption(world[0] / "Images" / "0000_synthetic.png").text
