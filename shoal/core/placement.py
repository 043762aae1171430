"""Where a ready task should run: pure functions over the scheduler's records.

Policy, in order:
1. Only *valid* workers: those named by the task's ``workers=`` restriction (unless
   ``allow_other_workers``), offering every resource the task asks for.
2. The best valid worker holds the most bytes of the task's inputs; ties, and tasks without
   inputs, go to the least occupied (expected seconds of assigned work per thread).
3. A worker takes a task only while it has *room*: fewer tasks than threads, or less than
   `QUEUE_BUDGET_S` seconds of expected work per thread, and free resources. Everything else
   waits in the scheduler's queue, so a huge graph is released in step with free threads.
4. An idle worker takes queued work preferred elsewhere when moving the inputs costs less
   than the wait at the preferred worker (work stealing, weighed by transfer vs. compute).

Cost: a task without restrictions is placed in O(its inputs' holders), never O(workers):
the best worker is one of the holders (`bytes_by_holder`), and a task without inputs takes
the least occupied of a few workers that have room (`ROOMY_SAMPLE`, see
`SchedulerState._pick_roomy`). Restricted tasks (``workers=``, resources) filter all workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduler_state import TaskState, WorkerRecord

#: Expected work (seconds per thread) a worker may hold beyond its running tasks. Tiny
#: tasks flow freely (no round trip per task); long ones are handed out one per thread.
QUEUE_BUDGET_S = 0.05
#: ... and at most this many tasks per thread however tiny they are, so that a huge graph of
#: quick root tasks cannot pile results up in worker memory faster than they are consumed.
QUEUE_MAX_PER_THREAD = 100
#: Duration assumed for a task group never seen finishing.
UNKNOWN_DURATION_S = 0.5
#: Bandwidth assumed between workers, to price moving inputs.
BANDWIDTH_BYTES_S = 200e6
#: A task without inputs goes to the least occupied of this many workers with room (taken
#: round-robin), not of all of them: a thousand workers must not make each placement slower.
ROOMY_SAMPLE = 4


def is_unrestricted(ts: TaskState) -> bool:
    """Any non-retiring worker may run ``ts`` (no ``workers=``, no resources)."""
    spec = ts.spec
    return spec is None or (not spec.workers and not spec.resources)


def bytes_by_holder(ts: TaskState) -> dict[WorkerRecord, int]:
    """Bytes of ``ts``'s inputs on each (non-retiring) worker holding some: one pass over the
    inputs' replicas, so its cost follows the graph, not the cluster."""
    held: dict[WorkerRecord, int] = {}
    for dep in ts.dependencies:
        for ws in dep.who_has:
            if not ws.retiring:
                held[ws] = held.get(ws, 0) + dep.nbytes
    return held


def best_holder(held: dict[WorkerRecord, int]) -> WorkerRecord:
    """The holder of the most input bytes; ties: the least occupied, then by address (the
    holders come from sets: without a last tie-break one seed could give two runs)."""
    return max(held, key=lambda w: (held[w], -w.occupancy / w.nthreads, -len(w.processing),
                                    w.address))  # fmt: skip


def input_bytes(ts: TaskState) -> int:
    return sum(d.nbytes for d in ts.dependencies)


def valid_workers(ts: TaskState, workers: Iterable[WorkerRecord]) -> tuple[list[WorkerRecord], str]:
    """The workers that may run ``ts`` and, when there are none, why not."""
    spec = ts.spec
    pool = [w for w in workers if not w.retiring]
    if not pool:
        return [], "no workers are connected (or all are retiring)"
    if spec is None:
        return pool, ""
    if spec.workers and not spec.allow_other_workers:
        wanted = set(spec.workers)
        pool = [w for w in pool if w.address in wanted or w.name in wanted or _host(w) in wanted]
        if not pool:
            return [], f"restricted to workers {sorted(wanted)}, none of which is connected"
    if spec.resources:
        fitting = [w for w in pool if all(w.resources.get(r, 0.0) >= need
                                          for r, need in spec.resources.items())]  # fmt: skip
        if not fitting:
            offered = sorted({f"{r}={v:g}" for w in pool for r, v in w.resources.items()})
            return [], (f"needs resources {_fmt(spec.resources)}; no worker offers that"
                        f" (offered: {', '.join(offered) or 'none'})")  # fmt: skip
        pool = fitting
    return pool, ""


def has_room(ws: WorkerRecord, ts: TaskState) -> bool:
    spec = ts.spec
    if spec is not None and spec.resources:
        for r, need in spec.resources.items():
            total = ws.resources.get(r, 0.0)
            # With a tolerance: sums of fractions (0.1 + 0.2) leave rounding residue behind,
            # which must not make a task that asks for all of a resource wait forever.
            if total - ws.used_resources.get(r, 0.0) < need - 1e-9 * max(1.0, total):
                return False
    return has_capacity(ws)


def has_capacity(ws: WorkerRecord) -> bool:
    """A free thread, or little enough queued work (in expected seconds and in count)."""
    running = len(ws.processing) - len(ws.long_running)  # seceded tasks hold no thread
    if running < ws.nthreads:
        return True
    return (ws.occupancy < ws.nthreads * QUEUE_BUDGET_S
            and running < ws.nthreads * (1 + QUEUE_MAX_PER_THREAD))  # fmt: skip


def input_bytes_on(ts: TaskState, ws: WorkerRecord) -> int:
    return sum(d.nbytes for d in ts.dependencies if ws in d.who_has)


def transfer_time(ts: TaskState, ws: WorkerRecord) -> float:
    """Seconds to move the inputs ``ws`` lacks."""
    missing = sum(d.nbytes for d in ts.dependencies if ws not in d.who_has)
    return missing / BANDWIDTH_BYTES_S


def wait_time(ws: WorkerRecord) -> float:
    """Expected seconds before ``ws`` frees a thread."""
    return ws.occupancy / ws.nthreads


def best_worker(ts: TaskState, valid: list[WorkerRecord]) -> WorkerRecord:
    """The valid worker holding most input bytes; ties: preferred, then least occupied."""
    spec = ts.spec
    preferred = set(spec.workers) if spec is not None and spec.workers else set()

    def score(w: WorkerRecord) -> tuple[int, bool, float, int]:
        held = input_bytes_on(ts, w) if ts.dependencies else 0
        liked = (not preferred or w.address in preferred or w.name in preferred
                 or _host(w) in preferred)  # as `valid_workers` matches them  # fmt: skip
        return (held, liked, -w.occupancy / w.nthreads, -len(w.processing))

    return max(valid, key=score)


def _host(ws: WorkerRecord) -> str:
    location = ws.address.split("://", 1)[-1]
    return location.rsplit(":", 1)[0].strip("[]")


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()))
