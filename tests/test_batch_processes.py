"""A ``batch`` run's processes and console.

A killed run leaves no process behind within seconds and its re-run loses and doubles no row;
the reaper that sees to it stops only the processes of its own run; the output folder's lock
keeps a second run out until the first one's processes are gone. By default the console shows
one progress bar and the summary; Ray's own lines come back with ``--verbose``.

The Ray runs caption copies of the sample photos with resnet50-attention at beam 1 on the torch
runtime; each ``batch`` runs in a session of its own, so that its processes (Ray's GCS, raylet,
agents and workers stay in it) are told apart from everyone else's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning.serving.batch_files import existing_rows, lock_out
from captioning.serving.reaper import start_time

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-attention"
FAST = ["--beam", "1", "--runtime", "torch"]
GONE_WITHIN_S = 20.0  # a killed run's processes must all have ended by then

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]
needs_bundle = pytest.mark.skipif(
    not BUNDLE.is_dir(), reason="shipped bundle resnet50-attention is absent"
)


# ---------------------------------------------------------------- processes


def _table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every live process (no zombies)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in "ZX":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``procs`` (pid, start time) still running, and their descendants."""
    table = _table()
    found = {pid for pid, start in procs if table.get(pid, (0, 0, None))[2] == start}
    frontier = found
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return {(pid, table[pid][2]) for pid in found if pid in table}


def session(sid: int) -> set[tuple[int, int]]:
    """The live processes of session ``sid``."""
    return {(pid, start) for pid, (_, s, start) in _table().items() if s == sid}


def reaper_of(driver: int) -> set[tuple[int, int]]:
    """The reaper a ``batch`` driver started (in a session of its own)."""
    return {
        (pid, start)
        for pid, (ppid, _, start) in _table().items()
        if ppid == driver and "captioning.serving.reaper" in cmdline(pid)
    }


def ray_dir(reaper: set[tuple[int, int]]) -> Path:
    (pid, _), *_ = reaper
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(args[args.index("--dir") + 1])


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_all(procs: set[tuple[int, int]]) -> None:
    """SIGKILL what is left of ``procs`` (a failed test's cleanup)."""
    for pid, _ in alive(procs):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the reaper, without Ray

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like Ray's agents once their raylet is gone
log = open(sys.argv[1], "w")
subprocess.Popen(["sleep", "600"], cwd="/")  # names nothing of the run: a descendant
time.sleep(600)
"""

DRIVER = """
import json, shutil, subprocess, sys, time
from pathlib import Path
from captioning.serving.batch_files import lock_out
from captioning.serving.ray_cluster import LocalRay

lock = lock_out(Path(sys.argv[1]))
local = LocalRay(hold=[lock]).__enter__()
run = Path(local.dir)
procs = [  # titled the way Ray titles its agents and workers
    subprocess.Popen(["ray::StubbornAgent", "-c", sys.argv[2], str(run / "agent.log")],
                     executable=sys.executable, start_new_session=True),
    subprocess.Popen(["ray::IDLE", "600"], executable=shutil.which("sleep"), cwd=run),
]
print(json.dumps({"dir": local.dir, "pids": [p.pid for p in procs]}), flush=True)
time.sleep(600)
"""


def _bystanders(run_dir: str, tmp_path: Path) -> list[subprocess.Popen]:
    """Processes of no run: a Ray-titled one in a sibling of the run's dir, and one of no Ray
    that looks into the run's dir (like a ``tail -f`` of a log)."""
    sleep = shutil.which("sleep")
    sibling = Path(run_dir + "-sibling")
    sibling.mkdir()
    return [
        subprocess.Popen(["ray::IDLE", "600"], executable=sleep, cwd=sibling),
        subprocess.Popen(["sleep", "600"], cwd=run_dir),
    ]


def test_the_reaper_of_a_killed_driver_stops_its_run_and_only_it(tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(out), STUBBORN],
        cwd=REPO,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    line = json.loads(driver.stdout.readline())
    run_dir, pids = line["dir"], line["pids"]
    run = {(pid, start_time(pid)) for pid in pids}
    wait_until(lambda: len(alive(run)) == 3, 10, "the stubborn process's child")
    members = alive(run)
    others = _bystanders(run_dir, tmp_path)
    try:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        killed_at = time.monotonic()
        with pytest.raises(RuntimeError, match="another batch run"):
            lock_out(out, wait_s=0.5)  # the reaper holds the lock while it works
        fd = lock_out(out, wait_s=GONE_WITHIN_S)
        took = time.monotonic() - killed_at
        os.close(fd)
        assert alive(members) == set()  # the lock is free once the run's processes are gone
        assert not Path(run_dir).exists()
        assert all(p.poll() is None for p in others)  # nothing of another run was touched
        print(f"reaper: {len(members)} processes stopped, lock free {took:.1f} s after the kill")
    finally:
        for p in others:
            p.kill()
            p.wait()
        kill_all(members)
        shutil.rmtree(run_dir + "-sibling", ignore_errors=True)


def test_a_finished_run_leaves_no_process_and_its_logs_only_when_asked(tmp_path):
    from captioning.serving.ray_cluster import LocalRay

    for keep in (False, True):
        with LocalRay(keep_logs=keep) as local:
            worker = subprocess.Popen(
                ["ray::IDLE", "600"], executable=shutil.which("sleep"), cwd=local.dir
            )
            reaper = local.reaper
            assert reaper.poll() is None and worker.poll() is None
        assert reaper.returncode == 0 and worker.wait(1) == -signal.SIGTERM
        assert Path(local.dir).exists() == keep
        shutil.rmtree(local.dir, ignore_errors=True)


def test_a_second_run_waits_for_the_lock_on_its_output_folder(tmp_path):
    out = tmp_path / "new" / "out"
    first = lock_out(out)  # makes the folder
    try:
        with pytest.raises(RuntimeError, match="use another --out"):
            lock_out(out, wait_s=0.3)
    finally:
        os.close(first)
    os.close(lock_out(out, wait_s=0))


# ---------------------------------------------------------------- batch on Ray

BAR = re.compile(r"^caption resnet50-attention: +\d+%\|.*\| (\d+)/(\d+) ")
RAY_LINE = re.compile(r"\b(INFO|WARNING)\b|^\[\S+ \S+ [IWE] \d+ \d+\]", re.M)


def photos(root: Path, copies: int) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for i in range(copies):
        for s in sorted(SAMPLES.glob("*.jpg")):
            shutil.copy(s, folder / f"{i:02d}-{s.name}")
    return folder


def batch(folder: Path, out: Path, *args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "captioning", "batch", "--model", str(BUNDLE), str(folder)]
    with log.open("wb") as err:
        return subprocess.Popen(
            [*cmd, "--out", str(out), *FAST, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )


def rows_by_path(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out).to_pylist()  # pyarrow skips the _partial-* files
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path has two rows"
    return {r["path"]: r for r in rows}


@needs_bundle
def test_a_killed_run_leaves_no_process_and_its_rerun_adds_the_rest(tmp_path):
    """The killed run has ``--verbose`` (Ray's lines on its console, its logs kept); the re-run
    has the default console: one progress bar, then the summary."""
    folder = photos(tmp_path, 5)  # 20 photos: with --batch-size 1, three blocks
    n = 20
    out = tmp_path / "out"
    log = tmp_path / "killed.log"
    run = batch(folder, out, "--batch-size", "1", "--verbose", log=log)
    procs: set[tuple[int, int]] = set()
    try:
        wait_until(lambda: list(out.glob("*.parquet")), 180, "the first shard")
        reaper = reaper_of(run.pid)
        procs = session(run.pid) | reaper
        names = [cmdline(pid) for pid, _ in procs]
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
        killed_at = time.monotonic()
        assert reaper, "batch started a local Ray without its reaper"
        assert any("raylet" in c for c in names) and any("ray::" in c for c in names)
        temp_dir = ray_dir(reaper)

        def left() -> set[tuple[int, int]]:
            return alive(procs) | session(run.pid)

        while (still := left()) and time.monotonic() - killed_at < GONE_WITHIN_S:
            time.sleep(0.2)
        took = time.monotonic() - killed_at
        assert still == set(), [cmdline(pid) for pid, _ in still]
        print(f"killed: {len(procs)} processes of the run gone {took:.1f} s after SIGKILL")
    finally:
        run.kill()
        kill_all(procs)
    verbose = log.read_text()
    assert "Started a local Ray instance" in verbose and RAY_LINE.search(verbose)
    assert not any(BAR.match(u) for u in re.split(r"[\r\n]+", verbose))  # Ray Data's own
    assert temp_dir.is_dir()  # --verbose keeps Ray's logs
    shutil.rmtree(temp_dir)

    kept, aside = existing_rows(out)  # sets half-written shards aside, as a re-run does
    assert 0 < len(kept) < n, "the run was not killed part-way"
    log = tmp_path / "rerun.log"
    rerun = batch(folder, out, "--batch-size", "1", log=log)
    try:
        stdout, _ = rerun.communicate(timeout=240)
    finally:
        rerun.kill()
    err = log.read_text()
    assert rerun.returncode == 0, err[-3000:]
    assert session(rerun.pid) == set()  # ended with its processes (Ray's stay in its session)
    (summary,) = stdout.decode().splitlines()
    report = json.loads(summary)
    assert report["already_done"] == len(kept)
    assert report["captioned"] + report["errors"] == n - len(kept)
    assert set(rows_by_path(out)) == {str(p) for p in folder.iterdir()}  # each once

    assert not RAY_LINE.search(err), err[-3000:]  # the default console
    updates = [u for u in re.split(r"[\r\n]+", err) if u.strip()]
    assert updates and all(BAR.match(u) for u in updates), err[-3000:]  # one bar only
    assert BAR.match(updates[0]).groups() == (str(len(kept)), str(n))
    assert BAR.match(updates[-1]).groups() == (str(n), str(n))
    print(f"re-run: {len(kept)} rows kept ({len(aside)} shards set aside), {n - len(kept)} added")
    print(f"console: {len(updates)} updates of one bar, then {summary[:60]}…")
