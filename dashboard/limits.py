"""A process-wide limit on model inference, so concurrent dashboard sessions queue.

Every session of a Streamlit server runs in a thread of one process. Without a limit, eight
sessions captioning at once would each drive torch's thread pool over every core and slow each
other down. :func:`inference_slot` lets at most ``SLOTS`` inferences run at a time: the CPUs this
process may use (``captioning.core.machine.usable_cpus``) divided by the threads one inference
uses, and at least one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from captioning.core.machine import usable_cpus


def inference_slots(cpus: int, threads_per_inference: int) -> int:
    """How many inferences of ``threads_per_inference`` threads fit on ``cpus`` CPUs (>= 1)."""
    return max(1, cpus // max(1, threads_per_inference))


SLOTS = inference_slots(usable_cpus(), torch.get_num_threads())
_SEMAPHORE = threading.BoundedSemaphore(SLOTS)


@contextlib.contextmanager
def inference_slot() -> Iterator[float]:
    """Hold one of the ``SLOTS`` slots for the ``with`` block, waiting until one is free.

    Yields the seconds spent waiting.
    """
    t0 = time.perf_counter()
    with _SEMAPHORE:
        yield time.perf_counter() - t0
