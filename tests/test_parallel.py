"""``caption`` with worker processes: the same captions in input order, bad files in place, a
failing worker is an error (never a hang), and the default plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.data.images import ImageLoadError
from captioning.serving.procs import (
    IMAGES_PER_PROC,
    WORKER_MEMORY,
    WorkerError,
    WorkerSpec,
    available_memory,
    caption_parallel,
    plan_procs,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-inject"


def test_plan_procs_is_one_per_core_per_images_and_per_memory():
    assert plan_procs(1000, cpus=2) == 2
    assert plan_procs(IMAGES_PER_PROC * 2 - 1, cpus=8) == 1  # too few images for a second
    assert plan_procs(IMAGES_PER_PROC * 3, cpus=8) == 3
    assert plan_procs(10_000, cpus=8, memory=2.5 * WORKER_MEMORY) == 2
    assert plan_procs(10_000, cpus=8, memory=0.1 * WORKER_MEMORY) == 1
    assert plan_procs(0, cpus=4) == 1


def test_available_memory_is_a_positive_byte_count_or_unknown():
    memory = available_memory()
    assert memory is None or memory > 2**20
    assert plan_procs(10_000, cpus=2, memory=memory) in (1, 2)


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped resnet50-inject bundle")
def test_workers_give_the_streams_captions_in_order_with_bad_files_in_place(tmp_path):
    from captioning.inference.captioner import Captioner

    bad = [tmp_path / f"broken{i}.jpg" for i in range(2)]
    for b in bad:
        b.write_bytes(b"\xff\xd8\xff not really a jpeg")
    photos = sorted(SAMPLES.glob("*.jpg"))
    files = [photos[0], bad[0], *photos[1:], bad[1], photos[0]]
    cap = Captioner.load(BUNDLE, precision="fp32", runtime="torch")
    want = dict(cap.caption_stream(files, 2, batch_size=2))
    spec = WorkerSpec(str(BUNDLE), "fp32", "torch", threads=1, beam=2, batch_size=2)
    got = list(caption_parallel(spec, files, procs=2, chunk=2))  # 4 chunks over 2 workers
    assert [src for src, _ in got] == files
    for src, res in got:
        if src in bad:
            assert isinstance(res, ImageLoadError) and src.name in str(res)
        else:
            assert [t for t, _ in res.nbest] == [t for t, _ in want[src].nbest]
            # one thread here, two there: the same sums in another order
            assert [s for _, s in res.nbest] == pytest.approx([s for _, s in want[src].nbest])
            assert res.attention is None


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_bundle_is_an_error_not_a_hang(tmp_path):
    spec = WorkerSpec(str(tmp_path / "no-such-bundle"), "fp32", "torch")
    with pytest.raises(WorkerError, match="no model bundle"):
        list(caption_parallel(spec, [SAMPLES / "chelsea.jpg"] * 3, procs=2, chunk=1))


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped resnet50-inject bundle")
def test_cli_procs_matches_one_process(tmp_path):
    files = [str(p) for p in sorted(SAMPLES.glob("*.jpg"))] * 2

    def run(procs: str) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-m", "captioning", "caption", "--model", str(BUNDLE), "--json",
             "--runtime", "torch", "--precision", "fp32", "--batch-size", "2", "--procs", procs,
             *files],
            capture_output=True, text=True, cwd=REPO, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    one, two = run("1"), run("2")
    assert [r["image"] for r in two] == files
    assert [r["caption"] for r in two] == [r["caption"] for r in one]
    assert [r["logprob"] for r in two] == pytest.approx([r["logprob"] for r in one], abs=1e-3)
