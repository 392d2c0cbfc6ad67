"""A process-wide limit on model inference, so concurrent dashboard sessions queue.

Every session of a Streamlit server runs in a thread of one process. Without a limit, eight
sessions captioning at once would each drive torch's thread pool over every core and slow each
other down. :func:`inference_slot` lets at most ``SLOTS`` inferences run at a time: the CPUs this
process may use (``captioning.core.machine.usable_cpus``) divided by the threads one inference
uses, and at least one.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from captioning.core.machine import usable_cpus


def inference_slots(cpus: int, threads_per_inference: int) -> int:
    """How many inferences of ``threads_per_inference`` threads fit on ``cpus`` CPUs (>= 1)."""
    return max(1, cpus // max(1, threads_per_inference))


class FairSlots:
    """``n`` slots handed out first come, first served: a released slot goes straight to the
    longest waiter, so a caller that releases and asks again (a Batch run, chunk after chunk)
    queues behind the others instead of winning the race."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # set by release(): the slot is this caller's

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # handed over, never free in between
            else:
                self._free += 1

    def __enter__(self) -> FairSlots:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


SLOTS = inference_slots(usable_cpus(), torch.get_num_threads())
_SLOTS = FairSlots(SLOTS)


@contextlib.contextmanager
def inference_slot() -> Iterator[float]:
    """Hold one of the ``SLOTS`` slots for the ``with`` block, waiting (in arrival order) until
    one is free.

    Yields the seconds spent waiting.
    """
    t0 = time.perf_counter()
    _SLOTS.acquire()
    try:
        yield time.perf_counter() - t0
    finally:
        _SLOTS.release()
