"""Ray for a ``batch`` job: starting or joining it, its console, and watching the cluster.

``ray_job`` joins the cluster at an address, or starts a local Ray in a temp dir of its own
watched by a reaper process (``captioning.serving.reaper``), and shuts down only what it
started; ``ray_console`` keeps Ray's INFO and WARNING lines, warnings and progress bars off this
process's console unless asked for. ``init_ray`` turns a refused token into one line that says
how to pass it; ``NodeWatch`` stops a job whose remaining nodes cannot hold its actor pool;
``actor_nodes`` counts a job's caption actors per node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

NODE_POLL_S = 1.0  # how often the driver checks that the cluster still holds the actor pool
STOP_GRACE_S = 20.0  # after the interrupt, how long the driver may take to stop by itself
REAPER_WAIT_S = 20.0  # after a local Ray's shutdown, how long the driver waits for its reaper
SOCKET_PATH_ROOM = 24  # longest temp dir base kept: Ray's socket paths must fit in 107 bytes
TOKEN_HELP = (  # how a process that joins a cluster gets its token
    "copy the head's ~/.ray/auth_token to ~/.ray/auth_token here, or set "
    "RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=TOKEN; `ray get-auth-token` on the head prints it"
)


def init_ray(address: str | None, verbose: bool = False, temp_dir: str | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray on this machine's cores (in
    ``temp_dir``, Ray's default when None) without its dashboard. Without ``verbose`` the
    driver logs only Ray's errors (``quiet_core``) and the workers' output stays in their log
    files."""
    import ray

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    before = _descendants()
    try:
        with contextlib.nullcontext() if verbose else quiet_core():
            if address:
                ray.init(address=address, **quiet)
            else:
                local = {"_temp_dir": temp_dir} if temp_dir else {}
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **local, **quiet)
    except Exception as e:  # Ray raises bare Exception, ConnectionError, RuntimeError...
        for pid in _descendants() - before:  # a half-started local Ray: stop what it spawned
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        if address and refused_token(e):
            raise RuntimeError(token_message(address)) from None
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        # a local start waits 30 s for its raylet, which a saturated machine can miss
        raise RuntimeError(
            f"could not start or join {where} ({e}); on a busy machine try again, or start one "
            "with `ray start --head` and pass --address auto"
        ) from None


CORE_CHATTER = re.compile(rb"^\[[^\]]* [IW] \d+ \d+\] ")  # a C++ INFO or WARNING line of Ray's


@contextlib.contextmanager
def quiet_core() -> Iterator[None]:
    """While ``ray.init`` runs: the C++ core of the driver (and of a local Ray it starts) set
    to log only fatal errors (``RAY_BACKEND_LOG_LEVEL``, unless set already), and this
    process's stderr (file descriptor 2) captured; afterwards every captured line but the
    core's INFO and WARNING lines (among them the one announcing the log level) is passed on.

    The core's ERROR lines include notes such as Ray Data's actor pools being restartable
    with arguments in the object store; the failures that matter reach the driver as
    exceptions.
    """
    var = "RAY_BACKEND_LOG_LEVEL"
    set_var = var not in os.environ
    if set_var:
        os.environ[var] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if set_var:
                os.environ.pop(var, None)
            captured.seek(0)
            kept = [ln for ln in captured.read().splitlines(True) if not CORE_CHATTER.match(ln)]
            if kept:
                with contextlib.suppress(OSError):
                    os.write(2, b"".join(kept))


@contextlib.contextmanager
def ray_job(address: str | None, verbose: bool = False, hold: Sequence[int] = ()) -> Iterator[None]:
    """Ray for one job, shut down afterwards if this started or joined it; a Ray this process
    already runs (``ray.init`` by the caller) is used and left as it is.

    Without ``address`` a local Ray starts in a temp dir of its own, watched by a ``LocalRay``
    reaper that also holds the file descriptors ``hold`` (the output folder's lock) until no
    process of that Ray is left. With an address the cluster is joined and left as it is.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        init_ray(address, verbose)
        try:
            yield
        finally:
            ray.shutdown()
        return
    with LocalRay(keep_logs=verbose, hold=hold) as local:
        init_ray(None, verbose, local.dir)
        try:
            yield
        finally:
            ray.shutdown()


def _short_tmp() -> str:
    """A base for a Ray temp dir: the system's temp dir when short enough for Ray's socket
    paths (``DIR/session_DATE_TIME_USEC_PID/sockets/plasma_store`` within 107 bytes)."""
    base = tempfile.gettempdir()
    return base if len(base) <= SOCKET_PATH_ROOM or not os.path.isdir("/tmp") else "/tmp"


def ray_package() -> str:
    """The folder of the installed ``ray`` package (found without importing it)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Ray is not installed: pip install 'ray[data]'")
    return spec.submodule_search_locations[0]


class LocalRay:
    """The temp dir and the reaper of a local Ray instance this process is about to start.

    ``__enter__`` makes the dir and starts ``python -m captioning.serving.reaper`` in a session
    of its own, with the read end of a pipe only this process writes to; ``__exit__`` (after
    ``ray.shutdown``) closes the pipe and waits for the reaper to stop what is left of the
    instance. When this process dies instead, the pipe closes all the same and the reaper stops
    every process of the instance within seconds (``reaper.GRACE_S``). Without ``keep_logs``
    the reaper removes the dir, Ray's logs with it. Without ``/proc`` (not Linux) there is no
    reaper: the dir is removed after ``ray.shutdown``.
    """

    def __init__(self, keep_logs: bool = False, hold: Sequence[int] = ()) -> None:
        self.keep_logs = keep_logs
        self.hold = tuple(hold)
        self.dir = ""
        self.reaper: subprocess.Popen | None = None
        self._pipe = -1

    def __enter__(self) -> LocalRay:
        from captioning.serving.reaper import start_time

        self.dir = tempfile.mkdtemp(prefix="ray-batch-", dir=_short_tmp())
        me = start_time(os.getpid())
        if me is None:  # no /proc to find the instance's processes in
            return self
        read_end, self._pipe = os.pipe()  # both close-on-exec: Ray's processes never hold them
        cmd = [sys.executable, "-m", "captioning.serving.reaper", "--dir", self.dir]
        cmd += ["--fd", str(read_end), "--driver", f"{os.getpid()}:{me}"]
        cmd += ["--ray", ray_package()]
        cmd += [a for fd in self.hold for a in ("--hold", str(fd))]
        cmd += ["--keep"] if self.keep_logs else []
        try:
            self.reaper = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(read_end, *self.hold),
                start_new_session=True,  # not stopped with the driver's process group
            )
        finally:
            os.close(read_end)
        ready = self.reaper.stdout.readline()
        self.reaper.stdout.close()
        if ready.strip() != b"ready":
            self.__exit__()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError("the watchdog of the local Ray did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe >= 0:
            os.close(self._pipe)  # the reaper's cue
            self._pipe = -1
        if self.reaper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(REAPER_WAIT_S)
        elif not self.keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def ray_console(verbose: bool = False, progress: bool = True) -> Iterator[None]:
    """What Ray prints on this process's console while a job runs; everything is restored
    afterwards.

    Without ``verbose``: only Ray's errors. The ``ray`` logger and the console handler of the
    ``ray.data`` logger (its log file keeps every line) are set to ERROR, warnings raised in
    Ray's modules are ignored, Ray Data neither announces its executions nor draws its progress
    bars (``init_ray`` quiets Ray's C++ core). With ``verbose``: Ray's INFO lines, its warnings
    and Ray Data's progress bars (when ``progress``).
    """
    import warnings

    level = logging.INFO if verbose else logging.ERROR
    ray_logger = logging.getLogger("ray")
    with warnings.catch_warnings():
        if not verbose:  # first: importing Ray Data and making its context warn already
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        import ray.data

        consoles = [
            h
            for h in logging.getLogger("ray.data").handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        ctx = ray.data.DataContext.get_current()
        names = ("enable_progress_bars", "print_on_execution_start")
        saved = (ray_logger.level, [h.level for h in consoles], {k: getattr(ctx, k) for k in names})
        ray_logger.setLevel(level)
        for h in consoles:
            h.setLevel(level)
        ctx.enable_progress_bars = verbose and progress
        ctx.print_on_execution_start = verbose
        try:
            yield
        finally:
            ray_logger.setLevel(saved[0])
            for h, lvl in zip(consoles, saved[1], strict=True):
                h.setLevel(lvl)
            for k, v in saved[2].items():
                setattr(ctx, k, v)


def token_message(address: str) -> str:
    """The one line for a cluster that refused this process's token (or its lack of one)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "token":
        return (
            f"the Ray cluster at {address} refused this process's authentication token "
            f"(RAY_AUTH_MODE=token here): give it the cluster's token ({TOKEN_HELP})"
        )
    return (
        f"the Ray cluster at {address} refused this process, which sends no authentication "
        f"token (RAY_AUTH_MODE is {mode or 'unset'} here): set RAY_AUTH_MODE=token and give "
        f"it the cluster's token ({TOKEN_HELP})"
    )


def refused_token(e: BaseException) -> bool:
    """Whether ``e`` or an error it came from is Ray's token authentication refusing us.

    Joining a cluster wraps Ray's ``AuthenticationError`` into a ``ConnectionError`` whose
    cause holds only its text.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = f"{type(cur).__name__}: {cur}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _descendants() -> set[int]:
    """PIDs of this process's children, grandchildren... (Linux /proc; empty elsewhere)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


class NodeWatch:
    """Stops the job when nodes leave and the rest cannot hold the actor pool and a read task.

    Ray restarts a lost node's actors on the nodes left; when their CPUs then all go to actors,
    the read and write tasks never get one and Ray Data waits for ever. A thread polls the
    nodes every ``NODE_POLL_S`` and then interrupts the driver (SIGINT), which ``run_batch``
    turns into a message; when Ray Data holds the interrupt back for ``STOP_GRACE_S``, the
    thread prints the message and ends the process. The rows written so far stay and a re-run
    captions the rest.
    """

    def __init__(self, needed_cpus: float) -> None:
        import ray

        self.needed = needed_cpus
        self.start_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.lost: list[dict] = []  # the nodes that left, once the job was stopped
        self.cpus_left = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="node-watch", daemon=True)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        import ray

        while not self._done.wait(NODE_POLL_S):
            with contextlib.suppress(Exception):  # a failed poll: try again
                alive = [n for n in ray.nodes() if n["Alive"]]
                cpus = sum(n["Resources"].get("CPU", 0.0) for n in alive)
                gone = self.start_ids - {n["NodeID"] for n in alive}
                if gone and cpus < self.needed:
                    nodes = {n["NodeID"]: n for n in ray.nodes()}
                    self.lost = [nodes.get(i, {"NodeID": i}) for i in sorted(gone)]
                    self.cpus_left = cpus
                    os.kill(os.getpid(), signal.SIGINT)
                    if not self._done.wait(STOP_GRACE_S):  # Ray kept the driver waiting
                        print(f"error: {self.message()}", file=sys.stderr, flush=True)
                        os._exit(2)  # the written shards stay; a re-run sets partial ones aside
                    return

    def message(self) -> str:
        """What happened, for the user."""
        gone = ", ".join(
            f"{n.get('NodeManagerAddress', '?')} (node {n['NodeID'][:12]})" for n in self.lost
        )
        return (
            f"Ray node {gone} left the cluster mid-run, and the nodes left cannot hold the "
            f"actor pool and its read tasks (CPUs: {self.cpus_left:g} of {self.needed:g} "
            "needed); the rows written so far are kept: run the same command again to caption "
            "the rest"
        )


def actor_nodes() -> list[dict] | None:
    """Per node of the cluster (the head first): its address, node id, whether it is the head,
    whether it is alive, and how many caption actors this job ran there (Ray's actor table).
    None when Ray's actor table cannot be read."""
    import ray

    try:
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        counts = Counter(
            a["Address"]["NodeID"]
            for a in state.actors().values()
            if a.get("JobID") == job and "CaptionActor" in a.get("ActorClassName", "")
        )
        nodes = [
            {
                "address": n["NodeManagerAddress"],
                "node_id": n["NodeID"],
                "head": "node:__internal_head__" in n.get("Resources", {}),
                "alive": n["Alive"],
                "actors": counts.get(n["NodeID"], 0),
            }
            for n in ray.nodes()
        ]
    except Exception:  # noqa: BLE001 - a private API of Ray's: the report just lacks it
        return None
    return sorted(nodes, key=lambda n: (not n["head"], n["node_id"]))
