"""Pure tests of `WorkerState`'s lanes: tasks handed ahead (``lookahead``) to run back to
back on a thread slot, and taken back (`Revoke`) when they must not start.

Every state here validates itself after each ``handle``. Each test reads as given / when /
then.
"""

from __future__ import annotations

from shoal.core.worker_events import (
    ComputeTaskEvent,
    Execute,
    ExecuteSkipped,
    FreeKeysEvent,
    PauseEvent,
    Rejoin,
    RejoinEvent,
    ReleaseData,
    Revoke,
    SecedeEvent,
    WorkerInstruction,
)
from shoal.core.worker_state import WorkerState
from shoal.protocol.messages import ComputeTask, TaskErred, TaskFinished
from shoal.protocol.serialize import Serialized
from shoal.testing.core import (
    DUMMY_FUNCTION,
    compute_task,
    execute_done,
    execute_failed,
    messages,
)


def worker(nthreads: int = 1, lookahead: int = 2) -> WorkerState:
    return WorkerState("w1", nthreads, validate=True, lookahead=lookahead)


def started(ws: WorkerState, *keys: str) -> list[WorkerInstruction]:
    """``keys`` asked for in that priority order (the first most urgent)."""
    return ws.handle([compute_task(k, priority=(0, i)) for i, k in enumerate(keys)], now=1.0)


def executes(out: list[WorkerInstruction]) -> list[tuple[str, int]]:
    return [(i.key, i.lane) for i in out if isinstance(i, Execute)]


def lane_keys(ws: WorkerState) -> list[list[str]]:
    return [[ts.key for ts in lane] for lane in ws.lanes.values()]


def skipped(key: str) -> ExecuteSkipped:
    return ExecuteSkipped(f"revoke-{key}", key)


def test_tasks_are_handed_ahead_behind_the_running_ones_up_to_the_lookahead() -> None:
    # given one thread and a lookahead of two
    ws = worker()
    # when five tasks are asked for
    out = started(ws, "a", "b", "c", "d", "e")
    # then the first runs, the next two are queued in its lane, the rest wait
    assert [k for k, _ in executes(out)] == ["a", "b", "c"]
    assert len({lane for _, lane in executes(out)}) == 1
    assert lane_keys(ws) == [["a", "b", "c"]]
    assert {ts.key for ts in ws.executing} == {"a"}
    assert [ws.tasks[k].state for k in "abcde"] == ["executing"] * 3 + ["ready"] * 2


def test_lanes_take_tasks_ahead_evenly() -> None:
    ws = worker(nthreads=2, lookahead=1)
    out = started(ws, "a", "b", "c", "d", "e")
    # two lanes, each one task ahead; the fifth waits
    assert sorted(lane_keys(ws)) == [["a", "c"], ["b", "d"]]
    assert len(executes(out)) == 4 and ws.tasks["e"].state == "ready"


def test_without_lookahead_nothing_is_handed_ahead() -> None:
    ws = worker(lookahead=0)
    assert [k for k, _ in executes(started(ws, "a", "b"))] == ["a"]
    assert ws.tasks["b"].state == "ready"


def test_the_head_ending_passes_its_slot_to_the_next_in_its_lane() -> None:
    ws = worker()
    started(ws, "a", "b", "c", "d")
    # when the running task ends
    out = ws.handle([execute_done("a")], now=2.0)
    # then it is reported, the next in its lane holds the slot, and one more is handed
    assert [m.key for m in messages(out, TaskFinished)] == ["a"]
    assert {ts.key for ts in ws.executing} == {"b"}
    assert lane_keys(ws) == [["b", "c", "d"]]
    assert [k for k, _ in executes(out)] == ["d"]


def test_a_failure_passes_the_slot_on_too() -> None:
    ws = worker(lookahead=1)
    started(ws, "a", "b")
    out = ws.handle([execute_failed("a")], now=2.0)
    assert [m.key for m in messages(out, TaskErred)] == ["a"]
    assert {ts.key for ts in ws.executing} == {"b"} and lane_keys(ws) == [["b"]]


def test_a_queued_task_freed_is_taken_back_and_forgotten_once_skipped() -> None:
    ws = worker()
    started(ws, "a", "b", "c")
    # when the scheduler frees (or steals) a task queued behind the running one
    out = ws.handle([FreeKeysEvent("free", ["b"])], now=2.0)
    # then it is taken back, and stays in its lane until the server says so
    assert out == [Revoke("b")]
    assert ws.tasks["b"].state == "cancelled"
    out = ws.handle([skipped("b")], now=3.0)
    assert out == [] and "b" not in ws.tasks
    assert lane_keys(ws) == [["a", "c"]]
    # and the lane goes on without it
    ws.handle([execute_done("a")], now=4.0)
    assert {ts.key for ts in ws.executing} == {"c"}


def test_a_queued_task_freed_that_a_thread_took_first_is_dropped_when_it_ends() -> None:
    ws = worker()
    started(ws, "a", "b")
    assert ws.handle([FreeKeysEvent("free", ["b"])], now=2.0) == [Revoke("b")]
    # the thread had started it already: the server took nothing back, its run ends
    ws.handle([execute_done("a")], now=3.0)
    out = ws.handle([execute_done("b")], now=4.0)
    assert out == [ReleaseData("b")] and "b" not in ws.tasks
    assert not ws.lanes and not ws.executing and not ws.revoking


def test_a_queued_task_asked_for_with_another_spec_runs_the_new_spec_after_the_skip() -> None:
    ws = worker()
    started(ws, "a", "b")
    other = ComputeTask("b", DUMMY_FUNCTION, Serialized([b"other"]), {}, {}, (0, 9))
    out = ws.handle([ComputeTaskEvent("again", other)], now=2.0)
    assert out == [Revoke("b")] and ws.tasks["b"].state == "cancelled"
    out = ws.handle([skipped("b")], now=3.0)
    # handed again, for the new spec
    assert [k for k, _ in executes(out)] == ["b"]
    assert ws.tasks["b"].run is other


def test_a_queued_task_freed_then_asked_for_again_runs_once_skipped() -> None:
    ws = worker()
    started(ws, "a", "b")
    ws.handle([FreeKeysEvent("free", ["b"])], now=2.0)
    # asked again with the same spec: the run handed ahead is wanted again...
    assert ws.handle([compute_task("b", priority=(0, 1))], now=3.0) == []
    assert ws.tasks["b"].state == "executing"
    # ...but it was taken back meanwhile: it is handed again
    out = ws.handle([skipped("b")], now=4.0)
    assert [k for k, _ in executes(out)] == ["b"]


def test_pausing_takes_back_what_was_handed_ahead_and_resuming_hands_it_again() -> None:
    ws = worker()
    started(ws, "a", "b", "c")
    out = ws.handle([PauseEvent("memory", True)], now=2.0)
    assert out == [Revoke("b"), Revoke("c")]
    out = ws.handle([skipped("b"), skipped("c"), execute_done("a")], now=3.0)
    # paused: nothing starts, and what was taken back waits, ready
    assert executes(out) == [] and not ws.executing
    assert (ws.tasks["b"].state, ws.tasks["c"].state) == ("ready", "ready")
    out = ws.handle([PauseEvent("memory", False)], now=4.0)
    assert [k for k, _ in executes(out)] == ["b", "c"]


def test_a_head_that_secedes_leaves_its_lane_to_the_next() -> None:
    ws = worker()
    started(ws, "a", "b", "c", "d")
    out = ws.handle([SecedeEvent("secede-a", "a")], now=2.0)
    # the next in its lane holds the slot; one more is handed behind it
    assert ws.tasks["a"].state == "long-running" and ws.tasks["a"].lane is None
    assert {ts.key for ts in ws.executing} == {"b"}
    assert lane_keys(ws) == [["b", "c", "d"]]
    assert [k for k, _ in executes(out)] == ["d"]


def test_a_seceded_task_waiting_to_rejoin_takes_back_the_tasks_handed_ahead() -> None:
    ws = worker()
    started(ws, "a", "b", "c", "d")
    ws.handle([SecedeEvent("secede-a", "a")], now=2.0)
    # when the seceded task wants its slot back, every slot busy
    out = ws.handle([RejoinEvent("rejoin-a", "a")], now=3.0)
    # then what is queued is taken back, so that it gets the next slot that frees
    assert out == [Revoke("c"), Revoke("d")]
    out = ws.handle([skipped("c"), skipped("d"), execute_done("b")], now=4.0)
    assert [i for i in out if isinstance(i, (Rejoin, Execute))] == [Rejoin("a")]
    assert {ts.key for ts in ws.executing} == {"a"} and not ws.lanes
    # and what was taken back runs once the rejoined task ends
    out = ws.handle([execute_done("a")], now=5.0)
    assert [k for k, _ in executes(out)] == ["c", "d"]


def test_a_skip_from_before_a_restart_is_ignored() -> None:
    ws = worker()
    assert ws.handle([skipped("ghost")], now=1.0) == []


def test_a_task_with_resources_is_not_handed_ahead() -> None:
    ws = worker()
    gpu = ComputeTask("g", DUMMY_FUNCTION, Serialized([b""]), {}, {}, (0, 1), {"GPU": 1.0})
    out = ws.handle([compute_task("a", priority=(0, 0)), ComputeTaskEvent("gpu", gpu),
                     compute_task("b", priority=(0, 2))], now=1.0)  # fmt: skip
    # it waits for a free slot (and, in priority order, so does what comes after it)
    assert [k for k, _ in executes(out)] == ["a"]
    out = ws.handle([execute_done("a")], now=2.0)
    assert [k for k, _ in executes(out)] == ["g", "b"]
    assert lane_keys(ws)[-1] == ["g", "b"]
