"""The task stream: which worker ran which task, when, as the scheduler heard it.

The scheduler records one row per `TaskFinished` / `TaskErred` it receives, from the start
and stop times the worker measured, in a bounded ring. Rows are numbered from 0 since the
scheduler started, so a reader that remembers the number after the last row it saw asks for
``since(n)`` and gets only what is new (or learns how many it missed if the ring wrapped).
Recording is O(1); reading n new rows is O(n).

Each row also feeds a per-group histogram of task durations (for ``/metrics``).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import NamedTuple

__all__ = ["DURATION_BUCKETS", "DurationHistogram", "TaskRun", "TaskStream"]

#: upper bounds (seconds) of the duration histogram's buckets; +Inf is implied
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0,
)  # fmt: skip

#: groups with their own histogram; runs of any further group count under ``OTHER``
MAX_HISTOGRAM_GROUPS = 500
OTHER = "other"


class TaskRun(NamedTuple):
    """One run of a task on a worker (``status`` is "ok" or "error")."""

    key: str
    group: str
    worker: str
    start: float
    stop: float
    status: str


class DurationHistogram:
    """Counts of durations per bucket of `DURATION_BUCKETS` (the last one is +Inf)."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of runs <= le), ..., ("+Inf", count)]`` as Prometheus wants it."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class TaskStream:
    """A bounded ring of `TaskRun` rows; see the module docstring."""

    def __init__(self, maxlen: int = 20_000) -> None:
        self.rows: deque[TaskRun] = deque(maxlen=maxlen)
        #: rows recorded since the start; the next row gets this number
        self.count = 0
        #: rows recorded with a status other than "ok"
        self.errors = 0
        #: group -> durations of its runs (errors included)
        self.durations: dict[str, DurationHistogram] = {}

    def record(self, key: str, group: str, worker: str, start: float, stop: float,
               status: str = "ok") -> None:  # fmt: skip
        self.rows.append(TaskRun(key, group, worker, start, stop, status))
        self.count += 1
        if status != "ok":
            self.errors += 1
        hist = self.durations.get(group)
        if hist is None:
            if len(self.durations) >= MAX_HISTOGRAM_GROUPS:
                group = OTHER
            hist = self.durations.setdefault(group, DurationHistogram())
        if stop >= start > 0:
            hist.observe(stop - start)

    @property
    def first(self) -> int:
        """The number of the oldest row still held."""
        return self.count - len(self.rows)

    def since(self, index: int, limit: int | None = None) -> tuple[list[TaskRun], int, int]:
        """Rows numbered ``index`` and later (the newest ``limit`` of them if more):
        ``(rows, next index to ask for, rows missed)``, rows oldest first. Rows are missed
        when the ring wrapped past ``index``, or ``limit`` cut the oldest new ones."""
        index = max(0, min(index, self.count))
        new = self.count - index
        held = min(new, len(self.rows))
        take = held if limit is None else min(held, max(0, limit))
        rows = list(itertools.islice(reversed(self.rows), take))
        rows.reverse()
        return rows, self.count, new - take

    def recent(self, n: int) -> list[TaskRun]:
        """The newest ``n`` rows, oldest first."""
        return self.since(self.count - n)[0]
