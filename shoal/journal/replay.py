"""Rebuild a `SchedulerState` from a journal, and picture a state as events (compaction).

Replay feeds every record to the same pure `SchedulerState.handle` the live scheduler used,
with the time it was handled then; the instructions it returns were sent long ago and are
dropped. A compacted journal starts with a `SNAPSHOT` record: events that rebuild the live
tasks (their opaque specs), each client's holds (with their generations) and each worker's
data. What a snapshot does not keep (see docs/journal.md): erred tasks are computed again,
scattered data survives only while a worker holds it, and the placement of running tasks
and the learned task durations start afresh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..core.scheduler_events import (
    ClientDisconnected,
    DataScattered,
    KeysReleased,
    KeysWanted,
    SchedulerEvent,
    TasksSubmitted,
    WorkerJoined,
    WorkerLeft,
)
from ..core.scheduler_records import FIRE_AND_FORGET
from ..core.scheduler_state import SchedulerState
from .file import scan
from .records import RESTART, SNAPSHOT, Record

#: The holder that keeps every task alive while a snapshot is replayed.
SNAPSHOT_HOLDER = "journal:snapshot"


@dataclass(slots=True)
class ReplayStats:
    records: int
    events: int
    #: bytes of whole records replayed
    bytes: int
    #: bytes cut off a torn or corrupt tail
    cut_bytes: int


def apply(state: SchedulerState, record: Record) -> None:
    """Handle one journal record, as the live scheduler did (instructions dropped)."""
    if record.kind in (SNAPSHOT, RESTART):
        state.restored = True
    if record.events:
        state.handle(record.events, record.now)
    state.restored = record.restored


def replay(path: str | os.PathLike[str], state: SchedulerState,
           repair: bool = True) -> ReplayStats:  # fmt: skip
    """Rebuild ``state`` (a fresh one) from the journal at ``path``; cut a torn tail."""
    result = scan(path, repair=repair)
    events = 0
    for record in result.records:
        apply(state, record)
        events += len(record.events)
    return ReplayStats(len(result.records), events, result.good_bytes, result.cut_bytes)


def snapshot_events(state: SchedulerState) -> list[SchedulerEvent]:
    """Events that rebuild ``state``'s tasks, holds and workers' data from nothing, to be
    handled with ``restored`` on (held results are accepted as they are announced)."""
    sid = "journal-snapshot"
    tasks = sorted(state.tasks.values(), key=lambda ts: ts.priority[1])
    out: list[SchedulerEvent] = []
    for ws in state.workers.values():
        out.append(WorkerJoined(sid, ws.address, ws.nthreads, ws.name, ws.memory_limit,
                                dict(ws.resources)))  # fmt: skip
    scattered = [ts for ts in tasks if ts.spec is None and ts.state == "memory"]
    if scattered:
        out.append(DataScattered(sid, SNAPSHOT_HOLDER, [ts.key for ts in scattered],
                                 [[w.address for w in ts.who_has] for ts in scattered],
                                 [ts.nbytes for ts in scattered]))  # fmt: skip
    specs = [ts.spec for ts in tasks if ts.spec is not None]
    keys = [ts.key for ts in tasks if ts.spec is not None]
    out.append(TasksSubmitted(sid, SNAPSHOT_HOLDER, specs, keys))
    for ws in state.workers.values():
        held = sorted(ws.has_what, key=lambda ts: ts.priority[1])
        if held:
            out.append(WorkerJoined(sid, ws.address, ws.nthreads, ws.name, ws.memory_limit,
                                    dict(ws.resources), [ts.key for ts in held],
                                    [ts.nbytes for ts in held]))  # fmt: skip
    for client, held_tasks in state.clients.items():
        if client == FIRE_AND_FORGET:
            continue
        ordered = sorted(held_tasks, key=lambda ts: ts.priority[1])
        out.append(KeysWanted(sid, client, [ts.key for ts in ordered],
                              [ts.who_wants[client] for ts in ordered]))  # fmt: skip
    ff = state.clients.get(FIRE_AND_FORGET)
    if ff:
        out.append(KeysWanted(sid, FIRE_AND_FORGET, sorted(ts.key for ts in ff)))
    out.append(KeysReleased(sid, SNAPSHOT_HOLDER, [ts.key for ts in tasks]))
    out.append(ClientDisconnected(sid, SNAPSHOT_HOLDER))
    return out


def restart_events(state: SchedulerState, reason: str) -> list[SchedulerEvent]:
    """What a restarted scheduler handles first: every worker it knew is gone (those that
    come back join again, with the results they hold)."""
    return [WorkerLeft(f"journal-restart-{a}", a, reason, graceful=True) for a in state.workers]


def describe(state: SchedulerState, placement: bool = True) -> dict[str, Any]:
    """``state``'s tasks (state, spec, dependencies, holds, holders) and clients, as plain
    values: two states are equal for the journal when their descriptions are equal.
    ``placement=False`` leaves out which worker runs or holds what."""
    tasks: dict[str, Any] = {}
    for key, ts in state.tasks.items():
        row: dict[str, Any] = {
            "state": ts.state,
            "spec": None if ts.spec is None else (ts.spec.function, ts.spec.args,
                                                  ts.spec.dependencies),
            "dependencies": sorted(d.key for d in ts.dependencies),
            "dependents": sorted(d.key for d in ts.dependents),
            "waiting_on": sorted(d.key for d in ts.waiting_on),
            "who_wants": dict(sorted(ts.who_wants.items())),
            # Not which failure: a task with two erred inputs inherits the one met first,
            # and sets of tasks are met in no fixed order.
            "erred": ts.failure is not None,
        }
        if placement:
            row["who_has"] = sorted(w.address for w in ts.who_has)
            row["processing_on"] = ts.processing_on.address if ts.processing_on else None
        tasks[key] = row
    clients = {c: sorted(ts.key for ts in held) for c, held in state.clients.items() if held}
    return {"tasks": tasks, "clients": clients, "workers": sorted(state.workers)}
