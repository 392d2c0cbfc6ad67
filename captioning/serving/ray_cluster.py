"""Joining a Ray cluster and watching it: token authentication, lost nodes, where actors ran.

``init_ray`` joins the cluster at an address (or starts a local Ray) and turns a refused token
into one line that says how to pass it; ``NodeWatch`` stops a job whose remaining nodes cannot
hold its actor pool; ``actor_nodes`` counts a job's caption actors per node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

NODE_POLL_S = 1.0  # how often the driver checks that the cluster still holds the actor pool
STOP_GRACE_S = 20.0  # after the interrupt, how long the driver may take to stop by itself
TOKEN_HELP = (  # how a process that joins a cluster gets its token
    "copy the head's ~/.ray/auth_token to ~/.ray/auth_token here, or set "
    "RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=TOKEN; `ray get-auth-token` on the head prints it"
)


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray on this machine's cores."""
    import ray

    before = _descendants()
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
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
