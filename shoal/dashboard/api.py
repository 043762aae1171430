"""The dashboard's JSON documents, built from a running `Scheduler`.

Each function reads the scheduler on its loop and returns plain JSON-able data. The cost of
each is bounded whatever the number of tasks: counts come from the incrementally kept
`SchedulerState.groups` and `transition_counts`; lists are paginated or capped; only the
on-demand views (a page of tasks filtered by state, a task's story) look at many tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import TYPE_CHECKING, Any

from ..core.scheduler_records import key_group
from ..protocol.messages import Heartbeat

if TYPE_CHECKING:
    from ..scheduler import Scheduler

__all__ = [
    "GRAPH_LIMIT", "MAX_GROUPS", "graph", "info", "story", "task_counts", "task_stream",
    "tasks_page", "workers",
]  # fmt: skip

#: the largest task graph drawn node by node
GRAPH_LIMIT = 500
#: groups listed in a snapshot (the ones with the most tasks held)
MAX_GROUPS = 50
#: rows of the task stream sent at most at once
STREAM_LIMIT = 5_000
#: the largest page of tasks
PAGE_LIMIT = 1_000
#: task states in the order the page shows them
STATES = ("released", "waiting", "no-worker", "queued", "processing", "memory", "erred")


def info(s: Scheduler) -> dict[str, Any]:
    """The scheduler at a glance."""
    from .. import __version__

    workers = s.state.workers
    beats = s.heartbeats
    return {
        "address": s.address,
        "name": s.name,
        "version": __version__,
        "started": s.started,
        "now": time.time(),
        "workers": len(workers),
        "threads": sum(w.nthreads for w in workers.values()),
        "memory": sum(b.memory for b in beats.values()),
        "memory_limit": sum(w.memory_limit for w in workers.values()),
        "tasks": len(s.state.tasks),
        "clients": len(s.state.clients),
        "dashboard": s.dashboard_link,
    }


def workers(s: Scheduler) -> list[dict[str, Any]]:
    """One row per worker: its load as the scheduler sees it and as its heartbeat said."""
    out = []
    now = asyncio.get_running_loop().time()  # the clock of ``_last_seen``
    empty = Heartbeat()
    for address, w in s.state.workers.items():
        beat = s.heartbeats.get(address) or empty
        seen = s._last_seen.get(address)
        out.append({
            "address": address,
            "name": w.name,
            "nthreads": w.nthreads,
            "memory_limit": w.memory_limit,
            "memory": beat.memory,
            "managed_bytes": getattr(beat, "managed_bytes", 0),
            "spilled_bytes": getattr(beat, "spilled_bytes", 0),
            "paused": bool(getattr(beat, "paused", False)),
            "cpu": beat.cpu,
            "executing": beat.executing,
            "ready": beat.ready,
            "processing": len(w.processing),
            "in_memory": len(w.has_what),
            "nbytes": w.nbytes,
            "occupancy": w.occupancy,
            "bytes_in": getattr(beat, "bytes_in", 0),
            "bytes_out": getattr(beat, "bytes_out", 0),
            "retiring": w.retiring,
            "resources": w.resources,
            "last_seen": None if seen is None else max(0.0, now - seen),
            "dashboard": s.worker_dashboards.get(address, ""),
        })  # fmt: skip
    return out


def task_counts(s: Scheduler, max_groups: int = MAX_GROUPS) -> dict[str, Any]:
    """Tasks by state, and by group and state for the groups holding the most tasks."""
    groups = s.state.groups.groups
    if len(groups) > max_groups:
        chosen = heapq.nlargest(max_groups, groups.items(), key=lambda item: item[1].live)
    else:
        chosen = list(groups.items())
    durations = s.state.group_duration
    return {
        "total": len(s.state.tasks),
        "by_state": s.state.groups.by_state(),
        "groups": [{"name": name, "states": c.as_dict(), "live": c.live,
                    "duration": durations.get(name)}
                   for name, c in sorted(chosen)],
        "groups_total": len(groups),
        "transitions": sum(s.state.transition_counts.values()),
    }  # fmt: skip


def tasks_page(s: Scheduler, offset: int = 0, limit: int = 100, state: str | None = None,
               group: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Counts, plus one page of tasks (in the order the scheduler first saw them),
    optionally only those in ``state`` and/or of ``group``."""
    limit = max(0, min(limit, PAGE_LIMIT))
    offset = max(0, offset)
    values: Any = s.state.tasks.values()
    if state is not None or group is not None:
        values = (ts for ts in values
                  if (state is None or ts.state == state)
                  and (group is None or ts.group == group))  # fmt: skip
    rows = [_task_row(ts) for ts in itertools.islice(values, offset, offset + limit)]
    return {**task_counts(s), "offset": offset, "limit": limit, "state": state,
            "group": group, "tasks": rows}  # fmt: skip


def _task_row(ts: Any) -> dict[str, Any]:
    return {
        "key": ts.key,
        "group": ts.group,
        "state": ts.state,
        "worker": ts.processing_on.address if ts.processing_on is not None else None,
        "who_has": sorted(w.address for w in ts.who_has),
        "nbytes": ts.nbytes,
        "type": ts.typename,
        "dependencies": len(ts.dependencies),
        "dependents": len(ts.dependents),
        "error": ts.failure.text if ts.failure is not None else None,
    }


def task_stream(s: Scheduler, since: int | None = None, limit: int = STREAM_LIMIT,
                window: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """Task runs numbered ``since`` and later (at most ``limit``, the newest). Without
    ``since``: the runs that ended in the last ``window`` seconds."""
    stream = s.task_stream
    limit = max(0, min(limit, STREAM_LIMIT))
    if since is None or since < 0:
        rows = stream.recent(limit)
        cutoff = time.time() - window
        rows = [r for r in rows if r.stop >= cutoff]
        missed = 0
        next_index = stream.count
    else:
        rows, next_index, missed = stream.since(since, limit)
    return {
        "next": next_index,
        "missed": missed,
        "now": time.time(),
        "rows": [[r.key, r.group, r.worker, r.start, r.stop, r.status] for r in rows],
    }


def graph(s: Scheduler, limit: int = GRAPH_LIMIT) -> dict[str, Any]:
    """The task graph, node by node, when it has at most ``limit`` tasks."""
    tasks = s.state.tasks
    if len(tasks) > limit:
        return {"count": len(tasks), "limit": limit, "too_big": True, "nodes": [], "edges": []}
    index = {key: i for i, key in enumerate(tasks)}
    nodes = [{"key": ts.key, "group": ts.group, "state": ts.state} for ts in tasks.values()]
    edges = [[index[d.key], index[ts.key]] for ts in tasks.values() for d in ts.dependencies
             if d.key in index]  # fmt: skip
    return {"count": len(tasks), "limit": limit, "too_big": False, "nodes": nodes,
            "edges": edges}  # fmt: skip


def story(s: Scheduler, key: str) -> dict[str, Any]:
    """What happened to ``key``: its transitions (from the bounded story log), its runs
    (from the task stream) and where it is now."""
    ts = s.state.tasks.get(key)
    transitions = [{"start": start, "finish": finish, "stimulus": stimulus, "time": when}
                   for _, start, finish, stimulus, when in s.state.story(key)]  # fmt: skip
    runs = [{"worker": r.worker, "start": r.start, "stop": r.stop, "status": r.status}
            for r in s.task_stream.rows if r.key == key]  # fmt: skip
    return {
        "key": key,
        "group": key_group(key),
        "known": ts is not None,
        "task": _task_row(ts) if ts is not None else None,
        "transitions": transitions,
        "runs": runs,
    }
