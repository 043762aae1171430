"""Summaries of the retained history (finished records kept until their TTL or a purge),
for the dashboard's jobs page and ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterable

from .message import JobRecord

#: finished jobs a summary reads at most (the latest)
RECENT = 1000


def run_time_summary(records: Iterable[JobRecord]) -> dict[str, dict[str, float]]:
    """Per queue: ``n``, ``mean``, ``p50``, ``p95`` and ``max`` run time (seconds) of the
    records that have one (started and finished)."""
    times: dict[str, list[float]] = {}
    for record in records:
        took = record.run_time
        if took is not None:
            times.setdefault(record.queue, []).append(took)
    out: dict[str, dict[str, float]] = {}
    for queue, values in sorted(times.items()):
        values.sort()
        n = len(values)
        out[queue] = {"n": n, "mean": sum(values) / n, "p50": values[(n - 1) // 2],
                      "p95": values[min(n - 1, round(0.95 * (n - 1)))], "max": values[-1]}
    return out
