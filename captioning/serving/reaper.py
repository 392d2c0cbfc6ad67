"""The watchdog of a local Ray instance that a ``batch`` run starts: none of its processes
outlives the run.

The driver starts ``python -m captioning.serving.reaper --dir DIR --fd N --driver PID:START
--ray RAY`` before ``ray.init(_temp_dir=DIR)``, ``RAY`` being the folder of the ``ray``
package. ``N`` is the read end of a pipe whose write end only the driver holds; the reaper
prints ``ready`` and reads from it. The pipe ends (end-of-file) when the driver is gone for
whatever reason: a normal exit, an exception, a signal, SIGKILL. The reaper then stops every
process of the instance, SIGTERM first and SIGKILL to those still alive ``GRACE_S`` later,
removes DIR (unless ``--keep``) and exits. It runs in a session of its own: a Ctrl-C, or a
signal to the driver's process group or session, does not stop it before its work is done; a
SIGTERM to it does the work at once. File descriptors it is given with ``--hold`` (the lock of
the run's output folder) stay open until it exits, so the lock is free only once no process of
the run is left.

A process belongs to the instance when it is one of Ray's and its command line, its working
directory or one of its open files lies in DIR, or when it descends from such a process. DIR is
a folder made for this one run (``tempfile.mkdtemp``): Ray's GCS, raylet and monitors name it
in their arguments, and its agents and workers keep their log files open in it. A process is
one of Ray's when it runs a program of the ``ray`` package (the GCS, the raylet, Ray's Python
scripts) or carries the title Ray gives its workers and agents (``ray::…``, set with
``setproctitle`` over their command line). A process of another run, or of a cluster started
with ``ray start``, has a temp dir of its own; a process of no Ray that happens to look into
DIR (a ``tail -f`` of a log) is no member either. The driver (its pid and start time) and the
reaper itself are spared.

Linux only (``/proc``); it imports nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

GRACE_S = 3.0  # after SIGTERM, how long a process may take to exit before SIGKILL
LIMIT_S = 30.0  # the reaper gives up on processes that outlive this (none, normally)
POLL_S = 0.2


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in "ZX" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in "ZX":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def _in_dir(path: str, marker: str) -> bool:
    return path == marker or path.startswith(marker + os.sep)


def rays_in(pid: int, marker: str, ray_pkg: Sequence[str]) -> bool:
    """Whether process ``pid`` is one of Ray's (``ray::…`` or a program under ``ray_pkg``)
    whose command line, working directory or an open file lies in ``marker`` (a resolved
    path)."""
    proc = Path(f"/proc/{pid}")
    try:
        args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        if not args[0].startswith("ray::") and not any(
            a.startswith(pkg + os.sep) for a in args for pkg in ray_pkg
        ):
            return False
        if any(marker + os.sep in a or a == marker for a in args):
            return True
        if _in_dir(os.readlink(proc / "cwd"), marker):
            return True
        for fd in os.listdir(proc / "fd"):
            with contextlib.suppress(OSError):
                if _in_dir(os.readlink(proc / "fd" / fd), marker):
                    return True
    except (OSError, IndexError):  # gone, or not ours to read
        return False
    return False


def members(marker: str, ray_pkg: Sequence[str], spare: set[tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of the live processes of the instance in ``marker``, and their
    descendants; never this process nor the (pid, start time) pairs in ``spare``."""
    table = _stats()
    me = os.getpid()
    found = {pid for pid in table if pid != me and rays_in(pid, marker, ray_pkg)}
    frontier = found
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return {
        pid: table[pid][1]
        for pid in found
        if pid != me and (pid, table[pid][1]) not in spare and start_time(pid) is not None
    }


def send(pid: int, start: int, sig: int) -> None:
    """Signal process ``pid`` if it is still the one that started at ``start``: a pidfd pins
    the process while its start time is checked, so a reused pid is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3), or gone
        fd = None
    try:
        if start_time(pid) != start:
            return
        if fd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
    except OSError:  # gone meanwhile, or not ours
        pass
    finally:
        if fd is not None:
            os.close(fd)


def reap(
    marker: str,
    ray_pkg: Sequence[str],
    spare: set[tuple[int, int]],
    grace: float = GRACE_S,
    limit: float = LIMIT_S,
) -> dict[int, int]:
    """Stop the processes of the instance in ``marker``: SIGTERM each as it is found, SIGKILL
    those alive ``grace`` s after their SIGTERM; those still alive after ``limit`` s."""
    t0 = time.monotonic()
    termed: dict[tuple[int, int], float] = {}
    while found := members(marker, ray_pkg, spare):
        now = time.monotonic()
        if now - t0 > limit:
            return found
        for pid, start in found.items():
            since = termed.setdefault((pid, start), now)
            send(pid, start, signal.SIGKILL if now - since >= grace else signal.SIGTERM)
        time.sleep(POLL_S)
    return {}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m captioning.serving.reaper", description=__doc__)
    p.add_argument("--dir", required=True, help="the Ray temp dir of the run")
    p.add_argument("--fd", type=int, required=True, help="read end of the driver's pipe")
    p.add_argument("--driver", required=True, help="PID:START of the driver, spared")
    p.add_argument("--ray", required=True, help="the folder of the ray package")
    p.add_argument("--hold", type=int, action="append", default=[], help="fd kept open")
    p.add_argument("--keep", action="store_true", help="leave DIR (Ray's logs) in place")
    return p.parse_args(argv)


class Stop(Exception):
    """SIGTERM: stop the run's processes now."""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    marker = os.path.realpath(args.dir)
    pid, start = (int(x) for x in args.driver.split(":"))

    def on_term(signum: int, frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    try:
        print("ready", flush=True)
        sys.stdout.close()
        while os.read(args.fd, 4096):
            pass
    except (Stop, OSError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the work below is the answer to SIGTERM
    ray_pkg = sorted({args.ray.rstrip(os.sep), os.path.realpath(args.ray)})
    left = reap(marker, ray_pkg, {(pid, start)})
    if left:
        with contextlib.suppress(OSError):  # the driver's stderr may be gone with it
            print(f"reaper: processes of {marker} still alive: {sorted(left)}", file=sys.stderr)
    elif not args.keep:
        shutil.rmtree(marker, ignore_errors=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
