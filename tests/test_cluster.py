"""Both cluster paths on this machine's loopback: ``batch --address`` on a Ray cluster of a head
and a worker node, and ``train`` on two torchrun nodes joined by c10d rendezvous.

Each Ray node is ``ray start --block`` in a session of its own, with one CPU, its own temp dir
and the token of the module's cluster (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``). A node is
torn down by SIGKILL to its process tree and session (never ``ray stop``, which stops every Ray
on the machine), and each test checks that no process of it is left. The photos are the four
samples copied 15 times, plus a file that is not an image; the Ray runs use the torch runtime
at fp32, the same on every node. The torchrun nodes train on the tiny data of ``test_ddp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning.serving.batch_files import existing_rows
from tests import test_ddp
from tests.test_ddp import STEP_RTOL, free_port, train_flags

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-inject"
BIN = Path(sys.executable).parent
SAME_RUNTIME = ["--runtime", "torch", "--precision", "fp32"]
LOGPROB_ATOL = 5e-5
COPIES = 15  # of each of the 4 samples: 60 photos
HEAD_RESOURCE = "node:__internal_head__"

world = test_ddp.world  # fixture: the tiny Flickr8k and its cached features

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ---------------------------------------------------------------- processes


def _procs() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session id) of every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[3]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(root: int, sessions: set[int] | None = None) -> tuple[set[int], set[int]]:
    """The live processes of ``root``'s tree and of its sessions (torchrun and Ray start some
    in sessions or process groups of their own), and those sessions; never this one's."""
    table = _procs()
    found, frontier = {root} & table.keys(), {root}
    while frontier:
        frontier = {pid for pid, (_, ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    sids = (sessions or set()) | {table[pid][2] for pid in found}
    sids.discard(os.getsid(0))
    found |= {pid for pid, (_, _, sid) in table.items() if sid in sids}
    return {pid for pid in found if table.get(pid, ("Z",))[0] != "Z"}, sids


def kill_tree(root: int, timeout: float = 30.0) -> set[int]:
    """SIGKILL ``root``'s tree and sessions (``root`` leads one) until none is left; the pids
    still alive after ``timeout`` (none, normally)."""
    sids = {root}
    deadline = time.monotonic() + timeout
    while True:
        pids, sids = process_tree(root, sids)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (a node's temp dir)."""
    found = set()
    for pid, (state, _, _) in _procs().items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state != "Z" and text in cmdline:
            found.add(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Started:
    """A command started in a session of its own, its output in ``log``."""

    def __init__(self, cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> None:
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name}: still running after {timeout:.0f} s") from None

    def kill(self) -> set[int]:
        """SIGKILL the whole tree; what is still alive afterwards (nothing, normally)."""
        left = kill_tree(self.proc.pid)
        self.proc.wait(10)
        return left

    def left(self, timeout: float = 20) -> set[int]:
        """The processes of its session still alive ``timeout`` s after it ended (they may
        take a moment to stop); none, normally."""
        deadline = time.monotonic() + timeout
        while (alive := process_tree(self.proc.pid, {self.proc.pid})[0]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        return alive


# ---------------------------------------------------------------- a Ray cluster on loopback


class RayCluster:
    """A head node and worker nodes on 127.0.0.1, each ``ray start --block`` with one CPU."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # Ray's socket paths
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes: list[Started] = []
        self.workers: list[Started] = []

    def start_head(self) -> Started:
        port = self.address.rsplit(":", 1)[1]
        return self._start("head", ["--head", "--port", port, "--include-dashboard=false"])

    def _start(self, name: str, args: list[str]) -> Started:
        tmp = self.root / f"{name}-tmp"  # the node's $TMPDIR: shipped bundles land here
        tmp.mkdir()
        cmd = [str(BIN / "ray"), "start", "--block", *args, "--num-cpus", "1"]
        cmd += ["--temp-dir", str(self.root / name), "--disable-usage-stats"]
        node = Started(cmd, {**self.env, "TMPDIR": str(tmp)}, self.root / f"{name}.log")
        self.nodes.append(node)
        wait_for(
            lambda: "Ray runtime started" in node.text() or node.proc.poll() is not None,
            120,
            f"ray start ({name})",
        )
        assert node.proc.poll() is None, node.text()[-3000:]
        return node

    def two_nodes(self) -> Started:
        """The worker node, started when none is running."""
        alive = [w for w in self.workers if w.proc.poll() is None]
        if not alive:
            alive = [self._start(f"worker{len(self.workers)}", ["--address", self.address])]
            self.workers += alive
        return alive[0]

    def close(self) -> set[int]:
        """Kill every node; the processes left (none, normally)."""
        left: set[int] = set()
        for node in reversed(self.nodes):
            left |= node.kill()
        left |= mentioning(str(self.root))
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster():
    if not BUNDLE.is_dir():
        pytest.skip("shipped bundle resnet50-inject is absent")
    pytest.importorskip("ray")
    c = RayCluster()
    try:
        c.start_head()
        yield c
    finally:
        assert c.close() == set(), "Ray processes left behind"


def make_photos(root: Path) -> Path:
    """60 photos (the 4 samples, 15 times each) and ``junk.jpg``, which is not an image."""
    photos = root / "photos"
    photos.mkdir()
    samples = sorted(SAMPLES.glob("*.jpg"))
    assert len(samples) == 4
    for i in range(COPIES):
        for s in samples:
            shutil.copy(s, photos / f"{i:02d}-{s.name}")
    (photos / "junk.jpg").write_bytes(b"this is not a picture\n")
    return photos


def batch(photos: Path, out: Path, env: dict, log: Path, *args: str) -> Started:
    """``python -m captioning batch`` of ``photos`` into ``out``, started."""
    cmd = [sys.executable, "-m", "captioning", "batch", "--model", str(BUNDLE), str(photos)]
    return Started([*cmd, "--out", str(out), *SAME_RUNTIME, *args], env, log)


def finished(run: Started, timeout: float = 180) -> dict:
    """The report of a ``batch`` run that ends well; checks that it left no process."""
    code = run.wait(timeout)
    assert code == 0, run.text()[-3000:]
    assert run.left() == set()
    return json.loads(run.text().strip().splitlines()[-1])


def rows_by_path(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out).to_pylist()  # pyarrow skips the _partial-* files
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path has two rows"
    return {r["path"]: r for r in rows}


def same_rows(a: dict[str, dict], b: dict[str, dict]) -> float:
    """Assert equal rows apart from log-probs within ``LOGPROB_ATOL``; the largest difference."""
    assert a.keys() == b.keys()
    worst = 0.0
    for path, ra in a.items():
        rb = b[path]
        for key in ("caption", "error", "model", "bundle_sha256", "runtime", "precision"):
            assert ra[key] == rb[key], (path, key)
        assert json.loads(ra["decoding"]) == json.loads(rb["decoding"])
        if ra["error"] is None:
            na, nb = json.loads(ra["nbest"]), json.loads(rb["nbest"])
            assert [n["caption"] for n in na] == [n["caption"] for n in nb], path
            worst = max(worst, abs(ra["logprob"] - rb["logprob"]))
    assert worst <= LOGPROB_ATOL
    return worst


def node_counts(report: dict) -> dict[str, int]:
    """Caption actors per node of a ``batch`` report: ``head`` and ``worker``."""
    counts = {"head": 0, "worker": 0}
    for n in report["nodes"]:
        counts["head" if n["head"] else "worker"] += n["actors"]
    return counts


# ---------------------------------------------------------------- Ray


def test_a_refused_token_is_told_apart_from_other_failures(monkeypatch):
    from captioning.serving.ray_cluster import refused_token, token_message

    inner = RuntimeError(
        "Failed to connect to GCS. Last connection error: ray.exceptions.AuthenticationError: "
        "RPC error: InvalidAuthToken: Authentication token is missing or incorrect."
    )
    try:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from inner
    except ConnectionError as e:
        assert refused_token(e)
    assert not refused_token(ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"))
    assert not refused_token(TimeoutError("raylet did not start in 30 s"))

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    unset = token_message("10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    wrong = token_message("10.0.0.1:6379")
    for line in (unset, wrong):
        assert "\n" not in line and line.startswith("the Ray cluster at 10.0.0.1:6379 refused")
        for needed in ("RAY_AUTH_MODE=token", "~/.ray/auth_token", "RAY_AUTH_TOKEN="):
            assert needed in line
    assert "RAY_AUTH_MODE is unset here" in unset and "token here" in wrong


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="shipped bundle resnet50-inject is absent")
def test_the_shipped_files_are_what_decides_the_captions(tmp_path):
    from captioning.bundle.format import CAPTION_FILES
    from captioning.serving.ray_bundle import bundle_files, bundle_sha256, local_bundle

    files = bundle_files(BUNDLE)
    assert set(files) == {f"{BUNDLE.name}/{n}" for n in CAPTION_FILES if (BUNDLE / n).exists()}
    sha = bundle_sha256(BUNDLE)
    assert local_bundle(str(BUNDLE), sha) == BUNDLE  # this node holds it: no copy
    with pytest.raises(RuntimeError, match="is missing"):
        local_bundle(str(tmp_path / BUNDLE.name), sha)  # nothing shipped
    ensemble = BUNDLE.parent / "attention-ensemble"
    if ensemble.is_dir():  # its members travel beside it
        names = {k.split("/")[0] for k in bundle_files(ensemble)}
        members = json.loads((ensemble / "config.json").read_text())["members"]
        assert names == {ensemble.name, *(m["name"] for m in members)}


@pytest.mark.slow
@linux_only
def test_two_ray_nodes_caption_like_one_machine(cluster, tmp_path):
    cluster.two_nodes()
    photos = make_photos(tmp_path)
    local = finished(batch(photos, tmp_path / "local", cluster.env, tmp_path / "local.log"))
    assert (local["captioned"], local["errors"]) == (60, 1)

    out = tmp_path / "cluster"
    on_two = ["--address", cluster.address]
    report = finished(batch(photos, out, cluster.env, tmp_path / "cluster.log", *on_two))
    assert report["plan"]["cluster_cpus"] == 2.0 and report["plan"]["actors"] == 2
    assert len(report["nodes"]) == 2 and all(n["alive"] for n in report["nodes"])
    assert node_counts(report) == {"head": 1, "worker": 1}  # both nodes ran an actor

    rows = rows_by_path(out)
    assert len(rows) == 61
    worst = same_rows(rows, rows_by_path(tmp_path / "local"))
    print(f"rows equal: {len(rows)} rows, max |d logprob| {worst:.2e}")
    junk = rows[str(photos / "junk.jpg")]
    assert junk["caption"] is None and "junk.jpg" in junk["error"]
    for sample in SAMPLES.glob("*.jpg"):  # every copy of a photo gets the same caption
        assert len({r["caption"] for p, r in rows.items() if p.endswith(sample.name)}) == 1

    again = finished(batch(photos, out, cluster.env, tmp_path / "again.log", *on_two))
    assert (again["already_done"], again["captioned"], again["errors"]) == (61, 0, 0)
    assert rows_by_path(out) == rows


@pytest.mark.slow
@linux_only
def test_a_refused_token_is_named_in_one_line(cluster, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(SAMPLES / "chelsea.jpg", photos)
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    runs = {  # both wait for Ray's connection retries: side by side
        name: batch(photos, tmp_path / name, env, tmp_path / f"{name}.log", "--address", address)
        for name, env, address in (
            ("no-token", no_token, cluster.address),
            ("wrong-token", wrong, cluster.address),
        )
    }
    for name, run in runs.items():
        assert run.wait(120) == 2, run.text()[-3000:]
        errors = [ln for ln in run.text().splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, run.text()[-3000:]
        (line,) = errors
        assert f"the Ray cluster at {cluster.address} refused" in line
        for needed in ("RAY_AUTH_MODE=token", "~/.ray/auth_token", "RAY_AUTH_TOKEN="):
            assert needed in line
        assert "busy machine" not in line
        assert not (tmp_path / name).exists()


SHIP = """
import json, sys
import pyarrow as pa, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from captioning.serving.ray_batch import BatchConfig, CaptionActor, load_files, resolve_job
from captioning.serving.ray_bundle import bundle_files

bundle, elsewhere, photo, address, HEAD = sys.argv[1:]
job = resolve_job(BatchConfig(bundle, photo, "-", runtime="torch", precision="fp32"))
ray.init(address=address, log_to_driver=False)
worker = next(
    n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD not in n["Resources"]
)
shipped = [ray.put(bundle_files(job.bundle))]
on_worker = NodeAffinitySchedulingStrategy(worker, soft=False)
Actor = ray.remote(CaptionActor).options(num_cpus=0.5, scheduling_strategy=on_worker)
actor = Actor.remote(elsewhere, job.sha256, "fp32", "torch", job.decoding, 1, "cpu", shipped)
table = ray.get(actor.__call__.remote(load_files(pa.table({"path": [photo]}))))
print(json.dumps(table.to_pylist()[0]))
ray.shutdown()
"""


@pytest.mark.slow
@linux_only
def test_a_node_without_the_bundle_gets_the_drivers_copy(cluster, tmp_path):
    """The actor is given a bundle path that does not exist and runs on the worker node: it
    captions with the files the driver shipped, unpacked under the worker's $TMPDIR."""
    from captioning import Captioner
    from captioning.serving.ray_bundle import SHIPPED_DIR, bundle_sha256

    worker = cluster.two_nodes()
    photo = SAMPLES / "chelsea.jpg"
    elsewhere = tmp_path / "not-here" / BUNDLE.name
    args = [str(BUNDLE), str(elsewhere), str(photo), cluster.address, HEAD_RESOURCE]
    cmd = [sys.executable, "-c", SHIP, *args]
    run = Started(cmd, cluster.env, tmp_path / "ship.log")
    assert run.wait(180) == 0, run.text()[-3000:]
    row = json.loads(run.text().strip().splitlines()[-1])

    sha = bundle_sha256(BUNDLE)
    worker_tmp = Path(worker.log.with_name(worker.log.stem + "-tmp"))
    copies = list((cluster.root).glob(f"*-tmp/{SHIPPED_DIR}/{sha[:16]}/{BUNDLE.name}"))
    assert copies == [worker_tmp / SHIPPED_DIR / sha[:16] / BUNDLE.name]
    assert bundle_sha256(copies[0]) == sha and not elsewhere.exists()

    ref = Captioner.load(BUNDLE, "fp32", runtime="torch").caption(photo)
    assert row["error"] is None and row["caption"] == ref.text
    assert row["logprob"] == pytest.approx(ref.score, abs=1e-3)


@pytest.mark.slow
@linux_only
def test_a_killed_worker_node_loses_no_row(cluster, tmp_path):
    worker = cluster.two_nodes()
    photos = make_photos(tmp_path)
    out = tmp_path / "out"
    on_two = ["--address", cluster.address]
    run = batch(photos, out, cluster.env, tmp_path / "killed.log", *on_two)

    def worker_actor() -> bool:
        return any("CaptionActor" in cmdline(pid) for pid in process_tree(worker.proc.pid)[0])

    wait_for(worker_actor, 120, "a caption actor on the worker node")
    time.sleep(3)
    assert run.proc.poll() is None, "the job ended before the worker node was killed"
    assert worker.kill() == set()
    assert mentioning(str(cluster.root / "worker")) == set()
    killed_at = time.monotonic()

    code = run.wait(180)
    ended_after = time.monotonic() - killed_at
    text = run.text()
    stopped = "left the cluster mid-run" in text and "run the same command again" in text
    assert code == 0 or (code == 2 and stopped), text[-3000:]
    assert run.left() == set()
    kept, aside = existing_rows(out)  # sets half-written shards aside, as a re-run does
    before = len({r["path"] for r in kept})
    assert before == len(kept)
    print(
        f"killed worker: exit {code} {ended_after:.0f} s after the kill, {before} rows kept, "
        f"{len(aside)} shards set aside"
    )

    rerun = finished(batch(photos, out, cluster.env, tmp_path / "rerun.log", *on_two))
    assert rerun["already_done"] == before and rerun["captioned"] + rerun["errors"] == 61 - before
    rows = rows_by_path(out)  # no path twice
    assert set(rows) == {str(p) for p in photos.iterdir()}
    print(f"re-run: {rerun['captioned'] + rerun['errors']} rows added, {len(rows)} in all")
    assert [p for p, r in rows.items() if r["error"]] == [str(photos / "junk.jpg")]
    for sample in SAMPLES.glob("*.jpg"):
        assert len({r["caption"] for p, r in rows.items() if p.endswith(sample.name)}) == 1


# ---------------------------------------------------------------- torchrun

GUARD = """
import os
if os.environ.get("RANK", "0") != "0":  # every atomic write of the project ends in os.replace
    import sys

    def _refuse(src, dst, *args, **kwargs):
        raise RuntimeError(f"rank {os.environ['RANK']} wrote {dst}")

    os.replace = _refuse
    print(f"rank {os.environ['RANK']}: writes refused", file=sys.stderr)
"""


def torchrun_nodes(argv: list[str], tmp: Path, name: str) -> list[Started]:
    """Two torchrun nodes of one process each, joined by c10d rendezvous on 127.0.0.1; every
    rank other than 0 refuses to write (a ``sitecustomize`` on its PYTHONPATH)."""
    guard = tmp / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    (tmp / "tmp").mkdir(exist_ok=True)  # torchrun's own files
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(guard)}
    env["TMPDIR"] = str(tmp / "tmp")
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd += ["--rdzv-id", name, "--local-addr", "127.0.0.1", "-m", "captioning", *argv]
    nodes = []
    for n in range(2):
        nodes.append(Started(cmd, env, tmp / f"{name}-node{n}.log"))
        time.sleep(0.5)  # node 0 hosts the rendezvous store
    return nodes


def both_finish(nodes: list[Started], timeout: float = 180) -> None:
    for node in nodes:
        assert node.wait(timeout) == 0, node.text()[-3000:]
    assert sum("writes refused" in n.text() for n in nodes) == 1  # the guard was on rank 1
    assert [n.left() for n in nodes] == [set(), set()]


def step_losses(out: Path) -> list[list]:
    from captioning.training.checkpoint import read_state

    meta, _ = read_state(out)
    assert meta["world_size"] in (1, 2)
    return meta["step_losses"]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The flags of the torchrun runs (6 epochs of 4 steps), and one process's step losses."""
    from captioning.cli import main as cli

    flags = train_flags(*world)
    flags[flags.index("--epochs") + 1] = "6"
    flags += ["--patience", "6"]
    one = tmp_path_factory.mktemp("one-process")
    assert cli([*flags, "--out", str(one)]) == 0
    ref = step_losses(one)
    assert len(ref) == 24 and ref[-1][2] < ref[0][2] - 0.1  # it learns
    return flags, ref


def same_curve(out: Path, ref: list[list]) -> float:
    """Assert that the run in ``out`` took ``ref``'s steps with its losses within
    ``STEP_RTOL``; the largest relative difference."""
    curve = step_losses(out)
    assert [s[:2] for s in curve] == [s[:2] for s in ref]
    assert [s[2] for s in curve] == pytest.approx([s[2] for s in ref], rel=STEP_RTOL)
    return max(abs(a[2] - b[2]) / abs(b[2]) for a, b in zip(curve, ref, strict=True))


@pytest.mark.slow
@linux_only
def test_two_torchrun_nodes_follow_one_process(one_process, tmp_path):
    from captioning.training.checkpoint import read_state

    flags, ref = one_process
    two = tmp_path / "two"
    both_finish(torchrun_nodes([*flags, "--out", str(two)], tmp_path, "two"))
    print(f"two nodes vs one process: max relative difference {same_curve(two, ref):.1e}")
    assert read_state(two)[0]["world_size"] == 2
    assert (two / "decoder.safetensors").is_file() and (two / "card.md").is_file()


@pytest.mark.slow
@linux_only
def test_killing_a_torchrun_node_then_resuming_both(one_process, tmp_path):
    from captioning.training.checkpoint import read_state

    flags, ref = one_process
    killed = tmp_path / "killed"
    nodes = torchrun_nodes([*flags, "--out", str(killed)], tmp_path, "killed")

    def epoch_done() -> bool:
        try:
            return read_state(killed)[0]["epoch"] >= 2
        except (OSError, ValueError):
            return False

    wait_for(epoch_done, 120, "the first epoch's checkpoint")
    assert nodes[1].proc.poll() is None, "the run ended before node 1 was killed"
    assert nodes[1].kill() == set()
    killed_at = time.monotonic()
    assert nodes[0].wait(120) != 0  # its rank lost the other
    print(f"node 0 stopped {time.monotonic() - killed_at:.1f} s after node 1 was killed")
    assert nodes[0].left() == set()
    assert not (killed / "decoder.safetensors").exists()
    at_kill = read_state(killed)[0]["epoch"]

    resumed = torchrun_nodes([*flags, "--out", str(killed), "--resume"], tmp_path, "resumed")
    both_finish(resumed)
    assert sum(f"resumed at epoch {at_kill}" in n.text() for n in resumed) == 1
    rel = same_curve(killed, ref)
    assert read_state(killed)[0]["world_size"] == 2 and (killed / "decoder.safetensors").is_file()
    print(f"killed, resumed at epoch {at_kill}: max relative difference {rel:.1e}")
