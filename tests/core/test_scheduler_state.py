"""Pure tests of `SchedulerState`: feed events, check the instructions and the state.

Every state here is built with ``validate=True``, so `validate_state` runs after each
``handle``. Each test reads as given / when / then.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from shoal.core.scheduler_events import (
    ClientConnected,
    ClientDisconnected,
    DataMissing,
    DataScattered,
    FireAndForget,
    Instruction,
    KeysCancelled,
    KeysReleased,
    KeysWanted,
    ReplicasAdded,
    SchedulerEvent,
    Tick,
    ToClient,
    ToWorker,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from shoal.core.scheduler_state import FIRE_AND_FORGET, SchedulerState, key_group
from shoal.protocol.messages import (
    ComputeTask,
    FreeKeys,
    KeyCancelled,
    KeyLost,
    KeyErred,
    KeyInMemory,
    Msg,
    RefreshWhoHas,
    TaskWarning,
)
from shoal.testing.core import (
    DUMMY_EXCEPTION,
    DUMMY_FUNCTION,
    freed_keys,
    make_scheduler,
    make_spec,
    messages,
    sent_to,
    sent_to_client,
    submit,
    task_erred,
    task_finished,
    worker_joined,
)


def left(address: str, graceful: bool = False, reason: str = "") -> WorkerLeft:
    return WorkerLeft(f"worker-left-{address}", address, reason, graceful)


def release(client: str, *keys: str) -> KeysReleased:
    return KeysReleased(f"release-{client}", client, list(keys))


def compute_keys(out: list[Instruction], address: str | None = None) -> list[str]:
    """Keys of the `ComputeTask`s sent (to ``address``, or to anyone), in order."""
    return [i.msg.key for i in out if isinstance(i, ToWorker) and isinstance(i.msg, ComputeTask)
            and (address is None or i.address == address)]  # fmt: skip


def where(out: list[Instruction], key: str) -> list[str]:
    """The workers a `ComputeTask` for ``key`` was sent to."""
    return [i.address for i in out if isinstance(i, ToWorker) and isinstance(i.msg, ComputeTask)
            and i.msg.key == key]  # fmt: skip


def run(state: SchedulerState, key: str, worker: str, nbytes: int = 8) -> list[Instruction]:
    """``worker`` reports ``key`` done."""
    return state.handle([task_finished(worker, key, nbytes)], now=1.0)


# ----------------------------------------------------------------- submitting


def test_single_task_goes_to_least_loaded_worker() -> None:
    # given: w1 busy with one task, w2 idle
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("busy"))], now=0.0)
    [busy_on] = where(out, "busy")

    # when
    out = state.handle([submit("c1", make_spec("x"))], now=1.0)

    # then: x goes to the other, idle worker, with its recipe
    [msg] = messages(out, ComputeTask)
    idle = "w2" if busy_on == "w1" else "w1"
    assert where(out, "x") == [idle]
    assert msg.key == "x" and msg.function == DUMMY_FUNCTION and msg.who_has == {}
    assert state.tasks["x"].state == "processing"
    assert state.tasks["x"].processing_on is state.workers[idle]


def test_load_counts_tasks_per_thread() -> None:
    # given: w1 has 4 threads and 2 tasks, w2 has 1 thread and 1 task
    state = make_scheduler({"w1": 4})
    state.handle([submit("c1", make_spec("a"), make_spec("b"))], now=0.0)
    state.handle([worker_joined("w2", 1)], now=0.0)
    state.handle([submit("c1", make_spec("c"))], now=0.0)
    assert state.workers["w2"].processing == {state.tasks["c"]}

    # when
    out = state.handle([submit("c1", make_spec("d"))], now=1.0)

    # then: w1 (2/4 busy) is less loaded than w2 (1/1 busy)
    assert where(out, "d") == ["w1"]


def test_finished_task_is_reported_to_the_client_that_wants_it() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)

    # when
    out = state.handle([task_finished("w1", "x", nbytes=123, typename="int")], now=1.0)

    # then
    assert out == [ToClient("c1", KeyInMemory("x", ["w1"], 123, "int", None))]
    assert state.tasks["x"].state == "memory"
    assert state.workers["w1"].processing == set()
    assert state.workers["w1"].has_what == {state.tasks["x"]}


def test_chain_runs_in_order_and_frees_intermediates() -> None:
    # given: a -> b -> c, the client wants only c
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle(
        [submit("c1", make_spec("a"), make_spec("b", ["a"]), make_spec("c", ["b"]),
                wanted=["c"])], now=0.0)  # fmt: skip

    # then: only a can run
    assert compute_keys(out) == ["a"]
    [a_on] = where(out, "a")
    assert state.tasks["b"].state == "waiting" and state.tasks["c"].state == "waiting"

    # when a finishes: b runs where a is, and tells the worker where a lives
    out = run(state, "a", a_on)
    assert compute_keys(out) == ["b"]
    assert where(out, "b") == [a_on]
    [msg] = messages(out, ComputeTask)
    assert msg.who_has == {"a": [a_on]} and msg.nbytes == {"a": 8}

    # when b finishes: c runs, a is no longer needed and is freed
    out = run(state, "b", a_on)
    assert compute_keys(out) == ["c"]
    assert freed_keys(out, a_on) == ["a"]
    assert state.tasks["a"].state == "released"

    # when c finishes: the client hears about c only, b is freed
    out = run(state, "c", a_on)
    assert messages(out, KeyInMemory) == [KeyInMemory("c", [a_on], 8, "int", None)]
    assert freed_keys(out, a_on) == ["b"]
    assert set(state.tasks) == {"a", "b", "c"}  # c still refers to its recipe's inputs

    # when the client releases c: everything is forgotten
    out = state.handle([release("c1", "c")], now=2.0)
    assert freed_keys(out, a_on) == ["c"]
    assert state.tasks == {}


def test_task_goes_to_worker_holding_most_input_bytes() -> None:
    # given: big on one worker, small on another, that first worker the busiest of three
    state = make_scheduler({"w1": 1, "w2": 1, "w3": 1})
    out = state.handle([submit("c1", make_spec("big"), make_spec("small"))], now=0.0)
    big_on, small_on = where(out, "big")[0], where(out, "small")[0]
    state.handle([task_finished(big_on, "big", nbytes=2_000_000_000),
                  task_finished(small_on, "small", nbytes=10)], now=1.0)  # fmt: skip
    out = state.handle([submit("c1", make_spec("busy", workers=[big_on]))], now=1.0)
    assert where(out, "busy") == [big_on]

    # when
    out = state.handle([submit("c1", make_spec("sum", ["big", "small"]))], now=2.0)

    # then: it stays where the 2 GB are (moving them costs more than waiting there),
    # queued until that worker has room
    assert where(out, "sum") == []
    assert state.tasks["sum"].state == "queued"
    out = state.handle([task_finished(big_on, "busy")], now=3.0)
    assert where(out, "sum") == [big_on]
    [msg] = messages(out, ComputeTask)
    assert msg.who_has == {"big": [big_on], "small": [small_on]}
    assert msg.nbytes == {"big": 2_000_000_000, "small": 10}


def test_idle_worker_takes_queued_work_when_moving_inputs_is_cheap() -> None:
    # given: the only holder of a small input is busy; another worker is idle
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [holder] = where(out, "x")
    other = "w2" if holder == "w1" else "w1"
    state.handle([task_finished(holder, "x", nbytes=1_000)], now=1.0)
    state.handle([submit("c1", make_spec("busy", workers=[holder]))], now=1.0)

    # when: a task needing x is submitted
    out = state.handle([submit("c1", make_spec("y", ["x"]))], now=2.0)

    # then: the idle worker takes it (1 kB moves faster than the holder frees up)
    assert where(out, "y") == [other]


def test_same_key_submitted_twice_runs_once_and_both_clients_hear() -> None:
    # given: two clients submit the same pure call
    state = make_scheduler({"w1": 1})
    out1 = state.handle([submit("c1", make_spec("inc-5f1d2e3a4b"))], now=0.0)
    out2 = state.handle([submit("c2", make_spec("inc-5f1d2e3a4b"))], now=0.0)

    # then: it runs once
    assert compute_keys(out1) == ["inc-5f1d2e3a4b"]
    assert out2 == []
    assert state.tasks["inc-5f1d2e3a4b"].who_wants.keys() == {"c1", "c2"}

    # when it finishes: both clients hear
    out = run(state, "inc-5f1d2e3a4b", "w1")
    assert {i.client for i in out if isinstance(i, ToClient)} == {"c1", "c2"}
    assert len(messages(out, KeyInMemory)) == 2

    # when a third client submits it again: it hears at once, nothing runs
    out = state.handle([submit("c3", make_spec("inc-5f1d2e3a4b"))], now=2.0)
    assert out == [ToClient("c3", KeyInMemory("inc-5f1d2e3a4b", ["w1"], 8, "int", None))]


def test_priority_orders_ready_tasks() -> None:
    # given: no worker yet, three ready tasks of different priority
    state = make_scheduler()
    state.handle([submit("c1", make_spec("low", priority=-1), make_spec("mid"),
                         make_spec("high", priority=5))], now=0.0)  # fmt: skip

    # when a worker joins, and then finishes what it gets
    sent = compute_keys(state.handle([worker_joined("w1")], now=1.0))
    sent += compute_keys(state.handle([task_finished("w1", sent[-1])], now=2.0))
    sent += compute_keys(state.handle([task_finished("w1", sent[-1])], now=3.0))

    # then: they are handed out one per free thread, highest priority first
    assert sent == ["high", "mid", "low"]
    assert [state.tasks[k].priority for k in sent] == [(-5, 3), (0, 2), (1, 1)]


def test_key_group() -> None:
    assert key_group("inc-5f1d2e3a4b") == "inc"
    assert key_group("x-3") == "x"
    assert key_group("my-task") == "my-task"
    assert key_group("plain") == "plain"


# ------------------------------------------------------------------ releasing


def test_release_by_only_client_frees_holders_and_forgets() -> None:
    # given: x in memory on w1 (and a replica on w2)
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    on = state.tasks["x"].processing_on
    assert on is not None
    other = "w2" if on.address == "w1" else "w1"
    run(state, "x", on.address)
    state.handle([ReplicasAdded("add", other, ["x"], [8])], now=1.0)

    # when
    out = state.handle([release("c1", "x")], now=2.0)

    # then: both holders drop it, and the scheduler forgets it
    assert freed_keys(out, "w1") == ["x"] and freed_keys(out, "w2") == ["x"]
    assert messages(out, KeyErred) == [] and messages(out, KeyInMemory) == []
    assert state.tasks == {}
    assert state.clients == {"c1": set()}
    assert all(not ws.has_what and ws.nbytes == 0 for ws in state.workers.values())
    assert state.story("x")[-1][1:3] == ("released", "forgotten")


def test_release_of_a_processing_task_tells_its_worker() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)

    # when
    out = state.handle([release("c1", "x")], now=1.0)

    # then
    assert out == [ToWorker("w1", FreeKeys(["x"], "release-c1"))]
    assert state.tasks == {} and state.workers["w1"].processing == set()

    # and a late report of it is answered with FreeKeys
    out = run(state, "x", "w1")
    assert len(out) == 1 and freed_keys(out, "w1") == ["x"]
    assert state.tasks == {}


def test_key_wanted_by_two_clients_survives_one_release() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x")), submit("c2", make_spec("x"))], now=0.0)
    run(state, "x", "w1")

    # when
    out = state.handle([release("c1", "x")], now=1.0)

    # then
    assert out == []
    assert state.tasks["x"].state == "memory"
    assert state.tasks["x"].who_wants.keys() == {"c2"}

    # when the second client releases it too
    out = state.handle([release("c2", "x")], now=2.0)
    assert freed_keys(out, "w1") == ["x"]
    assert state.tasks == {}


def test_release_twice_or_of_unknown_keys_is_harmless() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    run(state, "x", "w1")
    state.handle([release("c1", "x")], now=1.0)
    assert state.handle([release("c1", "x", "never-seen"), release("c9", "x")], now=2.0) == []


def test_release_of_a_dependency_the_client_also_wants_keeps_it_for_the_dependent() -> None:
    # given: the client wants a and b = f(a); a is done, b runs
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]))], now=0.0)
    run(state, "a", "w1")

    # when it releases a while b still needs it
    out = state.handle([release("c1", "a")], now=1.0)

    # then a stays in memory until b is done, then is freed (but remembered for b's recipe)
    assert out == [] and state.tasks["a"].state == "memory"
    out = run(state, "b", "w1")
    assert freed_keys(out, "w1") == ["a"]
    assert state.tasks["a"].state == "released"
    state.handle([release("c1", "b")], now=3.0)
    assert state.tasks == {}


def test_client_disconnect_releases_its_keys() -> None:
    # given: c1 wants a (done) and b (running); c2 wants a too
    state = make_scheduler({"w1": 1})
    state.handle([ClientConnected("hi", "c1"),
                  submit("c1", make_spec("a"), make_spec("b", ["a"]), make_spec("lone")),
                  submit("c2", make_spec("a"))], now=0.0)  # fmt: skip
    out = run(state, "a", "w1")
    assert compute_keys(out) == ["b"]

    # when
    out = state.handle([ClientDisconnected("bye", "c1")], now=1.0)

    # then: b and lone stop (lone was still queued in the scheduler: nothing to tell the
    # worker), a stays for c2
    assert state.tasks.get("lone") is None
    assert sorted(freed_keys(out, "w1")) == ["b"]
    assert set(state.tasks) == {"a"}
    assert state.tasks["a"].who_wants.keys() == {"c2"}
    assert "c1" not in state.clients


# ------------------------------------------------------------------ erring


def test_erred_task_with_retries_is_sent_again() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("flaky", retries=1))], now=0.0)

    # when it fails once
    out = state.handle([task_erred("w1", "flaky")], now=1.0)

    # then: it runs again, the client hears nothing
    assert compute_keys(out) == ["flaky"]
    assert messages(out, KeyErred) == []
    assert state.tasks["flaky"].retries_left == 0

    # when it fails again: retries are used up
    out = state.handle([task_erred("w1", "flaky", text="boom")], now=2.0)
    assert [(m.key, m.kind, m.text) for m in messages(out, KeyErred)] == [
        ("flaky", "exception", "boom")
    ]


def test_erred_task_without_retries_errs_it_and_its_dependents() -> None:
    # given: a -> b -> c, and an unrelated d; the client wants b and c
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]), make_spec("c", ["b"]),
                         make_spec("d"), wanted=["b", "c", "d"])], now=0.0)  # fmt: skip

    # when
    out = state.handle([task_erred("w1", "a", text="ZeroDivisionError: division by zero")],
                       now=1.0)  # fmt: skip

    # then: b and c err with a's exception; d carries on
    erred = sent_to_client(out, "c1", KeyErred)
    assert sorted(m.key for m in erred) == ["b", "c"]
    for m in erred:
        assert m.kind == "exception"
        assert m.text == "ZeroDivisionError: division by zero"
        assert m.exception == DUMMY_EXCEPTION
    assert state.tasks["c"].failure is not None and state.tasks["c"].failure.blame == "a"
    assert state.tasks["d"].state == "processing"
    assert {state.tasks[k].state for k in "abc"} == {"erred"}

    # when the client later wants c again, it hears the error again; a dependent of b errs
    out = state.handle([KeysWanted("want", "c2", ["c"]),
                        submit("c2", make_spec("e", ["b"]))], now=2.0)  # fmt: skip
    assert [(m.key, m.kind) for m in messages(out, KeyErred)] == [("c", "exception"),
                                                                    ("e", "exception")]
    assert compute_keys(out) == []

    # when everyone releases: the errors are forgotten
    state.handle([release("c1", "b", "c", "d"), release("c2", "c", "e")], now=3.0)
    assert state.tasks == {}


def test_dependent_of_erred_task_submitted_later_inherits_the_error() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"))], now=0.0)
    state.handle([task_erred("w1", "a", text="boom")], now=1.0)

    out = state.handle([submit("c1", make_spec("b", ["a"]))], now=2.0)

    assert [(m.key, m.kind, m.text) for m in messages(out, KeyErred)] == [
        ("b", "exception", "boom")
    ]


def test_unknown_dependency_errs_the_task() -> None:
    # given
    state = make_scheduler({"w1": 1})

    # when
    out = state.handle([submit("c1", make_spec("b", ["gone"]), make_spec("c", ["b"]))], now=0.0)

    # then: b and what depends on it err, naming the missing key; nothing runs
    assert compute_keys(out) == []
    erred = {m.key: m for m in messages(out, KeyErred)}
    assert set(erred) == {"b", "c"}
    assert erred["b"].kind == "unknown-dependency" and "'gone'" in erred["b"].text
    assert erred["c"].kind == "unknown-dependency"

    # when released: forgotten
    state.handle([release("c1", "b", "c")], now=1.0)
    assert state.tasks == {}


def test_unknown_dependency_of_an_unwanted_task_does_not_leak() -> None:
    # given: the client wants only a; b (not wanted) depends on a and on an unknown key
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a", "gone"]), wanted=["a"])],
                 now=0.0)  # fmt: skip
    run(state, "a", "w1")

    # when
    out = state.handle([release("c1", "a")], now=1.0)

    # then
    assert freed_keys(out, "w1") == ["a"]
    assert state.tasks == {}


def test_submitted_but_unwanted_tasks_are_not_kept() -> None:
    state = make_scheduler({"w1": 1})
    out = state.handle([submit("c1", make_spec("a"), make_spec("orphan"), wanted=["a"])],
                       now=0.0)  # fmt: skip
    assert compute_keys(out) == ["a"]
    assert set(state.tasks) == {"a"}


# ---------------------------------------------------------------- cancelling


def test_cancel_waiting_task_releases_it_and_its_dependents() -> None:
    # given: a runs, b waits on a, c waits on b; plus an unrelated x
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]), make_spec("c", ["b"]),
                         make_spec("x"))], now=0.0)  # fmt: skip

    # when the client cancels b
    out = state.handle([KeysCancelled("cancel-b", "c1", ["b"])], now=1.0)

    # then: b and c are cancelled and gone; a, still wanted, carries on
    assert sorted(m.key for m in sent_to_client(out, "c1", KeyCancelled)) == ["b", "c"]
    assert compute_keys(out) == [] and freed_keys(out, "w1") == []
    assert set(state.tasks) == {"a", "x"}
    assert state.tasks["a"].dependents == set()


def test_cancel_running_task_frees_it_on_its_worker() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]))], now=0.0)

    # when
    out = state.handle([KeysCancelled("cancel-a", "c1", ["a"])], now=1.0)

    # then
    assert sorted(m.key for m in messages(out, KeyCancelled)) == ["a", "b"]
    assert freed_keys(out, "w1") == ["a"]
    assert state.tasks == {}


def test_cancel_keeps_keys_another_client_wants() -> None:
    # given
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a")), submit("c2", make_spec("a"))], now=0.0)

    # when
    out = state.handle([KeysCancelled("cancel", "c1", ["a"])], now=1.0)

    # then: c1 hears it is cancelled, the task goes on for c2
    assert out == [ToClient("c1", KeyCancelled("a", "cancelled"))]
    assert state.tasks["a"].state == "processing"
    out = run(state, "a", "w1")
    assert [i.client for i in out if isinstance(i, ToClient)] == ["c2"]


# ------------------------------------------------------------------ workers


def test_no_workers_then_a_worker_joins() -> None:
    # given: no worker
    state = make_scheduler()

    # when
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)

    # then
    assert out == []
    assert state.tasks["x"].state == "no-worker"
    assert state.unrunnable == {state.tasks["x"]}

    # when a worker joins
    out = state.handle([worker_joined("w1")], now=1.0)
    assert compute_keys(out, "w1") == ["x"]
    assert state.unrunnable == set()
    assert [row[1:3] for row in state.story("x")] == [
        ("released", "waiting"), ("waiting", "no-worker"), ("no-worker", "waiting"),
        ("waiting", "processing"),
    ]  # fmt: skip


def test_released_no_worker_task_is_dropped() -> None:
    state = make_scheduler()
    state.handle([submit("c1", make_spec("x"))], now=0.0)

    state.handle([release("c1", "x")], now=1.0)

    assert state.tasks == {} and state.unrunnable == set()
    assert compute_keys(state.handle([worker_joined("w1")], now=2.0)) == []


def test_worker_leaves_its_processing_tasks_are_rescheduled() -> None:
    # given: x runs on w1
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [first] = where(out, "x")
    second = "w2" if first == "w1" else "w1"

    # when
    out = state.handle([left(first)], now=1.0)

    # then: it runs on the other worker, and nothing is sent to the one that left
    assert where(out, "x") == [second]
    assert sent_to(out, first, Msg) == []
    assert state.tasks["x"].suspicious == 1
    assert first not in state.workers


def test_graceful_leave_does_not_make_tasks_suspicious() -> None:
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [first] = where(out, "x")

    state.handle([left(first, graceful=True)], now=1.0)

    assert state.tasks["x"].suspicious == 0
    assert state.tasks["x"].state == "processing"


def test_worker_leaves_needed_results_are_recomputed_from_their_recipe() -> None:
    # given: the client wants a (done on w1); b = f(a) runs on w1
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]))], now=0.0)
    run(state, "a", "w1")
    state.handle([worker_joined("w2")], now=1.0)
    assert state.tasks["b"].processing_on is state.workers["w1"]

    # when w1 dies
    out = state.handle([left("w1", reason="OOM")], now=2.0)

    # then: a's recipe is sent to w2, b waits for it, nothing is sent to w1
    [msg] = messages(out, ComputeTask)
    assert (msg.key, msg.function, msg.args.frames) == ("a", DUMMY_FUNCTION, [b""])
    assert where(out, "a") == ["w2"]
    assert state.tasks["b"].state == "waiting"
    assert sent_to(out, "w1", Msg) == []
    assert [row[1:3] for row in state.story("a")][-3:] == [
        ("memory", "released"), ("released", "waiting"), ("waiting", "processing")
    ]  # fmt: skip

    # when a is done again, b runs with the new holder
    out = run(state, "a", "w2")
    [msg] = messages(out, ComputeTask)
    assert msg.key == "b" and msg.who_has == {"a": ["w2"]}


def test_worker_leaves_unneeded_results_are_just_dropped() -> None:
    # given: a -> b both done on w1, the client wants only b
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]), wanted=["b"])], now=0.0)
    a_on = state.tasks["a"].processing_on
    assert a_on is not None
    run(state, "a", a_on.address)
    run(state, "b", a_on.address)
    state.handle([ReplicasAdded("copy", "w2" if a_on.address == "w1" else "w1", ["b"], [8])],
                 now=1.0)  # fmt: skip

    # when the worker with a leaves
    out = state.handle([left(a_on.address)], now=2.0)

    # then: nothing is recomputed, b is still in memory on the other worker
    assert compute_keys(out) == []
    assert state.tasks["b"].state == "memory"


def test_lost_results_are_recomputed_in_dependency_order() -> None:
    # given: a -> b, both held only by w1; b has the higher priority; the client wants both
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"], priority=10))], now=0.0)
    run(state, "a", "w1")
    run(state, "b", "w1")
    state.handle([worker_joined("w2")], now=1.0)

    # when w1 dies
    out = state.handle([left("w1")], now=2.0)

    # then: a is recomputed first; b is not sent before its input exists
    assert compute_keys(out) == ["a"]
    assert state.tasks["b"].state == "waiting"
    assert freed_keys(out, "w2") == []
    out = run(state, "a", "w2")
    assert compute_keys(out) == ["b"]


def test_scattered_data_lost_with_its_worker_errs_lost() -> None:
    # given: the client scattered s to w1
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([DataScattered("scatter", "c1", ["s"], [["w1"]], [100])], now=0.0)
    assert out == [ToClient("c1", KeyInMemory("s", ["w1"], 100, "", None))]
    state.handle([submit("c1", make_spec("f", ["s"]))], now=0.0)

    # when w1 dies
    out = state.handle([left("w1")], now=1.0)

    # then: s cannot be recomputed: it errs "lost", and so does f
    erred = {m.key: m for m in messages(out, KeyErred)}
    assert set(erred) == {"s", "f"}
    assert erred["s"].kind == "lost" and "'s'" in erred["s"].text
    assert erred["f"].kind == "lost"
    assert compute_keys(out) == []


def test_scatter_to_no_live_worker_errs_lost() -> None:
    state = make_scheduler({"w1": 1})

    out = state.handle([DataScattered("scatter", "c1", ["s"], [["gone"]], [1])], now=0.0)

    assert [(m.key, m.kind) for m in messages(out, KeyErred)] == [("s", "lost")]
    state.handle([release("c1", "s")], now=1.0)
    assert state.tasks == {}


def test_task_on_three_dying_workers_fails_killed_worker() -> None:
    # given: allowed_failures=3 and four workers
    state = make_scheduler({"w1": 1, "w2": 1, "w3": 1, "w4": 1}, allowed_failures=3)
    out = state.handle([submit("c1", make_spec("poison"))], now=0.0)

    # when three workers die while running it
    for n in range(3):
        [address] = where(out, "poison") or [state.tasks["poison"].processing_on.address]  # type: ignore[union-attr]
        out = state.handle([left(address, reason="segfault")], now=float(n))

    # then
    [msg] = messages(out, KeyErred)
    assert msg.key == "poison" and msg.kind == "killed-worker"
    assert "'poison'" in msg.text and "3 workers" in msg.text
    assert state.tasks["poison"].state == "erred"
    assert compute_keys(out) == []
    assert len(state.workers) == 1


def test_late_finish_from_the_worker_a_task_was_moved_from_is_ignored() -> None:
    # given: x ran on w1, w1 lost its connection, x moved to w2, w1 came back
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [first] = where(out, "x")
    second = "w2" if first == "w1" else "w1"
    state.handle([left(first)], now=1.0)
    state.handle([worker_joined(first)], now=2.0)
    assert state.tasks["x"].processing_on is state.workers[second]

    # when the old worker reports x
    out = run(state, "x", first)

    # then: it is told to drop it; x still waits for the new worker
    assert len(out) == 1 and freed_keys(out, first) == ["x"]
    assert state.tasks["x"].state == "processing"
    assert state.tasks["x"].processing_on is state.workers[second]

    # and a late error from it is ignored too
    assert state.handle([task_erred(first, "x")], now=3.0) == []
    out = run(state, "x", second)
    assert messages(out, KeyInMemory) == [KeyInMemory("x", [second], 8, "int", None)]


def test_finish_report_from_unknown_worker_is_ignored() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)

    assert run(state, "x", "stranger") == []
    assert state.tasks["x"].state == "processing"


def test_second_worker_reporting_a_key_in_memory_becomes_a_replica() -> None:
    # given: x finished on w1 while w2 (where x was first, before a reconnect) also ran it
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    run(state, "x", "w1")
    state.handle([worker_joined("w2")], now=1.0)

    # when
    out = run(state, "x", "w2")

    # then
    assert out == []
    assert {ws.address for ws in state.tasks["x"].who_has} == {"w1", "w2"}


def test_worker_rejoining_with_data_registers_replicas_and_drops_the_rest() -> None:
    # given: x in memory on w1
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    run(state, "x", "w1")

    # when w2 registers holding x and a key nobody knows
    out = state.handle([WorkerJoined("join", "w2", 1, keys=["x", "stale"], nbytes=[8, 8])],
                       now=1.0)  # fmt: skip

    # then
    assert freed_keys(out, "w2") == ["stale"]
    assert {ws.address for ws in state.tasks["x"].who_has} == {"w1", "w2"}


def test_replicas_added_for_unknown_keys_are_freed() -> None:
    state = make_scheduler({"w1": 1})
    out = state.handle([ReplicasAdded("add", "w1", ["nope"], [1])], now=0.0)
    assert freed_keys(out, "w1") == ["nope"]


# --------------------------------------------------------------- missing data


def test_missing_data_with_other_holders_refreshes_who_has() -> None:
    # given: x on w1 and w2; y = f(x) on w3
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    run(state, "x", "w1")
    state.handle([worker_joined("w2"), ReplicasAdded("copy", "w2", ["x"], [8]),
                  worker_joined("w3")], now=1.0)  # fmt: skip

    # when w3 reports it could not get x from w1
    out = state.handle([DataMissing("missing", "w3", "x", "w1")], now=2.0)

    # then: w1 is no longer trusted with x, w3 hears about w2
    assert out == [ToWorker("w3", RefreshWhoHas({"x": ["w2"]}, "missing"))]
    assert {ws.address for ws in state.tasks["x"].who_has} == {"w2"}
    assert state.tasks["x"] not in state.workers["w1"].has_what


def test_worker_left_tells_workers_running_dependents_where_their_inputs_still_are() -> None:
    # given: x on w1 and w2; y = f(x) runs on w3 (which may be fetching x from w1)
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    run(state, "x", "w1")
    state.handle([worker_joined("w2"), ReplicasAdded("copy", "w2", ["x"], [8]),
                  worker_joined("w3")], now=1.0)  # fmt: skip
    out = state.handle([submit("c1", make_spec("y", ["x"], workers=["w3"]))], now=1.0)
    assert where(out, "y") == ["w3"]

    # when w1 leaves (say it went silent and its worker-ttl ran out)
    out = state.handle([left("w1", reason="silent")], now=2.0)

    # then w3 hears that x is on w2, so that it need not wait out a fetch from w1
    assert sent_to(out, "w3", RefreshWhoHas) == [RefreshWhoHas({"x": ["w2"]}, "worker-left-w1")]
    assert state.tasks["y"].state == "processing"


def test_missing_data_without_other_holders_recomputes() -> None:
    # given: x (small) only on w1, z (big) on w2; y = f(x, z) runs on w2
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"), make_spec("z"))], now=0.0)
    assert where(out, "x") == ["w1"] and where(out, "z") == ["w2"]
    state.handle([task_finished("w1", "x", nbytes=1), task_finished("w2", "z", nbytes=1000)],
                 now=1.0)  # fmt: skip
    out = state.handle([submit("c1", make_spec("y", ["x", "z"]))], now=1.0)
    assert where(out, "y") == ["w2"]

    # when w2 reports x missing on w1
    out = state.handle([DataMissing("missing", "w2", "x", "w1")], now=2.0)

    # then: y is taken back, x is recomputed from its recipe, then y runs again
    assert freed_keys(out, "w2") == ["y"]
    assert compute_keys(out) == ["x"]
    assert state.tasks["y"].state == "waiting"
    assert state.tasks["x"] not in state.workers["w1"].has_what
    [x_on] = where(out, "x")
    out = run(state, "x", x_on)
    [msg] = messages(out, ComputeTask)
    assert msg.key == "y" and msg.who_has == {"x": [x_on], "z": ["w2"]}


def test_missing_data_for_unknown_or_moved_keys_is_ignored() -> None:
    state = make_scheduler({"w1": 1, "w2": 1})
    assert state.handle([DataMissing("m", "w1", "nope", "w2")], now=0.0) == []
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    assert state.handle([DataMissing("m", "w1", "x", "w2")], now=0.0) == []
    assert state.tasks["x"].state == "processing"


# --------------------------------------------------------------- scattering


def test_scatter_then_compute_on_scattered_data() -> None:
    # given
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([DataScattered("scatter", "c1", ["s"], [["w2"]], [1000])], now=0.0)

    # when
    out = state.handle([submit("c1", make_spec("f", ["s"]))], now=1.0)

    # then: it runs where the data is
    assert where(out, "f") == ["w2"]
    [msg] = messages(out, ComputeTask)
    assert msg.who_has == {"s": ["w2"]}


def test_scatter_of_a_key_being_computed_puts_it_in_memory() -> None:
    # given: x runs on w1
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [x_on] = where(out, "x")

    # when a client scatters a value under the same key to w2
    out = state.handle([DataScattered("scatter", "c2", ["x"], [["w2"]], [8])], now=1.0)

    # then: the key is in memory; the computation is no longer needed
    assert state.tasks["x"].state == "memory"
    assert state.tasks["x"].processing_on is None
    assert {i.client for i in out if isinstance(i, ToClient)} == {"c1", "c2"}
    if x_on != "w2":
        assert freed_keys(out, x_on) == ["x"]


def test_keys_wanted_for_unknown_key_errs_lost() -> None:
    state = make_scheduler({"w1": 1})

    out = state.handle([KeysWanted("want", "c1", ["nope"])], now=0.0)

    assert [(m.key, m.kind) for m in messages(out, KeyErred)] == [("nope", "lost")]
    assert state.tasks == {}


def test_keys_wanted_for_a_released_recipe_recomputes_it() -> None:
    # given: a -> b, only b wanted and done; a was freed but is remembered as b's input
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("a"), make_spec("b", ["a"]), wanted=["b"])], now=0.0)
    run(state, "a", "w1")
    run(state, "b", "w1")
    assert state.tasks["a"].state == "released"

    # when a client asks for a
    out = state.handle([KeysWanted("want", "c2", ["a"])], now=1.0)

    # then
    assert compute_keys(out) == ["a"]


# ------------------------------------------------------------------ story


def test_story_lists_transitions_with_stimulus_ids() -> None:
    # given
    state = make_scheduler({"w1": 1})

    # when
    state.handle([submit("c1", make_spec("x"), stimulus_id="submit-x")], now=1.0)
    state.handle([task_finished("w1", "x", stimulus_id="done-x")], now=2.0)
    state.handle([KeysReleased("release-x", "c1", ["x"])], now=3.0)

    # then
    assert state.story("x") == [
        ("x", "released", "waiting", "submit-x", 1.0),
        ("x", "waiting", "processing", "submit-x", 1.0),
        ("x", "processing", "memory", "done-x", 2.0),
        ("x", "memory", "released", "release-x", 3.0),
        ("x", "released", "forgotten", "release-x", 3.0),
    ]
    assert state.story("other") == []
    assert state.transition_counts[("waiting", "processing")] == 1


def test_events_carry_stimulus_ids_into_messages() -> None:
    state = make_scheduler({"w1": 1})
    out = state.handle([submit("c1", make_spec("x"), stimulus_id="submit-x")], now=0.0)
    [msg] = messages(out, ComputeTask)
    assert msg.stimulus_id == "submit-x"


def test_validate_state_catches_a_broken_invariant() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    state.tasks["x"].state = "memory"  # with no holder
    with pytest.raises(AssertionError):
        state.validate_state()


# ------------------------------------------------- restrictions and resources


def test_lost_input_of_a_task_waiting_for_a_worker_is_recomputed_first() -> None:
    # given: x (on w1) is the input of t, which needs a GPU no worker has
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"),
                               make_spec("t", ["x"], resources={"GPU": 1.0}))], now=0.0)  # fmt: skip
    [x_on] = where(out, "x")
    state.handle([task_finished(x_on, "x")], now=1.0)
    assert state.tasks["t"].state == "no-worker"

    # when x's worker dies, and then a GPU worker joins
    out = state.handle([left(x_on)], now=2.0)
    [x_again] = where(out, "x")
    out = state.handle([WorkerJoined("join", "gpu", 1, resources={"GPU": 1.0})], now=3.0)

    # then: t waits for x to be computed again; it does not run without its input
    assert where(out, "t") == []
    assert state.tasks["t"].state == "waiting"
    out = state.handle([task_finished(x_again, "x")], now=4.0)
    assert where(out, "t") == ["gpu"]


# ------------------------------------------------------------ randomized

#: Every transition the scheduler may make (see the module docstring of scheduler_state).
ALLOWED_TRANSITIONS = {
    ("released", "waiting"),
    ("waiting", "queued"),  # no valid worker has room
    ("queued", "processing"),
    ("queued", "released"),
    ("queued", "erred"),
    ("queued", "waiting"),  # an input was lost
    ("queued", "memory"),  # scattered over
    ("released", "erred"),  # unknown dependency, scattered data lost
    ("released", "memory"),  # scattered
    ("waiting", "processing"),
    ("waiting", "no-worker"),
    ("waiting", "released"),
    ("waiting", "erred"),  # a dependency erred
    ("waiting", "memory"),  # scattered over
    ("no-worker", "waiting"),
    ("no-worker", "released"),
    ("no-worker", "erred"),
    ("no-worker", "memory"),  # scattered over
    ("processing", "memory"),
    ("processing", "erred"),
    ("processing", "waiting"),  # retry, worker left, input lost
    ("processing", "released"),
    ("memory", "released"),
    ("erred", "memory"),  # scattered over
}


@dataclass
class SimWorker:
    #: keys it was told to compute and not told to drop
    assigned: set[str] = field(default_factory=set)
    #: keys whose data it holds
    data: set[str] = field(default_factory=set)


class SchedulerSim:
    """Plays clients and workers against a validating `SchedulerState`, at random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        allowed = self.rng.choice([1, 2, 3])
        self.state = SchedulerState(allowed_failures=allowed, validate=True)
        self.workers: dict[str, SimWorker] = {}
        self.gone: dict[str, SimWorker] = {}  # workers that may come back (reconnect)
        self.clients = ["c0", "c1", "c2"]
        #: last report each client got for each key
        self.reports: dict[tuple[str, str], Msg] = {}
        #: times the scheduler asked to be woken at (`WakeAt`)
        self.wakes: list[float] = []
        #: the last events and what came of them, for the failure message
        self.log: deque[str] = deque(maxlen=50)
        self.now = 0.0
        self.n = 0

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    # ----------------------------------------------------------- plumbing

    def handle(self, *events: SchedulerEvent) -> None:
        self.now += 1.0
        self.log.append(f"{list(events)}")
        out = self.state.handle(list(events), self.now)
        self.log.append(f"    -> {out}")
        for inst in out:
            if isinstance(inst, WakeAt):
                assert inst.when > self.now, inst
                self.wakes.append(inst.when)
                continue
            if isinstance(inst, ToClient):
                if isinstance(inst.msg, TaskWarning):
                    continue
                assert isinstance(inst.msg, (KeyInMemory, KeyErred, KeyCancelled, KeyLost))
                self.reports[inst.client, inst.msg.key] = inst.msg
                continue
            assert inst.address in self.workers, f"message to a worker that left: {inst}"
            w = self.workers[inst.address]
            msg = inst.msg
            if isinstance(msg, ComputeTask):
                for dep, holders in msg.who_has.items():
                    assert holders, f"{msg.key} sent with no holder for {dep}"
                    for h in holders:
                        assert dep in self.workers[h].data, (msg.key, dep, h)
                w.assigned.add(msg.key)
            elif isinstance(msg, FreeKeys):
                w.assigned.difference_update(msg.keys)
                w.data.difference_update(msg.keys)
            elif isinstance(msg, RefreshWhoHas):
                for key, holders in msg.who_has.items():
                    assert holders and all(key in self.workers[h].data for h in holders)
            else:  # pragma: no cover
                raise TypeError(f"unexpected instruction {inst}")
        self.check()

    def check(self) -> None:
        """The scheduler's view agrees with what the simulated workers hold and run."""
        for ts in self.state.tasks.values():
            for ws in ts.who_has:
                assert ts.key in self.workers[ws.address].data, (ts, ws)
            if ts.processing_on is not None:
                assert ts.key in self.workers[ts.processing_on.address].assigned, ts
        for pair in self.state.transition_counts:
            assert pair in ALLOWED_TRANSITIONS, pair

    def live(self) -> list[str]:
        return sorted(self.workers)

    # ------------------------------------------------------------ actions

    def add_worker(self, address: str | None = None, gpus: float | None = None) -> None:
        if address is None and self.gone and self.rng.random() < 0.3:
            address = self.rng.choice(sorted(self.gone))
        if address is not None:
            w = self.gone.pop(address)
            w.assigned.clear()
            if self.rng.random() < 0.5:
                w.data.clear()  # a new process at the old address
        else:
            address, w = self.fresh("w"), SimWorker()
        self.workers[address] = w
        keys = sorted(w.data)
        if gpus is None:
            gpus = self.rng.choice([0.0, 0.0, 1.0, 2.0])
        self.handle(WorkerJoined(self.fresh("join"), address, self.rng.randint(1, 3),
                                 resources={"GPU": gpus} if gpus else {},
                                 keys=keys, nbytes=[8] * len(keys)))  # fmt: skip

    def remove_worker(self) -> None:
        if self.rng.random() < 0.05:  # twice, or never joined
            self.handle(WorkerLeft(self.fresh("leave"), self.fresh("w"), "unknown"))
            return
        address = self.rng.choice(self.live())
        self.gone[address] = self.workers.pop(address)  # it may come back
        self.handle(WorkerLeft(self.fresh("leave"), address, "chaos",
                               graceful=self.rng.random() < 0.3))  # fmt: skip

    def submit(self) -> None:
        client = self.rng.choice(self.clients)
        existing = sorted(self.state.tasks)
        batch: list[str] = []
        specs = []
        for _ in range(self.rng.randint(1, 6)):
            if existing and self.rng.random() < 0.15:
                key = self.rng.choice(existing)  # the same pure call again
                deps: list[str] = []
            else:
                key = self.fresh("t")
                pool = batch + existing
                deps = self.rng.sample(pool, min(len(pool), self.rng.randint(0, 3)))
                if self.rng.random() < 0.03:
                    deps.append(self.fresh("ghost"))
            batch.append(key)
            r = self.rng.random()
            somewhere = sorted(self.workers) + sorted(self.gone)
            specs.append(make_spec(
                key, deps, priority=self.rng.randint(-2, 2), retries=self.rng.choice([0, 0, 1]),
                retry_delay=self.rng.choice([0.0, 0.5, 3.0]),
                workers=[self.rng.choice(somewhere)] if r < 0.1 and somewhere else None,
                allow_other_workers=self.rng.random() < 0.5,
                resources={"GPU": 1.0} if 0.1 <= r < 0.2 else None,
            ))  # fmt: skip
        wanted = self.rng.sample(batch, self.rng.randint(1, len(batch)))
        self.handle(submit(client, *specs, wanted=wanted, stimulus_id=self.fresh("submit")))

    def busy(self) -> list[tuple[str, str]]:
        return [(a, k) for a in self.live() for k in sorted(self.workers[a].assigned)]

    def finish(self, err: bool = False) -> None:
        busy = self.busy()
        if not busy:
            return
        address, key = self.rng.choice(busy)
        w = self.workers[address]
        w.assigned.discard(key)
        if err and key not in w.data:  # a real worker holding the key reports it done
            self.handle(task_erred(address, key, stimulus_id=self.fresh("erred")))
        else:
            w.data.add(key)
            self.handle(task_finished(address, key, self.rng.randint(1, 100),
                                      stimulus_id=self.fresh("finished")))  # fmt: skip

    def stale_report(self) -> None:
        """A worker reports a key it was not (or no longer) asked to compute, or a worker
        that left reports one."""
        if not self.workers:
            return
        address = self.rng.choice(self.live())
        key = self.rng.choice(sorted(self.state.tasks) + [f"t-{self.rng.randint(1, self.n)}"])
        if key in self.workers[address].assigned:
            return
        if self.rng.random() < 0.3:
            self.handle(task_erred(address, key, stimulus_id=self.fresh("stale")))
        elif self.rng.random() < 0.2:
            self.handle(task_finished(self.fresh("w"), key, stimulus_id=self.fresh("stale")))
        else:
            self.workers[address].data.add(key)
            self.handle(task_finished(address, key, stimulus_id=self.fresh("stale")))

    def client_keys(self, client: str) -> list[str]:
        return sorted(ts.key for ts in self.state.clients.get(client, ()))

    def release(self) -> None:
        client = self.rng.choice(self.clients)
        keys = self.client_keys(client)
        if self.rng.random() < 0.1:  # keys it does not hold (any more), or never did
            self.handle(KeysReleased(self.fresh("release"), client,
                                     [self.fresh("t"), *sorted(self.state.tasks)[:2]]))  # fmt: skip
        elif keys:
            chosen = self.rng.sample(keys, self.rng.randint(1, len(keys)))
            self.handle(KeysReleased(self.fresh("release"), client, chosen))

    def cancel(self) -> None:
        client = self.rng.choice(self.clients)
        keys = self.client_keys(client)
        if self.rng.random() < 0.1:
            self.handle(KeysCancelled(self.fresh("cancel"), client,
                                      [self.fresh("t"), *sorted(self.state.tasks)[:1]]))  # fmt: skip
        elif keys:
            self.handle(KeysCancelled(self.fresh("cancel"), client, [self.rng.choice(keys)]))

    def disconnect(self) -> None:
        self.handle(ClientDisconnected(self.fresh("bye"), self.rng.choice(self.clients)))

    def want(self) -> None:
        keys = sorted(self.state.tasks) + [self.fresh("unknown")]
        chosen = self.rng.sample(keys, min(len(keys), self.rng.randint(1, 3)))
        self.handle(KeysWanted(self.fresh("want"), self.rng.choice(self.clients), chosen))

    def missing(self) -> None:
        in_memory = sorted(k for k, ts in self.state.tasks.items() if ts.state == "memory")
        if self.rng.random() < 0.2:  # a stale complaint: a key not in memory, or a gone holder
            key = self.rng.choice(sorted(self.state.tasks) + [self.fresh("t")])
            holder = self.rng.choice(self.live() + [self.fresh("w")])
            if key not in self.workers.get(holder, SimWorker()).data:
                self.handle(DataMissing(self.fresh("missing"), self.rng.choice(self.live()),
                                        key, holder))  # fmt: skip
            return
        if not in_memory:
            return
        key = self.rng.choice(in_memory)
        holder = self.rng.choice(sorted(ws.address for ws in self.state.tasks[key].who_has))
        self.workers[holder].data.discard(key)  # it really lost it
        asker = self.rng.choice(self.live())
        self.handle(DataMissing(self.fresh("missing"), asker, key, holder))

    def replicate(self) -> None:
        in_memory = sorted(k for k, ts in self.state.tasks.items() if ts.state == "memory")
        if self.rng.random() < 0.2:  # a copy of a key that is no longer in memory
            key = self.rng.choice(sorted(self.state.tasks) + [self.fresh("t")])
            address = self.rng.choice(self.live())
            if self.state.tasks.get(key) is None or self.state.tasks[key].state != "memory":
                self.workers[address].data.add(key)
                self.handle(ReplicasAdded(self.fresh("replica"), address, [key], [8]))
            return
        if not in_memory or not self.workers:
            return
        key = self.rng.choice(in_memory)
        address = self.rng.choice(self.live())
        self.workers[address].data.add(key)
        self.handle(ReplicasAdded(self.fresh("replica"), address, [key], [8]))

    def scatter(self) -> None:
        client = self.rng.choice(self.clients)
        key = self.fresh("s")
        if self.state.tasks and self.rng.random() < 0.15:
            key = self.rng.choice(sorted(self.state.tasks))  # a value for an existing key
        targets = self.rng.sample(self.live(), min(len(self.workers), self.rng.randint(1, 2)))
        if self.rng.random() < 0.1:
            targets = []  # it went to workers that died on the way
        for a in targets:
            self.workers[a].data.add(key)
        if self.rng.random() < 0.1:
            targets.append(self.fresh("dead-worker"))
        self.handle(DataScattered(self.fresh("scatter"), client, [key], [targets], [64]))

    def fire_and_forget(self) -> None:
        keys = sorted(self.state.tasks)
        if keys:
            chosen = self.rng.sample(keys, min(len(keys), self.rng.randint(1, 2)))
            self.handle(FireAndForget(self.fresh("fire-and-forget"), chosen))

    def tick_if_due(self) -> bool:
        due = [w for w in self.wakes if w <= self.now]
        if not due:
            return False
        self.wakes = [w for w in self.wakes if w > self.now]
        self.handle(Tick(self.fresh("tick")))
        return True

    # ---------------------------------------------------------------- run

    def step(self) -> None:
        if self.tick_if_due():
            return
        r = self.rng.random()
        if r < 0.01:
            self.fire_and_forget()
        elif not self.workers or r < 0.05:
            self.add_worker()
        elif r < 0.09:
            self.remove_worker()
        elif r < 0.25:
            self.submit()
        elif r < 0.57:
            self.finish()
        elif r < 0.60:
            self.finish(err=True)
        elif r < 0.63:
            self.stale_report()
        elif r < 0.70:
            self.release()
        elif r < 0.73:
            self.cancel()
        elif r < 0.75:
            self.disconnect()
        elif r < 0.80:
            self.want()
        elif r < 0.84:
            self.missing()
        elif r < 0.88:
            self.replicate()
        elif r < 0.91:
            self.scatter()
        else:
            self.finish()

    def drain(self) -> None:
        """No more chaos: every worker that left comes back, one with a GPU joins, and every
        task runs to an end."""
        for address in sorted(self.gone):
            self.add_worker(address)
        self.add_worker(gpus=1.0)
        for _ in range(100_000):
            if self.busy():
                self.finish(err=self.rng.random() < 0.05)
            elif self.wakes:
                self.now = max(self.now, min(self.wakes))
                self.tick_if_due()
            else:
                break
        else:  # pragma: no cover
            raise AssertionError("did not settle")

    def check_settled(self) -> None:
        """Every key a client still wants is in memory or erred, and it was told so last."""
        for ts in self.state.tasks.values():
            assert ts.state in ("memory", "erred", "released"), ts
        assert not self.state.clients.get(FIRE_AND_FORGET), "fire-and-forget keys kept"
        for client, wanted in self.state.clients.items():
            for ts in wanted:
                if client == FIRE_AND_FORGET:
                    continue
                report = self.reports.get((client, ts.key))
                if ts.state == "memory":
                    assert isinstance(report, KeyInMemory), (client, ts, report)
                else:
                    assert ts.state == "erred", (client, ts)
                    assert isinstance(report, KeyErred), (client, ts, report)
                    assert ts.failure is not None and report.kind == ts.failure.kind
        # Nothing is kept that no client wants, directly or as a recipe's input.
        needed: set[str] = set()
        stack = [ts for keys in self.state.clients.values() for ts in keys]
        while stack:
            ts = stack.pop()
            if ts.key not in needed:
                needed.add(ts.key)
                stack.extend(ts.dependencies)
        assert set(self.state.tasks) == needed, set(self.state.tasks) - needed

    def release_everything(self) -> None:
        for client in self.clients:
            self.handle(KeysReleased(self.fresh("release-all"), client, self.client_keys(client)))
        assert self.state.tasks == {}
        assert self.state.unrunnable == set()
        for address, ws in self.state.workers.items():
            assert not ws.has_what and not ws.processing, ws
            assert self.workers[address].data == set(), (address, self.workers[address].data)


@pytest.mark.parametrize("seed", range(20))
def test_randomized_scheduler(seed: int) -> None:
    # given random clients and workers; when they do thousands of random things,
    # pausing now and then to let every task run to an end; then everything adds up
    sim = SchedulerSim(seed)
    try:
        for _ in range(4):
            for _ in range(400):
                sim.step()
            sim.drain()
            sim.check_settled()
        sim.release_everything()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast events:\n" + "\n".join(sim.log)) from exc
    assert sum(sim.state.transition_counts.values()) > 200


def test_seceded_task_frees_its_thread_for_queued_work() -> None:
    # given one worker with one thread: a runs there, b waits in the scheduler's queue
    from shoal.core.scheduler_events import TaskSeceded

    state = make_scheduler({"w1": 1})
    out = state.handle([submit("c1", make_spec("a"), make_spec("b"))], now=0.0)
    assert [m.key for m in sent_to(out, "w1", ComputeTask)] == ["a"]
    assert state.tasks["b"].state == "queued"

    # when a secedes (it waits on b, say)
    out = state.handle([TaskSeceded("secede-a", "w1", "a")], now=1.0)

    # then b goes to the worker, and a still counts as processing there
    assert [m.key for m in sent_to(out, "w1", ComputeTask)] == ["b"]
    assert state.tasks["a"].state == "processing"
    assert state.workers["w1"].long_running == {state.tasks["a"]}
    # and a's end takes it off the books like any task's
    state.handle([task_finished("w1", "a"), task_finished("w1", "b")], now=2.0)
    assert not state.workers["w1"].long_running and not state.workers["w1"].processing
