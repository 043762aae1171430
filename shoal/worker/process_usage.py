"""The process's memory and CPU use, as heartbeats report it: one reading shared by every
worker in the process, taken at most every `MAX_AGE` seconds.

Every worker of a process reports the same process, and reading its CPU times costs the
kernel time in proportion to the process's threads (/proc/self/stat sums them). A process
hosting hundreds of workers, each with its task thread (`shoal.testing.many_workers`, or an
in-process `LocalCluster`), that read it once per worker per heartbeat spent most of its
CPU there (41% of a 500-worker host in a profile): O(workers x threads). Shared, it is one
reading per interval whatever the number of workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psutil

__all__ = ["MAX_AGE", "ProcessUsage", "process_usage"]

#: seconds a reading is served before the next one is taken (heartbeats come every 0.5 s)
MAX_AGE = 0.2


class ProcessUsage:
    """`read` returns (RSS bytes, CPU percent since the previous reading)."""

    def __init__(self, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_age = max_age
        self._clock = clock
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._rss = 0
        self._cpu = 0.0
        #: readings taken (tests check that many workers share them)
        self.readings = 0

    def read(self) -> tuple[int, float]:
        with self._lock:
            now = self._clock()
            if now - self._at >= self.max_age:
                self._at = now
                self.readings += 1
                try:
                    self._rss = int(self._proc.memory_info().rss)
                    self._cpu = float(self._proc.cpu_percent())
                except psutil.Error:
                    self._rss, self._cpu = 0, 0.0
            return self._rss, self._cpu


_shared: ProcessUsage | None = None
_shared_pid = 0
_shared_lock = threading.Lock()


def process_usage() -> ProcessUsage:
    """This process's shared `ProcessUsage` (a new one after a fork)."""
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is None or _shared_pid != os.getpid():
            _shared, _shared_pid = ProcessUsage(), os.getpid()
        return _shared
