"""A process-wide limit on model inference, so concurrent dashboard sessions queue.

Every session of a Streamlit server runs in a thread of one process. Without a limit, eight
sessions captioning at once would each drive torch's thread pool over every core and slow each
other down. :func:`inference_slot` lets at most ``SLOTS`` inferences run at a time: the cores
divided by the threads one inference uses, and at least one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


SLOTS = max(1, cpu_cores() // max(1, torch.get_num_threads()))
_SEMAPHORE = threading.BoundedSemaphore(SLOTS)


@contextlib.contextmanager
def inference_slot() -> Iterator[float]:
    """Hold one of the ``SLOTS`` slots for the ``with`` block, waiting until one is free.

    Yields the seconds spent waiting.
    """
    t0 = time.perf_counter()
    with _SEMAPHORE:
        yield time.perf_counter() - t0
