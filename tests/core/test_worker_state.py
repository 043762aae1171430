"""Pure tests of `WorkerState`: feed events, check the instructions and the state.

Every state here is built with ``validate=True``, so `validate_state` runs after each
``handle``. Each test reads as given / when / then.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import pytest

from shoal.core.worker_events import (
    ComputeTaskEvent,
    DataPut,
    Execute,
    ExecuteSkipped,
    FreeKeysEvent,
    GatherDep,
    GatherDone,
    GatherFailed,
    RefreshWhoHasEvent,
    Rejoin,
    RejoinEvent,
    ReleaseData,
    Revoke,
    SecedeEvent,
    ToScheduler,
    WorkerEvent,
    WorkerInstruction,
)
from shoal.core.worker_state import GATHER_BATCH_BYTES, WorkerState
from shoal.protocol.messages import (
    AddKeys,
    ComputeTask,
    LongRunning,
    MissingData,
    TaskErred,
    TaskFinished,
)
from shoal.protocol.serialize import Serialized
from shoal.testing.core import (
    DUMMY_EXCEPTION,
    compute_task,
    execute_done,
    execute_failed,
    make_worker,
    messages,
)


def free(*keys: str) -> FreeKeysEvent:
    return FreeKeysEvent("free", list(keys))


def gather_done(peer: str, nbytes: dict[str, int], missing: Sequence[str] = ()) -> GatherDone:
    return GatherDone(f"gather-{peer}", peer, nbytes, list(missing))


def executes(out: list[WorkerInstruction]) -> list[str]:
    return [i.key for i in out if isinstance(i, Execute)]


def finished(out: list[WorkerInstruction]) -> list[str]:
    return [m.key for m in messages(out, TaskFinished)]


def released(out: list[WorkerInstruction]) -> list[str]:
    return [i.key for i in out if isinstance(i, ReleaseData)]


def state_of(ws: WorkerState, key: str) -> str | None:
    ts = ws.tasks.get(key)
    return None if ts is None else ts.state


# ------------------------------------------------------------------- running


def test_compute_task_without_dependencies_executes() -> None:
    # given
    ws = make_worker(nthreads=1)

    # when
    out = ws.handle([compute_task("x")], now=0.0)

    # then
    assert out == [Execute("x")]
    assert state_of(ws, "x") == "executing"


def test_execute_done_reports_task_finished() -> None:
    # given
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)

    # when
    out = ws.handle([execute_done("x", nbytes=100, stimulus_id="run-x")], now=1.0)

    # then
    assert out == [ToScheduler(TaskFinished("x", 100, "int", 0.0, 1.0, None, "run-x"))]
    assert state_of(ws, "x") == "memory"
    assert ws.nbytes_in_memory == 100
    assert ws.executing == set()


def test_nthreads_limit_and_priority_order() -> None:
    # given: two threads
    ws = make_worker(nthreads=2)

    # when four tasks arrive at once
    out = ws.handle([compute_task("low", priority=(1, 1)), compute_task("top", priority=(-5, 2)),
                     compute_task("mid-a", priority=(0, 3)), compute_task("mid-b", priority=(0, 4))],
                    now=0.0)  # fmt: skip

    # then: the two of highest priority (lowest tuple) run, the others wait their turn
    assert executes(out) == ["top", "mid-a"]
    assert state_of(ws, "mid-b") == "ready" and state_of(ws, "low") == "ready"

    # when one finishes: the next by priority starts
    out = ws.handle([execute_done("top")], now=1.0)
    assert executes(out) == ["mid-b"]
    out = ws.handle([execute_done("mid-a"), execute_done("mid-b")], now=2.0)
    assert executes(out) == ["low"]


def test_execute_failed_reports_task_erred() -> None:
    # given
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)

    # when
    out = ws.handle([execute_failed("x", text="ValueError: boom", stimulus_id="run-x")], now=1.0)

    # then
    assert out == [ToScheduler(TaskErred("x", DUMMY_EXCEPTION, None, "ValueError: boom", 0.0, 1.0,
                                         None, "run-x"))]  # fmt: skip
    assert ws.executing == set()
    assert state_of(ws, "x") in (None, "error")


def test_failed_task_can_be_retried_on_the_same_worker() -> None:
    # given: x failed here
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.handle([execute_failed("x")], now=1.0)

    # when the scheduler sends it again
    out = ws.handle([compute_task("x")], now=2.0)

    # then
    assert executes(out) == ["x"]
    assert finished(ws.handle([execute_done("x")], now=3.0)) == ["x"]


def test_failed_task_leaves_nothing_behind() -> None:
    # given: x = f(a) with a fetched from a peer, and x fails
    ws = make_worker()
    ws.handle([compute_task("x", {"a": ["peer"]})], now=0.0)
    ws.handle([gather_done("peer", {"a": 8})], now=1.0)

    # when
    ws.handle([execute_failed("x")], now=2.0)
    out = ws.handle([free("a")], now=3.0)

    # then: the scheduler never frees an erred key on the worker, so nothing may stay
    assert released(out) == ["a"]
    assert ws.tasks == {}


def test_duplicate_compute_of_a_key_in_memory_reports_it_again() -> None:
    # given
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.handle([execute_done("x", nbytes=5)], now=1.0)

    # when
    out = ws.handle([compute_task("x")], now=2.0)

    # then: not run again, reported again
    assert executes(out) == []
    assert [(m.key, m.nbytes) for m in messages(out, TaskFinished)] == [("x", 5)]


def test_duplicate_compute_of_a_running_key_is_ignored() -> None:
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)

    assert ws.handle([compute_task("x")], now=1.0) == []
    assert finished(ws.handle([execute_done("x")], now=2.0)) == ["x"]


# ------------------------------------------------------------------ fetching


def test_dependencies_on_other_workers_are_gathered_batched_per_peer() -> None:
    # given
    ws = make_worker("w1")

    # when: x needs a and b (on p1) and c (on p2)
    out = ws.handle([compute_task("x", {"a": ["p1"], "b": ["p1"], "c": ["p2"]},
                                  nbytes={"a": 10, "b": 20, "c": 30})], now=0.0)  # fmt: skip

    # then: one gather per peer, nothing runs yet
    gathers = {g.peer: g for g in messages(out, GatherDep)}
    assert set(gathers) == {"p1", "p2"}
    assert sorted(gathers["p1"].keys) == ["a", "b"] and gathers["p1"].total_nbytes == 30
    assert gathers["p2"].keys == ["c"] and gathers["p2"].total_nbytes == 30
    assert executes(out) == []
    assert state_of(ws, "x") == "waiting"
    assert {state_of(ws, k) for k in "abc"} == {"flight"}


def test_gather_done_executes_and_reports_added_keys() -> None:
    # given
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"], "c": ["p2"]})], now=0.0)

    # when the first gather lands: still waiting for c
    out = ws.handle([gather_done("p1", {"a": 10})], now=1.0)
    assert executes(out) == []
    assert messages(out, AddKeys) == [AddKeys(["a"], [10], "gather-p1")]

    # when the second lands: x runs
    out = ws.handle([gather_done("p2", {"c": 30})], now=2.0)
    assert executes(out) == ["x"]
    assert messages(out, AddKeys) == [AddKeys(["c"], [30], "gather-p2")]
    assert ws.nbytes_in_memory == 40


def test_inputs_are_kept_for_the_scheduler_until_freed() -> None:
    # given: x = f(a), a fetched, x done
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)
    ws.handle([gather_done("p1", {"a": 10})], now=1.0)
    ws.handle([execute_done("x")], now=2.0)

    # then a stays: the scheduler was told this worker holds a copy
    assert state_of(ws, "a") == "memory"

    # when the scheduler frees them
    out = ws.handle([free("a", "x")], now=3.0)
    assert sorted(released(out)) == ["a", "x"]
    assert ws.tasks == {} and ws.nbytes_in_memory == 0


def test_input_held_locally_is_not_fetched() -> None:
    # given: a computed here
    ws = make_worker("w1")
    ws.handle([compute_task("a")], now=0.0)
    ws.handle([execute_done("a")], now=1.0)

    # when x = f(a) arrives, saying a is here (and on p1)
    out = ws.handle([compute_task("x", {"a": ["w1", "p1"]})], now=2.0)

    # then
    assert out == [Execute("x")]


def test_two_tasks_sharing_an_input_fetch_it_once() -> None:
    ws = make_worker("w1", nthreads=2)

    out = ws.handle([compute_task("x", {"a": ["p1"]}), compute_task("y", {"a": ["p1"]})], now=0.0)

    assert messages(out, GatherDep) == [GatherDep("p1", ["a"], 8)]
    out = ws.handle([gather_done("p1", {"a": 8})], now=1.0)
    assert sorted(executes(out)) == ["x", "y"]


def test_gathers_are_split_into_batches_of_bounded_size() -> None:
    # given: three big inputs on one peer
    ws = make_worker("w1")
    big = GATHER_BATCH_BYTES // 2 + 1
    sizes = {"a": big, "b": big, "c": big}

    # when
    out = ws.handle([compute_task("x", {k: ["p1"] for k in sizes}, nbytes=sizes)], now=0.0)

    # then: one batch at a time per peer, each under the limit (or a single key)
    [g] = messages(out, GatherDep)
    assert len(g.keys) == 1
    fetched = list(g.keys)
    while len(fetched) < 3:
        out = ws.handle([gather_done("p1", {k: big for k in g.keys})], now=1.0)
        [g] = messages(out, GatherDep)
        fetched += g.keys
    assert sorted(fetched) == ["a", "b", "c"]
    out = ws.handle([gather_done("p1", {k: big for k in g.keys})], now=2.0)
    assert executes(out) == ["x"]


def test_keys_replicated_on_three_workers_are_fetched_from_all_three_at_once() -> None:
    # given: nine inputs, each held by the same three peers
    ws = make_worker("w1")
    holders = ["p1", "p2", "p3"]
    deps = {f"a{i}": holders for i in range(9)}

    # when
    out = ws.handle([compute_task("x", deps, nbytes={k: 1000 for k in deps})], now=0.0)

    # then: one gather per peer, all three in flight together, three keys each
    gathers = messages(out, GatherDep)
    assert sorted(g.peer for g in gathers) == holders
    assert sorted(len(g.keys) for g in gathers) == [3, 3, 3]
    assert sorted(k for g in gathers for k in g.keys) == sorted(deps)
    assert set(ws.in_flight) == set(holders)

    out = ws.handle([gather_done(g.peer, {k: 1000 for k in g.keys}) for g in gathers], now=1.0)
    assert executes(out) == ["x"]


def test_spread_fetches_balance_bytes_not_key_counts() -> None:
    # given: one big input and three small ones, all on p1 and p2
    ws = make_worker("w1")
    sizes = {"big": 3000, "s1": 1000, "s2": 1000, "s3": 1000}

    # when
    out = ws.handle([compute_task("x", {k: ["p1", "p2"] for k in sizes}, nbytes=sizes)], now=0.0)

    # then: each peer carries 3000 bytes, whatever the order the keys were considered in
    gathers = messages(out, GatherDep)
    assert sorted(g.peer for g in gathers) == ["p1", "p2"]
    assert sorted(g.total_nbytes for g in gathers) == [3000, 3000]


def test_missing_data_with_another_holder_retries_it_and_tells_the_scheduler() -> None:
    # given: a is on p1 and p2; we asked p1
    ws = make_worker("w1")
    out = ws.handle([compute_task("x", {"a": ["p1", "p2"]})], now=0.0)
    assert messages(out, GatherDep) == [GatherDep("p1", ["a"], 8)]

    # when p1 answers that it does not have a
    out = ws.handle([gather_done("p1", {}, missing=["a"])], now=1.0)

    # then: we ask p2, and tell the scheduler p1's copy is gone
    assert messages(out, GatherDep) == [GatherDep("p2", ["a"], 8)]
    assert messages(out, MissingData) == [MissingData("a", "p1", "gather-p1")]
    out = ws.handle([gather_done("p2", {"a": 8})], now=2.0)
    assert executes(out) == ["x"]


def test_gather_failed_reports_missing_data() -> None:
    # given: a and b on p1 only, c on p1 and p2 (and larger, so it is placed first: on p1)
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"], "b": ["p1"], "c": ["p1", "p2"]},
                            nbytes={"a": 8, "b": 8, "c": 16})], now=0.0)  # fmt: skip
    assert ws.in_flight.keys() == {"p1"}

    # when p1 cannot be reached
    out = ws.handle([GatherFailed("gather-p1", "p1", sorted(ws.in_flight["p1"]), "refused")],
                    now=1.0)  # fmt: skip

    # then: every key is reported missing on p1; c is asked from p2; a, b wait for news
    assert sorted(m.key for m in messages(out, MissingData)) == ["a", "b", "c"]
    assert {m.holder for m in messages(out, MissingData)} == {"p1"}
    assert messages(out, GatherDep) == [GatherDep("p2", ["c"], 16)]
    assert state_of(ws, "a") == "fetch" and state_of(ws, "b") == "fetch"

    # when the scheduler says where a and b are now
    out = ws.handle([RefreshWhoHasEvent("refresh", {"a": ["p3"], "b": ["p3", "w1"]})], now=2.0)
    [g] = messages(out, GatherDep)
    assert g.peer == "p3" and sorted(g.keys) == ["a", "b"]


def test_data_put_puts_keys_in_memory() -> None:
    # given
    ws = make_worker("w1")

    # when a client scatters data here
    out = ws.handle([DataPut("put", {"s": 100})], now=0.0)

    # then: nothing to say (the client tells the scheduler), the key is kept
    assert out == []
    assert state_of(ws, "s") == "memory" and ws.nbytes_in_memory == 100

    # and a task using it runs at once
    assert executes(ws.handle([compute_task("x", {"s": ["w1"]})], now=1.0)) == ["x"]

    # and it goes when the scheduler frees it
    ws.handle([execute_done("x")], now=2.0)
    assert sorted(released(ws.handle([free("s", "x")], now=3.0))) == ["s", "x"]
    assert ws.tasks == {}


def test_data_put_for_a_key_in_flight_completes_the_fetch() -> None:
    # given: a being fetched from p1
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)

    # when a is put here directly
    out = ws.handle([DataPut("put", {"a": 8})], now=1.0)

    # then x runs; the late gather changes nothing
    assert executes(out) == ["x"]
    out = ws.handle([gather_done("p1", {"a": 8})], now=2.0)
    assert out == []
    assert state_of(ws, "a") == "memory"


# --------------------------------------------------------------- cancelling


def test_free_keys_on_executing_task_cancels_it_and_drops_its_result() -> None:
    # given: x runs, y waits for the only thread
    ws = make_worker("w1", nthreads=1)
    ws.handle([compute_task("x"), compute_task("y", priority=(1, 0))], now=0.0)

    # when the scheduler frees x
    out = ws.handle([free("x")], now=1.0)

    # then: x is cancelled but still holds its thread
    assert out == []
    assert state_of(ws, "x") == "cancelled"

    # when x's run ends: its result is dropped, not reported, and y gets the thread
    out = ws.handle([execute_done("x")], now=2.0)
    assert released(out) == ["x"]
    assert finished(out) == []
    assert executes(out) == ["y"]
    assert "x" not in ws.tasks


def test_cancelled_task_that_fails_is_not_reported() -> None:
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.handle([free("x")], now=1.0)

    out = ws.handle([execute_failed("x")], now=2.0)

    assert messages(out, TaskErred) == [] and ws.tasks == {}


def test_compute_again_while_cancelled_resumes_and_reports_once() -> None:
    # given: x was cancelled while running
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.handle([free("x")], now=1.0)

    # when the scheduler wants it again
    out = ws.handle([compute_task("x")], now=2.0)

    # then: the run already under way is kept (no second Execute)
    assert out == []
    assert state_of(ws, "x") == "executing"

    # when it ends: reported once
    out = ws.handle([execute_done("x")], now=3.0)
    assert finished(out) == ["x"] and released(out) == []


def compute_spec(key: str, function: bytes, who_has: dict[str, list[str]] | None = None,
                 stimulus_id: str = "") -> ComputeTaskEvent:  # fmt: skip
    """A ComputeTask for ``key`` running ``function`` (another function: another spec)."""
    deps = who_has or {}
    msg = ComputeTask(key, function, Serialized([b"args-of-" + function]), deps,
                      {k: 8 for k in deps})  # fmt: skip
    return ComputeTaskEvent(stimulus_id or f"compute-{key}-{function.decode()}", msg)


def executed_spec(ws: WorkerState, key: str) -> bytes:
    """The function the server would run for ``key`` now (what `Execute` hands it)."""
    compute = ws.tasks[key].compute
    assert compute is not None
    return compute.function


def test_compute_again_with_another_spec_while_cancelled_runs_the_new_spec() -> None:
    # given: k = slow_a() was cancelled while running
    ws = make_worker()
    ws.handle([compute_spec("k", b"slow_a")], now=0.0)
    ws.handle([free("k")], now=1.0)

    # when k is asked for again, as fast_b()
    out = ws.handle([compute_spec("k", b"fast_b")], now=2.0)

    # then slow_a's thread cannot be stopped: nothing starts yet, and k is not resumed
    assert out == []
    assert state_of(ws, "k") == "cancelled"

    # when slow_a's run ends: its result is dropped, unreported, and fast_b starts
    out = ws.handle([execute_done("k")], now=3.0)
    assert finished(out) == [] and released(out) == ["k"]
    assert executes(out) == ["k"] and executed_spec(ws, "k") == b"fast_b"

    # when fast_b's run ends: that one is reported, once
    out = ws.handle([execute_done("k", nbytes=7)], now=4.0)
    assert finished(out) == ["k"] and released(out) == []
    assert state_of(ws, "k") == "memory" and ws.nbytes_in_memory == 7


def test_cancelled_run_of_another_spec_that_fails_is_not_reported_and_the_new_spec_runs() -> None:
    ws = make_worker()
    ws.handle([compute_spec("k", b"slow_a")], now=0.0)
    ws.handle([free("k"), compute_spec("k", b"fast_b")], now=1.0)

    out = ws.handle([execute_failed("k")], now=2.0)

    assert messages(out, TaskErred) == []
    assert executes(out) == ["k"] and executed_spec(ws, "k") == b"fast_b"


def test_new_spec_freed_before_the_old_run_ends_is_dropped_too() -> None:
    ws = make_worker()
    ws.handle([compute_spec("k", b"slow_a")], now=0.0)
    ws.handle([free("k"), compute_spec("k", b"fast_b")], now=1.0)

    # when fast_b is freed as well, then nothing runs once slow_a ends
    ws.handle([free("k")], now=2.0)
    out = ws.handle([execute_done("k")], now=3.0)
    assert executes(out) == [] and finished(out) == [] and released(out) == ["k"]
    assert ws.tasks == {}


def test_the_original_spec_asked_for_again_resumes_the_run() -> None:
    # given: slow_a cancelled, fast_b asked for, then slow_a again (the run under way)
    ws = make_worker()
    ws.handle([compute_spec("k", b"slow_a")], now=0.0)
    ws.handle([free("k"), compute_spec("k", b"fast_b")], now=1.0)
    out = ws.handle([free("k"), compute_spec("k", b"slow_a")], now=2.0)

    # then the run under way is resumed, and its result reported when it ends
    assert out == [] and state_of(ws, "k") == "executing"
    out = ws.handle([execute_done("k")], now=3.0)
    assert finished(out) == ["k"] and executes(out) == []


def test_a_waiting_task_asked_for_with_another_spec_runs_the_new_spec() -> None:
    # given: k waits for an input; it is asked for again with another function
    ws = make_worker()
    ws.handle([compute_spec("k", b"a", {"x": ["w2"]})], now=0.0)
    out = ws.handle([compute_spec("k", b"b")], now=1.0)

    # then the new spec (with no inputs) runs at once
    assert executes(out) == ["k"] and executed_spec(ws, "k") == b"b"


def test_a_result_kept_for_a_task_here_is_not_reported_for_another_spec() -> None:
    # given: k = a() was cancelled, and its result kept as the input of y, which waits on x
    ws = make_worker(nthreads=2)
    ws.handle([compute_spec("k", b"a")], now=0.0)
    ws.handle([free("k"), compute_task("y", {"k": ["w2"], "x": ["w3"]})], now=1.0)
    ws.handle([execute_done("k")], now=2.0)
    assert state_of(ws, "k") == "memory"

    # when k is asked for here with another function
    out = ws.handle([compute_spec("k", b"b")], now=3.0)

    # then a's result is dropped, not reported as b's, and b runs
    assert finished(out) == [] and released(out) == ["k"]
    assert executes(out) == ["k"] and executed_spec(ws, "k") == b"b"
    out = ws.handle([execute_done("k")], now=4.0)
    assert finished(out) == ["k"]


def test_a_long_running_cancelled_task_asked_for_with_another_spec() -> None:
    ws = make_worker(nthreads=1)
    ws.handle([compute_spec("k", b"a")], now=0.0)
    ws.handle([SecedeEvent("s-k", "k")], now=1.0)
    ws.handle([free("k"), compute_spec("k", b"b")], now=2.0)
    assert state_of(ws, "k") == "cancelled" and ws.tasks["k"] in ws.long_running

    out = ws.handle([execute_done("k")], now=3.0)

    assert finished(out) == [] and executes(out) == ["k"] and executed_spec(ws, "k") == b"b"


def test_free_keys_of_memory_key_releases_data() -> None:
    # given
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.handle([execute_done("x", nbytes=50)], now=1.0)

    # when
    out = ws.handle([free("x")], now=2.0)

    # then
    assert out == [ReleaseData("x")]
    assert ws.tasks == {} and ws.nbytes_in_memory == 0


def test_free_keys_of_an_input_still_needed_here_keeps_it_until_used() -> None:
    # given: a computed here, y = f(a) waiting for b from p1
    ws = make_worker("w1")
    ws.handle([compute_task("a")], now=0.0)
    ws.handle([execute_done("a")], now=1.0)
    ws.handle([compute_task("y", {"a": ["w1"], "b": ["p1"]})], now=2.0)

    # when the scheduler frees a (a race: it thinks nobody needs it)
    out = ws.handle([free("a")], now=3.0)

    # then: kept for y
    assert out == [] and state_of(ws, "a") == "memory"

    # and dropped once y has run
    ws.handle([gather_done("p1", {"b": 8})], now=4.0)
    out = ws.handle([execute_done("y")], now=5.0)
    assert released(out) == ["a"]


def test_free_keys_of_waiting_and_ready_tasks_drops_them() -> None:
    # given: x runs on the only thread, y ready, z waiting on a fetch
    ws = make_worker("w1", nthreads=1)
    ws.handle([compute_task("x"), compute_task("y", priority=(1, 0)),
               compute_task("z", {"a": ["p1"]})], now=0.0)  # fmt: skip
    assert (state_of(ws, "y"), state_of(ws, "z")) == ("ready", "waiting")

    # when
    out = ws.handle([free("y", "z")], now=1.0)

    # then: they are gone; a, in flight, is dropped when it lands
    assert out == []
    assert set(ws.tasks) == {"x", "a"}
    out = ws.handle([gather_done("p1", {"a": 8})], now=2.0)
    assert released(out) == ["a"] and messages(out, AddKeys) == []
    out = ws.handle([execute_done("x")], now=3.0)
    assert executes(out) == [] and finished(out) == ["x"]
    assert set(ws.tasks) == {"x"}


def test_free_keys_of_unknown_keys_is_harmless() -> None:
    ws = make_worker()
    assert ws.handle([free("nope")], now=0.0) == []


def test_late_outcomes_of_unknown_tasks_release_their_data() -> None:
    ws = make_worker()
    assert ws.handle([execute_done("ghost")], now=0.0) == [ReleaseData("ghost")]
    assert ws.handle([execute_failed("ghost")], now=0.0) == []


# ---------------------------------------------- a key both fetched and computed


def test_compute_of_a_key_being_fetched_computes_it_now() -> None:
    # given: a is being fetched from p1 as x's input
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)

    # when the scheduler asks us to compute a too (it knows of no copy: p1 left, maybe cut
    # off, and then the fetch would only fail at its timeout)
    out = ws.handle([compute_task("a")], now=1.0)

    # then a runs now, out of the gather
    assert executes(out) == ["a"]
    assert ws.in_flight == {"p1": []}

    # and if the fetch lands after all, its copy is dropped, a is not reported for it
    out = ws.handle([gather_done("p1", {"a": 8})], now=2.0)
    assert finished(out) == [] and executes(out) == []
    assert released(out) == ["a"]

    # and a's run reports it, and x runs
    out = ws.handle([execute_done("a")], now=3.0)
    assert finished(out) == ["a"]
    assert executes(out) == ["x"]


def test_compute_of_a_key_whose_fetch_fails_computes_it() -> None:
    # given: a was being fetched from p1, which then died; the scheduler recomputes a here
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)
    out = ws.handle([free("x"), compute_task("a")], now=1.0)

    # then: a runs here at once, instead of waiting for a copy that is gone
    assert executes(out) == ["a"]

    # and the fetch failing changes nothing
    out = ws.handle([GatherFailed("gather-p1", "p1", ["a"], "refused")], now=2.0)
    assert executes(out) == [] and finished(out) == [] and released(out) == []
    out = ws.handle([execute_done("a")], now=3.0)
    assert finished(out) == ["a"]


def test_compute_of_a_key_waiting_to_be_fetched_computes_it() -> None:
    # given: a waits to be fetched, but no holder is known
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)
    ws.handle([GatherFailed("gather-p1", "p1", ["a"], "refused")], now=1.0)
    assert state_of(ws, "a") == "fetch"

    # when the scheduler asks us to compute a (it recomputes the lost key)
    out = ws.handle([compute_task("a")], now=2.0)

    # then it runs, and x after it
    assert executes(out) == ["a"]
    out = ws.handle([execute_done("a")], now=3.0)
    assert finished(out) == ["a"] and executes(out) == ["x"]


def test_input_in_flight_from_a_peer_no_longer_listed_is_fetched_from_a_listed_one() -> None:
    # given: a is being fetched from p1 (which then went silent) as x's input
    ws = make_worker("w1", nthreads=2)
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)
    assert ws.in_flight == {"p1": ["a"]}

    # when the scheduler, having dropped p1, asks for y, whose input a it now knows on p2
    out = ws.handle([compute_task("y", {"a": ["p2"]})], now=1.0)

    # then a is fetched from p2 at once, not after p1's gather times out
    assert [(g.peer, g.keys) for g in out if isinstance(g, GatherDep)] == [("p2", ["a"])]
    assert ws.in_flight == {"p1": [], "p2": ["a"]}

    # and what p1's gather brings, if it ever lands, is dropped
    out = ws.handle([gather_done("p1", {"a": 8})], now=2.0)
    assert released(out) == ["a"] and executes(out) == []
    out = ws.handle([gather_done("p2", {"a": 8})], now=3.0)
    assert sorted(executes(out)) == ["x", "y"]


def test_refreshed_holders_redirect_a_fetch_from_a_peer_that_left() -> None:
    # given: a is being fetched from p1 as x's input
    ws = make_worker("w1")
    ws.handle([compute_task("x", {"a": ["p1"]})], now=0.0)

    # when the scheduler says a is on p1 and p2: the fetch from p1 goes on
    out = ws.handle([RefreshWhoHasEvent("refresh", {"a": ["p1", "p2"]})], now=1.0)
    assert out == [] and ws.in_flight == {"p1": ["a"]}

    # when it says a is only on p2 (p1 left): a is fetched from p2 now
    out = ws.handle([RefreshWhoHasEvent("refresh", {"a": ["p2"]})], now=2.0)
    assert [(g.peer, g.keys) for g in out if isinstance(g, GatherDep)] == [("p2", ["a"])]
    out = ws.handle([gather_done("p2", {"a": 8})], now=3.0)
    assert executes(out) == ["x"]


def test_input_that_erred_here_before_is_fetched_from_its_new_holder() -> None:
    # given: a failed here once; the scheduler retried it elsewhere, where it worked
    ws = make_worker("w1")
    ws.handle([compute_task("a")], now=0.0)
    ws.handle([execute_failed("a")], now=1.0)

    # when x = f(a) is sent here
    out = ws.handle([compute_task("x", {"a": ["w2"]})], now=2.0)

    # then a is fetched from w2 and x runs
    assert messages(out, GatherDep) == [GatherDep("w2", ["a"], 8)]
    out = ws.handle([gather_done("w2", {"a": 8})], now=3.0)
    assert executes(out) == ["x"]


def test_input_cancelled_here_is_not_waited_on_forever() -> None:
    # given: a was cancelled while running here (and was then computed on w2)
    ws = make_worker("w1", nthreads=2)
    ws.handle([compute_task("a")], now=0.0)
    ws.handle([free("a")], now=1.0)

    # when x = f(a) is sent here
    ws.handle([compute_task("x", {"a": ["w2"]})], now=2.0)

    # when the cancelled run ends, one way or the other, x still gets its input and runs
    out = ws.handle([execute_failed("a")], now=3.0)
    if not executes(out):
        [g] = messages(out, GatherDep)
        assert g == GatherDep("w2", ["a"], 8)
        out = ws.handle([gather_done("w2", {"a": 8})], now=4.0)
    assert executes(out) == ["x"]


def test_input_cancelled_here_that_finishes_is_used() -> None:
    ws = make_worker("w1", nthreads=2)
    ws.handle([compute_task("a")], now=0.0)
    ws.handle([free("a")], now=1.0)
    ws.handle([compute_task("x", {"a": ["w2"]})], now=2.0)

    out = ws.handle([execute_done("a")], now=3.0)
    if not executes(out):
        out = ws.handle([gather_done("w2", {"a": 8})], now=4.0)
    assert executes(out) == ["x"]
    assert finished(out) == []  # a was cancelled: never reported as computed here


def test_validate_state_catches_a_broken_invariant() -> None:
    ws = make_worker()
    ws.handle([compute_task("x")], now=0.0)
    ws.executing.clear()
    with pytest.raises(AssertionError):
        ws.validate_state()


# -------------------------------------------------------------- randomized


class WorkerSim:
    """Plays the scheduler, the peers, the thread pool and the data store around a validating
    `WorkerState`, at random, and checks that the instructions make sense for all of them.

    The threads are the server's lanes (tasks handed ahead, ``lookahead`` > 0): a thread
    that ends a task starts the next of its lane at once, and what threads tell the state
    (outcomes, secedes, rejoins, revoked tasks) waits in a queue (``pending``) delivered
    later, in order, as the server's loop does."""

    ADDRESS = "w0"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # few peers (the same ones again and again), or many (more gathers than allowed at once)
        self.PEERS = [f"p{i}" for i in range(self.rng.choice([3, 30]))]
        self.nthreads = self.rng.randint(1, 3)
        self.ws = WorkerState(self.ADDRESS, self.nthreads, validate=True,
                              lookahead=self.rng.choice([0, 1, 2]))  # fmt: skip
        #: keys in the server's data store
        self.store: set[str] = set()
        #: keys a thread runs now (started, not yet ended)
        self.running: set[str] = set()
        #: the server's lanes: tasks handed and not started; a lane is here while it has a
        #: thread, or waits for one (its running task seceded: ``detached``)
        self.lanes: dict[int, deque[str]] = {}
        #: running key -> the lane its thread works through
        self.lane_of: dict[str, int] = {}
        #: seceded key -> its lane, until the state hears of it and the lane goes on
        self.detached: dict[str, int] = {}
        #: keys whose thread seceded at some point
        self.asked_to_secede: set[str] = set()
        #: what the threads told the loop, not delivered yet: (event, stored key or None)
        self.pending: list[tuple[WorkerEvent, str | None]] = []
        #: running keys whose thread gave its slot back (seceded), not yet rejoined
        self.seceded: set[str] = set()
        #: seceded keys whose thread is blocked until the worker says `Rejoin`
        self.blocked: set[str] = set()
        #: the last events and what came of them, for the failure message
        self.log: deque[str] = deque(maxlen=50)
        #: gathers sent out and not yet answered: peer -> keys
        self.gathers: dict[str, list[str]] = {}
        #: keys the "scheduler" asked us to compute and did not free since
        self.computing: dict[str, list[str]] = {}
        #: keys the scheduler believes we hold
        self.held: set[str] = set()
        #: keys reported done/erred since the last ComputeTask for them
        self.answered: set[str] = set()
        self.remote: list[str] = []  # keys that live on peers
        self.ever_computed: list[str] = []  # keys we were asked to compute, ever
        self.now = 0.0
        self.n = 0

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def handle(self, *events: WorkerEvent) -> list[WorkerInstruction]:
        self.now += 1.0
        self.log.append(f"{list(events)}")
        out = self.ws.handle(list(events), self.now)
        self.log.append(f"    -> {out}")
        for inst in out:
            if isinstance(inst, Rejoin):
                assert inst.key in self.blocked, f"{inst.key} rejoined without asking"
                self.blocked.discard(inst.key)
                self.seceded.discard(inst.key)
            elif isinstance(inst, Execute):
                assert inst.key not in self.running, f"second run of {inst.key} at once"
                assert not any(inst.key in q for q in self.lanes.values()), "handed twice"
                ts = self.ws.tasks[inst.key]
                assert ts.compute is not None
                for dep in ts.compute.who_has:
                    assert dep in self.store, f"{inst.key} started without its input {dep}"
                if inst.lane in self.lanes:
                    self.lanes[inst.lane].append(inst.key)
                else:  # a lane without a thread: one starts, and runs it
                    self.lanes[inst.lane] = deque()
                    self.running.add(inst.key)
                    self.lane_of[inst.key] = inst.lane
            elif isinstance(inst, Revoke):
                for queue in self.lanes.values():
                    if inst.key in queue:
                        queue.remove(inst.key)
                        self.pending.append((ExecuteSkipped(self.fresh("skip"), inst.key), None))
            elif isinstance(inst, GatherDep):
                assert inst.peer not in self.gathers, f"two gathers from {inst.peer}"
                assert inst.keys
                self.gathers[inst.peer] = list(inst.keys)
            elif isinstance(inst, ReleaseData):
                assert inst.key in self.store, f"release of {inst.key} that is not stored"
                self.store.discard(inst.key)
            elif isinstance(inst, ToScheduler):
                msg = inst.msg
                if isinstance(msg, TaskFinished):
                    assert msg.key in self.computing, f"unasked report of {msg.key}"
                    assert msg.key in self.store
                    self.answered.add(msg.key)
                    self.held.add(msg.key)
                elif isinstance(msg, TaskErred):
                    assert msg.key in self.computing, f"unasked report of {msg.key}"
                    self.answered.add(msg.key)
                    # The scheduler retries it elsewhere (or fails it): not ours any more.
                    del self.computing[msg.key]
                elif isinstance(msg, AddKeys):
                    assert all(k in self.store for k in msg.keys), msg
                    self.held.update(msg.keys)
                elif isinstance(msg, MissingData):
                    pass
                elif isinstance(msg, LongRunning):
                    # (its thread may have ended since: the event reaches the state later)
                    assert msg.key in self.asked_to_secede, f"{msg.key} seceded without asking"
                else:  # pragma: no cover
                    raise TypeError(f"unexpected message {msg}")
        assert len(self.running - self.seceded) <= self.nthreads, "more threads than slots"
        memory = {k for k, t in self.ws.tasks.items() if t.state == "memory"}
        assert memory <= self.store, memory - self.store
        stray = self.store - memory - self.running
        assert not stray, f"stored but not known: {stray}"
        assert self.ws.nbytes_in_memory == sum(self.ws.tasks[k].nbytes for k in memory)
        return out

    # ------------------------------------------------------------ actions

    def compute(self) -> None:
        r = self.rng.random()
        elsewhere = [k for k in self.ever_computed if k not in self.computing
                     and k not in self.held]  # fmt: skip
        cancelled = sorted(k for k, t in self.ws.tasks.items() if t.state == "cancelled")
        if cancelled and r < 0.1:
            key = self.rng.choice(cancelled)  # freed while running, now wanted again
            deps = []
        elif self.computing and r < 0.2:
            key = self.rng.choice(sorted(self.computing))  # again (a duplicate)
            deps = self.computing[key]
        elif elsewhere and r < 0.25:
            key = self.rng.choice(elsewhere)  # again, after it was freed (resumed?)
            deps = []
        elif self.remote and r < 0.3:
            key = self.rng.choice(self.remote)  # an input that was lost: recompute it here
            self.remote.remove(key)
            deps = []
        else:
            key = self.fresh("t")
            deps = []
            for _ in range(self.rng.randint(0, 5)):
                if self.held and self.rng.random() < 0.3:
                    deps.append(self.rng.choice(sorted(self.held)))
                elif elsewhere and self.rng.random() < 0.2:
                    # once ours, now (says the scheduler) on a peer
                    deps.append(self.rng.choice(elsewhere))
                elif self.remote and self.rng.random() < 0.5:
                    deps.append(self.rng.choice(self.remote))
                else:
                    deps.append(self.fresh("r"))
                    self.remote.append(deps[-1])
        deps = sorted(set(deps) - {key})
        if key not in self.ever_computed:
            self.ever_computed.append(key)
        who_has = {}
        for d in deps:
            holders = self.rng.sample(self.PEERS, self.rng.randint(0, 2) if d not in self.held
                                      else self.rng.randint(0, 1))  # fmt: skip
            if d in self.held:
                holders.append(self.ADDRESS)
            elif not holders:
                holders = [self.rng.choice(self.PEERS)]
            who_has[d] = holders
        self.computing[key] = deps
        self.answered.discard(key)
        self.handle(compute_task(key, who_has, {d: self.rng.randint(1, 100) for d in deps},
                                 (self.rng.randint(-2, 2), self.n), self.fresh("compute")))  # fmt: skip

    def finish_run(self) -> None:
        if self.rng.random() < 0.02:  # a stray outcome for a key we do not run
            self.store.add("stray")
            self.handle(execute_done("stray", stimulus_id=self.fresh("stray")))
            self.handle(execute_failed("stray", stimulus_id=self.fresh("stray")))
            return
        free_threads = sorted(self.running - self.blocked)
        if not free_threads:
            return
        key = self.rng.choice(free_threads)
        self.running.discard(key)
        self.seceded.discard(key)
        if self.rng.random() < 0.15:
            self.pending.append((execute_failed(key, stimulus_id=self.fresh("failed")), None))
        else:
            self.pending.append((execute_done(key, self.rng.randint(1, 100), self.fresh("done")),
                                 key))  # fmt: skip
        lane = self.lane_of.pop(key, None)
        if lane is not None:
            self.next_in_lane(lane)
        if self.rng.random() < 0.5:
            self.deliver()

    def next_in_lane(self, lane: int) -> None:
        """The lane's thread ended a task (or the lane goes on after a secede): it starts the
        next task there itself, or ends."""
        queue = self.lanes[lane]
        if not queue:
            del self.lanes[lane]
            return
        key = queue.popleft()
        assert key not in self.running, f"second run of {key} at once"
        self.running.add(key)
        self.lane_of[key] = lane

    def deliver(self) -> None:
        """The loop drains what the threads told it, in order, in one batch."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        for _, stored in batch:
            if stored is not None:
                self.store.add(stored)  # the server stores the result before it reports
        self.handle(*(event for event, _ in batch))
        for event, _ in batch:
            if isinstance(event, SecedeEvent) and event.key in self.detached:
                self.next_in_lane(self.detached.pop(event.key))

    def finish_gather(self, fail_rate: float = 0.15) -> None:
        if not self.gathers:
            return
        peer = self.rng.choice(sorted(self.gathers))
        keys = self.gathers.pop(peer)
        r = self.rng.random()
        if r < fail_rate:
            self.handle(GatherFailed(self.fresh("gather-failed"), peer, keys, "refused"))
            return
        missing = [k for k in keys if self.rng.random() < fail_rate]
        got = {k: 8 for k in keys if k not in missing}
        self.store.update(k for k in got if k not in self.store)
        self.handle(GatherDone(self.fresh("gather"), peer, got, missing))

    def free(self) -> None:
        known = sorted(set(self.ws.tasks) | set(self.computing) | self.held)
        if not known:
            return
        keys = self.rng.sample(known, self.rng.randint(1, min(3, len(known))))
        for k in keys:
            self.computing.pop(k, None)
            self.held.discard(k)
        self.handle(FreeKeysEvent(self.fresh("free"), keys))

    def refresh(self) -> None:
        fetching = sorted(k for k, t in self.ws.tasks.items() if t.state == "fetch")
        if fetching:
            key = self.rng.choice(fetching)
            holders = self.rng.sample(self.PEERS, self.rng.choice([0, 1, 2]))
            self.handle(RefreshWhoHasEvent(self.fresh("refresh"), {key: holders}))

    def put(self) -> None:
        flying = sorted(k for k, t in self.ws.tasks.items() if t.state == "flight")
        if flying and self.rng.random() < 0.5:
            key = self.rng.choice(flying)
        else:
            key = self.fresh("s")
        self.store.add(key)
        self.held.add(key)
        self.handle(DataPut(self.fresh("put"), {key: 64}))

    def secede(self) -> None:
        """A running task gives its slot back (it waits on other tasks), or asks for it again."""
        candidates = sorted(self.running - self.seceded)
        if candidates and self.rng.random() < 0.6:
            key = self.rng.choice(candidates)
            self.seceded.add(key)
            self.asked_to_secede.add(key)
            lane = self.lane_of.pop(key, None)
            if lane is not None:  # its thread lets the lane go: it waits for the state
                self.detached[key] = lane
            self.pending.append((SecedeEvent(self.fresh("secede"), key), None))
            return
        candidates = sorted(self.seceded - self.blocked)
        if candidates:
            key = self.rng.choice(candidates)
            self.blocked.add(key)
            self.pending.append((RejoinEvent(self.fresh("rejoin"), key), None))

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.25:
            self.compute()
        elif r < 0.30:
            self.secede()
        elif r < 0.45:
            self.finish_run()
        elif r < 0.50:
            self.deliver()
        elif r < 0.75:
            self.finish_gather()
        elif r < 0.88:
            self.free()
        elif r < 0.95:
            self.refresh()
        else:
            self.put()

    def drain(self) -> None:
        """No more failures: every fetch succeeds, every run ends; the scheduler answers
        every fetch that has no holder with a good one."""
        for _ in range(10_000):
            if self.pending:
                self.deliver()
            elif self.running - self.blocked:
                self.finish_run()
            elif self.gathers:
                self.finish_gather(fail_rate=0.0)
            else:
                stuck = {k: list(self.PEERS) for k, t in self.ws.tasks.items()
                         if t.state == "fetch"}  # fmt: skip
                if not stuck:
                    break
                self.handle(RefreshWhoHasEvent(self.fresh("refresh"), stuck))
        else:  # pragma: no cover
            raise AssertionError("did not settle")
        # Every task the scheduler still wants was answered.
        for key in self.computing:
            assert key in self.answered, (key, self.ws.tasks.get(key))
        assert not self.running, f"threads never let go on: {self.running}"
        assert not self.lanes and not self.detached, (self.lanes, self.detached)
        assert not self.ws.executing and not self.ws.long_running and not self.ws.in_flight
        assert not self.ws.lanes and not self.ws.revoking, (self.ws.lanes, self.ws.revoking)

    def free_everything(self) -> None:
        keys = sorted(set(self.ws.tasks) | set(self.computing) | self.held)
        self.computing.clear()
        self.held.clear()
        self.handle(FreeKeysEvent(self.fresh("free-all"), keys))
        assert self.ws.tasks == {}, self.ws.tasks
        assert self.store == set()
        assert self.ws.nbytes_in_memory == 0


@pytest.mark.parametrize("seed", range(20))
def test_randomized_worker(seed: int) -> None:
    # given a worker; when the scheduler, peers and threads do thousands of random things,
    # pausing to let everything finish; then every task asked for is answered, and
    # freeing every key leaves nothing behind
    sim = WorkerSim(seed)
    try:
        for _ in range(4):
            for _ in range(300):
                sim.step()
            sim.drain()
        sim.free_everything()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast events:\n" + "\n".join(sim.log)) from exc


# ------------------------------------------------------------ secede / rejoin


def test_secede_frees_the_slot_and_rejoin_waits_for_a_free_one() -> None:
    # given one thread, task a running and b ready behind it
    ws = make_worker(nthreads=1)
    assert executes(ws.handle([compute_task("a"), compute_task("b")], now=0.0)) == ["a"]

    # when a secedes (it waits on other tasks)
    out = ws.handle([SecedeEvent("secede-a", "a")], now=1.0)

    # then b starts in the freed slot, and the scheduler hears a holds no thread
    assert executes(out) == ["b"]
    assert messages(out, LongRunning) == [LongRunning("a", "secede-a")]
    assert (state_of(ws, "a"), state_of(ws, "b")) == ("long-running", "executing")
    assert ws.long_running == {ws.tasks["a"]} and ws.executing == {ws.tasks["b"]}

    # when a asks for a slot back while b holds the only one, it waits
    assert ws.handle([RejoinEvent("rejoin-a", "a")], now=2.0) == []
    # then gets it as soon as b ends, before any ready task
    out = ws.handle([compute_task("c"), execute_done("b")], now=3.0)
    assert [i for i in out if isinstance(i, (Rejoin, Execute))] == [Rejoin("a")]
    assert finished(out) == ["b"]
    assert state_of(ws, "a") == "executing" and state_of(ws, "c") == "ready"

    # and a still reports its result like any task; c runs after it
    out = ws.handle([execute_done("a")], now=4.0)
    assert finished(out) == ["a"] and executes(out) == ["c"]


def test_long_running_task_reports_its_result_and_can_be_cancelled() -> None:
    # given two seceded tasks on one thread (so three run at once)
    ws = make_worker(nthreads=1)
    ws.handle([compute_task("a"), compute_task("b"), compute_task("c")], now=0.0)
    ws.handle([SecedeEvent("s-a", "a")], now=1.0)
    out = ws.handle([SecedeEvent("s-b", "b")], now=2.0)
    assert executes(out) == ["c"]
    # a second secede of the same task changes nothing
    assert ws.handle([SecedeEvent("s-b-again", "b")], now=2.5) == []

    # when a long-running task fails, it is reported; when one is freed, it is cancelled
    out = ws.handle([execute_failed("a"), free("b")], now=3.0)
    assert [m.key for m in messages(out, TaskErred)] == ["a"]
    assert state_of(ws, "b") == "cancelled" and ws.tasks["b"] in ws.long_running

    # then a cancelled long-running task that finishes is dropped, not reported
    out = ws.handle([execute_done("b")], now=4.0)
    assert finished(out) == [] and released(out) == ["b"]
    # and rejoin of a task that holds a slot (or is gone) answers at once
    assert ws.handle([RejoinEvent("r-c", "c"), RejoinEvent("r-x", "x")], now=5.0) == [
        Rejoin("c"), Rejoin("x")]


# -------------------------------------------------------------------- pause

from shoal.core.worker_events import PauseEvent  # noqa: E402 - kept with the tests that use it


def pause(paused: bool = True) -> PauseEvent:
    return PauseEvent("memory-monitor", paused)


def test_paused_worker_starts_no_new_task_and_resumes_where_it_stopped() -> None:
    # given one thread running a, with b ready behind it
    ws = make_worker(nthreads=1)
    assert executes(ws.handle([compute_task("a"), compute_task("b")], now=0.0)) == ["a"]

    # when memory goes above the pause fraction, a finishes and c arrives
    assert ws.handle([pause()], now=1.0) == []
    out = ws.handle([execute_done("a"), compute_task("c")], now=2.0)

    # then a is reported as usual, but neither b nor c starts in the free slot
    assert finished(out) == ["a"] and executes(out) == []
    assert (state_of(ws, "b"), state_of(ws, "c")) == ("ready", "ready")
    assert ws.paused and not ws.executing

    # when memory is back below the pause fraction, then the next task starts at once
    out = ws.handle([pause(False)], now=3.0)
    assert executes(out) == ["b"] and not ws.paused


def test_paused_worker_fetches_no_input_until_it_resumes() -> None:
    # given a paused worker
    ws = make_worker(nthreads=2)
    ws.handle([pause()], now=0.0)

    # when it is asked to run a task whose input lives on a peer
    out = ws.handle([compute_task("y", who_has={"x": ["w2"]})], now=1.0)

    # then it does not fetch the input yet
    assert [i for i in out if isinstance(i, GatherDep)] == []
    assert state_of(ws, "x") == "fetch"

    # and once it resumes, it fetches the input, then runs the task
    out = ws.handle([pause(False)], now=2.0)
    assert [i for i in out if isinstance(i, GatherDep)] == [GatherDep("w2", ["x"], 8)]
    out = ws.handle([gather_done("w2", {"x": 8})], now=3.0)
    assert executes(out) == ["y"]


def test_paused_worker_lets_a_seceded_task_rejoin() -> None:
    # given a seceded task and a task running in the freed slot, then a pause
    ws = make_worker(nthreads=1)
    ws.handle([compute_task("a"), compute_task("b"), compute_task("c")], now=0.0)
    assert executes(ws.handle([SecedeEvent("s-a", "a")], now=1.0)) == ["b"]
    ws.handle([pause(), RejoinEvent("r-a", "a")], now=2.0)

    # when b ends, then a (already started: finishing it frees memory) gets the slot, c does not
    out = ws.handle([execute_done("b")], now=3.0)
    assert [i for i in out if isinstance(i, (Rejoin, Execute))] == [Rejoin("a")]
    assert state_of(ws, "c") == "ready"


def test_pause_and_resume_repeated_keep_the_state_valid() -> None:
    # given random events with pauses mixed in (validate=True checks after each handle)
    rng = random.Random(7)
    ws = make_worker(nthreads=2)
    running: list[str] = []
    for i in range(300):
        roll = rng.random()
        if roll < 0.15:
            running.extend(executes(ws.handle([pause(rng.random() < 0.5)], now=float(i))))
        elif roll < 0.55:
            out = ws.handle([compute_task(f"t{i}")], now=float(i))
            running.extend(executes(out))
        elif running:
            out = ws.handle([execute_done(running.pop(rng.randrange(len(running))))], now=float(i))
            running.extend(executes(out))
    # then once resumed, every task left runs
    out = ws.handle([pause(False)], now=1000.0)
    running.extend(executes(out))
    while running:
        running.extend(executes(ws.handle([execute_done(running.pop())], now=1001.0)))
    assert not any(t.state in ("ready", "executing") for t in ws.tasks.values())


# ------------------------------------------------------------- transfer limit


def test_inputs_in_flight_stay_under_the_transfer_limit_but_one_always_goes() -> None:
    # given a worker that may have 50 bytes of inputs in flight, and tasks needing 3 inputs
    # of 30 bytes each on one peer, and one on another
    ws = WorkerState("w1", 4, validate=True, transfer_limit=50)
    sizes = {"x": 30, "y": 30, "z": 30}
    out = ws.handle([compute_task("a", who_has={"x": ["w2"], "y": ["w2"]}, nbytes=sizes),
                     compute_task("b", who_has={"z": ["w3"]}, nbytes=sizes)], now=0.0)  # fmt: skip

    # then only one input goes (a second would pass the limit)
    gathers = [i for i in out if isinstance(i, GatherDep)]
    assert len(gathers) == 1 and len(gathers[0].keys) == 1 and ws.bytes_in_flight() == 30

    # and as each lands, the next goes
    first = gathers[0]
    out = ws.handle([gather_done(first.peer, {first.keys[0]: 30})], now=1.0)
    assert len([i for i in out if isinstance(i, GatherDep)]) == 1 and ws.bytes_in_flight() == 30

    # and an input bigger than the limit still goes, alone
    big = WorkerState("w1", 1, validate=True, transfer_limit=50)
    out = big.handle([compute_task("c", who_has={"huge": ["w2"]}, nbytes={"huge": 500})], now=0.0)
    assert [i for i in out if isinstance(i, GatherDep)] == [GatherDep("w2", ["huge"], 500)]
