"""`validate`: the scheduler's invariants, checked after every `handle` in tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import placement
from .scheduler_records import _NEEDS_INPUTS

if TYPE_CHECKING:
    from .scheduler_state import SchedulerState


def validate(state: SchedulerState) -> None:
    """Check the invariants in the module docstring; raise AssertionError on a breach."""
    queue = set(state.queue)
    for key, ts in state.tasks.items():
        assert ts.key == key
        if ts.state == "waiting":
            assert ts.waiting_on, f"{ts} waits on nothing"
            assert ts.waiting_on == {d for d in ts.dependencies if d.state != "memory"}, ts
            for d in ts.waiting_on:
                assert d.state in _NEEDS_INPUTS, (ts, d)
        if ts.state == "processing":
            ws = ts.processing_on
            assert ws is not None and ts in ws.processing, ts
            assert ws.address in state.workers, ts
            assert all(d.state == "memory" for d in ts.dependencies), ts
        else:
            assert ts.processing_on is None, ts
        if ts.state == "memory":
            assert ts.who_has, f"{ts} has no holder"
            for ws in ts.who_has:
                assert ts in ws.has_what and ws.address in state.workers, ts
        else:
            assert not ts.who_has, f"{ts} has holders but is not in memory"
        if ts.state == "no-worker":
            assert ts in state.unrunnable
            assert all(d.state == "memory" for d in ts.dependencies), ts
            valid, _ = placement.valid_workers(ts, state.workers.values())
            assert not valid, f"{ts} is no-worker, but {valid} could run it"
        if ts.state == "queued":
            assert all(d.state == "memory" for d in ts.dependencies), ts
            assert (ts.priority, ts.key) in queue, f"{ts} is not in the queue"
        for dep in ts.dependencies:
            assert ts in dep.dependents, (ts, dep)
            assert state.tasks.get(dep.key) is dep, f"{ts} depends on forgotten {dep}"
        for client in ts.who_wants:
            assert ts in state.clients.get(client, ()), (ts, client)
    for ts in state.unrunnable:
        assert ts.state == "no-worker" and state.tasks.get(ts.key) is ts, ts
    for ws in state.workers.values():
        for ts in ws.processing:
            assert ts.processing_on is ws, (ws, ts)
        assert ws.long_running <= ws.processing, (ws, ws.long_running - ws.processing)
        for ts in ws.has_what:
            assert ws in ts.who_has, (ws, ts)
        assert ws.nbytes == sum(ts.nbytes for ts in ws.has_what), ws
        expected = sum(ts.est for ts in ws.processing)
        assert abs(ws.occupancy - expected) < 1e-6 * max(1.0, expected), (ws, expected)
        for r, total in ws.resources.items():
            used = sum((t.spec.resources or {}).get(r, 0.0) for t in ws.processing
                       if t.spec is not None)  # fmt: skip
            assert abs(ws.used_resources.get(r, 0.0) - used) < 1e-9 * max(1.0, total), ws
    roomy = {w for w in state.workers.values() if not w.retiring and placement.has_capacity(w)}
    assert set(state.roomy) == roomy, (list(state.roomy), roomy)
    assert state.active_workers == sum(not w.retiring for w in state.workers.values())
    for client, keys in state.clients.items():
        for ts in keys:
            assert client in ts.who_wants, (client, ts)
    _validate_group_counts(state)


def _validate_group_counts(state: SchedulerState) -> None:
    """`TaskGroups` agrees with a count over every task."""
    expected: dict[str, dict[str, int]] = {}
    for ts in state.tasks.values():
        per = expected.setdefault(ts.group, {})
        per[ts.state] = per.get(ts.state, 0) + 1
    counted = {g: {s: n for s, n in c.states.items() if n} for g, c in state.groups.groups.items()}
    assert counted == expected, (counted, expected)
    for g, c in state.groups.groups.items():
        assert c.live == sum(c.states.values()) > 0, (g, c.states, c.live)
    totals: dict[str, int] = {}
    for per in expected.values():
        for s, n in per.items():
            totals[s] = totals.get(s, 0) + n
    assert state.groups.by_state() == totals, (state.groups.by_state(), totals)
