"""A Python thread that ticks while native code runs: the tests that a call
releases the GIL count its ticks."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, List


@contextlib.contextmanager
def ticking(interval: float) -> Iterator[List[float]]:
    """Runs a thread that appends `time.perf_counter()` to the yielded list
    every `interval` seconds, until the block ends. With the GIL held by the
    block the thread cannot tick."""
    ticks: List[float] = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(interval)

    t = threading.Thread(target=count)
    t.start()
    try:
        yield ticks
    finally:
        stop.set()
        t.join()
