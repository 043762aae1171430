"""Pure tests of placement policy in `SchedulerState`: the scheduler-side queue, priorities,
resources, worker restrictions, delayed retries, fire-and-forget, cancelling, stealing.

Every state is built with ``validate=True`` (`validate_state` runs after each ``handle``).
Each test reads as given / when / then.
"""

from __future__ import annotations

import random

import pytest

from shoal.core import placement
from shoal.core.scheduler_events import (
    FireAndForget,
    Instruction,
    KeysCancelled,
    KeysReleased,
    SchedulerEvent,
    TaskFinishedEvent,
    Tick,
    ToClient,
    ToWorker,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from shoal.core.scheduler_state import SchedulerState, WorkerRecord
from shoal.protocol.messages import (
    ComputeTask,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    TaskFinished,
    TaskWarning,
)
from shoal.testing.core import (
    make_scheduler,
    make_spec,
    messages,
    sent_to_client,
    stimulus,
    submit,
    task_erred,
    task_finished,
)

BUDGET = placement.QUEUE_BUDGET_S


def joined(address: str, nthreads: int = 1, resources: dict[str, float] | None = None,
           name: str = "") -> WorkerJoined:  # fmt: skip
    return WorkerJoined(stimulus("join"), address, nthreads, name=name or address,
                        resources=dict(resources or {}))  # fmt: skip


def done(worker: str, key: str, took: float = 0.0, nbytes: int = 8) -> TaskFinishedEvent:
    """``worker`` ran ``key`` for ``took`` seconds (0: no timing, nothing is learned)."""
    msg = TaskFinished(key, nbytes, "int", start=100.0, stop=100.0 + took)
    return TaskFinishedEvent(stimulus("done"), worker, msg)


def tick() -> Tick:
    return Tick(stimulus("tick"))


def compute_keys(out: list[Instruction], address: str | None = None) -> list[str]:
    """Keys of the `ComputeTask`s sent (to ``address``, or to anyone), in order."""
    return [i.msg.key for i in out if isinstance(i, ToWorker) and isinstance(i.msg, ComputeTask)
            and (address is None or i.address == address)]  # fmt: skip


def where(out: list[Instruction], key: str) -> list[str]:
    return [i.address for i in out if isinstance(i, ToWorker) and isinstance(i.msg, ComputeTask)
            and i.msg.key == key]  # fmt: skip


def running(state: SchedulerState, address: str) -> list[str]:
    return sorted(ts.key for ts in state.workers[address].processing)


def queued(state: SchedulerState) -> list[str]:
    return sorted(k for k, ts in state.tasks.items() if ts.state == "queued")


def assert_idle_books(ws: WorkerRecord) -> None:
    assert not ws.processing, ws
    assert ws.occupancy == 0.0, ws.occupancy
    assert all(v == 0.0 for v in ws.used_resources.values()), ws.used_resources


def assert_within_budget(ws: WorkerRecord) -> None:
    """Beyond one task per thread, a worker holds at most ``QUEUE_BUDGET_S`` of work per thread
    (the last task handed out may cross the line)."""
    if len(ws.processing) > ws.nthreads:
        longest = max(ts.est for ts in ws.processing)
        assert ws.occupancy - longest < ws.nthreads * BUDGET + 1e-9, (ws, ws.occupancy)


# ------------------------------------------------------------- the queue, in step


def test_root_tasks_are_released_in_step_with_free_threads() -> None:
    # given: 2 workers x 1 thread, and a graph of 1,000 independent tasks of unknown duration
    state = make_scheduler({"w1": 1, "w2": 1})
    specs = [make_spec(f"root-{i}") for i in range(1000)]

    # when it is submitted
    out = state.handle([submit("c1", *specs)], now=0.0)

    # then: one task per thread goes out; the rest wait in the scheduler, not on the workers
    assert len(compute_keys(out)) == 2
    assert len(compute_keys(out, "w1")) == 1 and len(compute_keys(out, "w2")) == 1
    assert len(queued(state)) == 998

    # when a worker reports a task done after 1 ms: the group is known to be tiny
    [first] = running(state, "w1")
    out = state.handle([done("w1", first, took=0.001)], now=1.0)

    # then: that worker gets a batch, up to the queue budget in time and in count (no round
    # trip per tiny task, and no pile of tiny roots either)
    sent = compute_keys(out, "w1")
    cap = 1 + placement.QUEUE_MAX_PER_THREAD
    assert 10 < len(sent) <= min(int(BUDGET / 0.001) + 1, cap)
    ws = state.workers["w1"]
    assert ws.occupancy >= BUDGET - 1e-9 or len(ws.processing) == cap  # filled ...
    assert_within_budget(ws)  # ... and no further
    assert compute_keys(out, "w2") == []  # w2 still runs its first task

    # when every task runs to the end, each reporting 1 ms, batch by batch
    for step in range(1000):
        busy = [(a, ts.key) for a, ws in state.workers.items() for ts in ws.processing]
        if not busy:
            break
        state.handle([done(a, k, took=0.001) for a, k in busy], now=2.0 + step)
        for ws in state.workers.values():
            assert_within_budget(ws)

    # then: all are in memory, the queue holds nothing live, the books are back to zero
    assert all(ts.state == "memory" for ts in state.tasks.values())
    assert queued(state) == []
    for ws in state.workers.values():
        assert_idle_books(ws)


def test_long_tasks_are_handed_out_one_per_thread() -> None:
    # given: 2 workers x 2 threads, and 40 tasks of a group known to take 2 s each
    state = make_scheduler({"w1": 2, "w2": 2})
    state.handle([submit("c1", make_spec("slow-0"))], now=0.0)
    [warm_on] = [a for a in state.workers if state.workers[a].processing]
    state.handle([done(warm_on, "slow-0", took=2.0)], now=2.0)
    assert state.group_duration["slow"] == 2.0

    # when
    out = state.handle([submit("c1", *[make_spec(f"slow-{i}") for i in range(1, 41)])], now=3.0)

    # then: never more than one per thread, however long the queue, to the end
    assert len(compute_keys(out)) == 4
    finished = 0
    while finished < 40:
        for ws in state.workers.values():
            assert len(ws.processing) <= ws.nthreads
        a, ws = next((a, ws) for a, ws in state.workers.items() if ws.processing)
        key = min(ts.key for ts in ws.processing)
        state.handle([done(a, key, took=2.0)], now=4.0 + finished)
        finished += 1
    for ws in state.workers.values():
        assert_idle_books(ws)


def test_queue_hands_out_higher_priority_first_ties_in_submission_order() -> None:
    # given: one worker with one thread, busy
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("busy"))], now=0.0)

    # when: tasks of mixed priority arrive, in three submissions
    state.handle([submit("c1", make_spec("a", priority=0), make_spec("b", priority=5))], now=1.0)
    state.handle([submit("c1", make_spec("c", priority=0), make_spec("d", priority=5))], now=2.0)
    state.handle([submit("c1", make_spec("e", priority=-1), make_spec("f", priority=9))],
                 now=3.0)  # fmt: skip
    assert queued(state) == ["a", "b", "c", "d", "e", "f"]

    # then: as the thread frees, they go out highest priority first, ties first-come
    order: list[str] = []
    last = "busy"
    for step in range(6):
        out = state.handle([done("w1", last)], now=4.0 + step)
        [last] = compute_keys(out, "w1")
        order.append(last)
    assert order == ["f", "b", "d", "a", "c", "e"]


# -------------------------------------------------------------------- resources


def test_gpu_task_goes_only_to_gpu_workers_as_many_at_once_as_gpus() -> None:
    # given: a CPU-only worker and a GPU worker with 1 GPU, both with 4 threads
    state = make_scheduler()
    state.handle([joined("cpu", 4), joined("gpu", 4, {"GPU": 1})], now=0.0)

    # when three tasks each asking for a GPU are submitted
    out = state.handle([submit("c1", *[make_spec(f"train-{i}", resources={"GPU": 1})
                                       for i in range(3)])], now=0.0)  # fmt: skip

    # then: one runs on the GPU worker; the others wait (the CPU worker idles)
    assert compute_keys(out) == ["train-0"] and where(out, "train-0") == ["gpu"]
    assert queued(state) == ["train-1", "train-2"]
    assert state.workers["gpu"].used_resources == {"GPU": 1.0}
    assert messages(out, ComputeTask)[0].resources == {"GPU": 1}  # the worker checks too

    # when it finishes: the GPU is freed and the next takes it
    out = state.handle([done("gpu", "train-0")], now=1.0)
    assert compute_keys(out) == ["train-1"] and where(out, "train-1") == ["gpu"]
    assert state.workers["gpu"].used_resources == {"GPU": 1.0}
    out = state.handle([done("gpu", "train-1")], now=2.0)
    assert compute_keys(out) == ["train-2"]
    state.handle([done("gpu", "train-2")], now=3.0)

    # then: the books are back to zero
    for ws in state.workers.values():
        assert_idle_books(ws)


def test_two_gpus_run_two_gpu_tasks_at_once() -> None:
    state = make_scheduler()
    state.handle([joined("gpu", 8, {"GPU": 2})], now=0.0)
    out = state.handle([submit("c1", *[make_spec(f"t-{i}", resources={"GPU": 1})
                                       for i in range(5)])], now=0.0)  # fmt: skip
    assert compute_keys(out) == ["t-0", "t-1"]
    assert len(queued(state)) == 3


def test_cpu_work_is_not_starved_behind_a_long_queue_of_gpu_tasks() -> None:
    # given: a GPU worker and a CPU worker; 100 urgent GPU tasks and 10 CPU tasks queued
    state = make_scheduler()
    state.handle([joined("gpu", 1, {"GPU": 1}), joined("cpu", 1)], now=0.0)
    gpu_specs = [make_spec(f"g-{i}", resources={"GPU": 1}, priority=1) for i in range(100)]
    out = state.handle([submit("c1", *gpu_specs, *[make_spec(f"c-{i}") for i in range(10)])],
                       now=0.0)  # fmt: skip
    assert compute_keys(out, "gpu") == ["g-0"] and compute_keys(out, "cpu") == ["c-0"]

    # when the CPU worker finishes its task
    out = state.handle([done("cpu", "c-0")], now=1.0)

    # then: it takes the next CPU task from behind the (longer than one scan) GPU queue
    assert compute_keys(out, "cpu") == ["c-1"]


def test_fractional_resources_add_up_without_rounding_trouble() -> None:
    # given: a worker offering MEM=0.3, tasks asking 0.1 and 0.2 (0.1 + 0.2 > 0.3 in floats)
    state = make_scheduler()
    state.handle([joined("w1", 4, {"MEM": 0.3})], now=0.0)

    # when
    out = state.handle([submit("c1", make_spec("a", resources={"MEM": 0.1}),
                               make_spec("b", resources={"MEM": 0.2}),
                               make_spec("long"))], now=0.0)  # fmt: skip

    # then: both fit at once
    assert compute_keys(out) == ["a", "b", "long"]

    # when they finish while another task keeps the worker busy (rounding residue is left
    # in the sum: 0.1 + 0.2 - 0.1 - 0.2 != 0)
    state.handle([done("w1", "a"), done("w1", "b")], now=1.0)

    # then: a task asking for all of it still fits
    out = state.handle([submit("c1", make_spec("all", resources={"MEM": 0.3}))], now=2.0)
    assert where(out, "all") == ["w1"]
    state.handle([done("w1", "all"), done("w1", "long")], now=3.0)
    assert_idle_books(state.workers["w1"])  # exactly zero once idle


def test_resource_nobody_offers_is_no_worker_with_a_warning_and_a_story() -> None:
    # given: workers that offer GPUs, none TPUs
    state = make_scheduler()
    state.handle([joined("w1", 2, {"GPU": 1}), joined("w2", 2)], now=0.0)

    # when a task asks for a TPU
    out = state.handle([submit("c1", make_spec("fit", resources={"TPU": 1}),
                               stimulus_id="submit-fit")], now=1.0)  # fmt: skip

    # then: it waits as no-worker, the client is warned, naming the resource
    assert compute_keys(out) == []
    assert state.tasks["fit"].state == "no-worker"
    [warning] = sent_to_client(out, "c1", TaskWarning)
    assert warning.key == "fit"
    assert "TPU=1" in warning.text and "GPU=1" in warning.text  # what it needs, what exists
    [row] = [r for r in state.story("fit") if r[2] == "no-worker"]
    assert row[3].startswith("submit-fit (") and "TPU=1" in row[3]

    # when a worker offering TPUs joins: it takes the task
    out = state.handle([joined("tpu", 1, {"TPU": 4})], now=2.0)
    assert where(out, "fit") == ["tpu"]
    assert state.workers["tpu"].used_resources == {"TPU": 1.0}


def test_queued_gpu_task_becomes_no_worker_when_the_gpu_worker_leaves() -> None:
    # given: two GPU tasks, one running and one queued on the only GPU worker
    state = make_scheduler()
    state.handle([joined("gpu", 1, {"GPU": 1}), joined("cpu", 1)], now=0.0)
    state.handle([submit("c1", make_spec("g-1", resources={"GPU": 1}),
                         make_spec("g-2", resources={"GPU": 1}))], now=0.0)  # fmt: skip
    assert queued(state) == ["g-2"]

    # when that worker leaves
    out = state.handle([WorkerLeft("gone", "gpu", "killed")], now=1.0)

    # then: both are no-worker, and the client hears why for each
    assert state.tasks["g-1"].state == "no-worker" and state.tasks["g-2"].state == "no-worker"
    assert sorted(w.key for w in sent_to_client(out, "c1", TaskWarning)) == ["g-1", "g-2"]

    # when it comes back: they run again, one at a time
    out = state.handle([joined("gpu", 1, {"GPU": 1})], now=2.0)
    assert compute_keys(out) == ["g-1"] and queued(state) == ["g-2"]


# ----------------------------------------------------------------- restrictions


def test_workers_restriction_is_honoured_even_when_others_idle() -> None:
    # given
    state = make_scheduler({"w1": 1, "w2": 1})

    # when three tasks restricted to w2 are submitted
    out = state.handle([submit("c1", *[make_spec(f"r-{i}", workers=["w2"]) for i in range(3)])],
                       now=0.0)  # fmt: skip

    # then: they run on w2, one at a time; w1 gets none
    assert compute_keys(out) == ["r-0"] and where(out, "r-0") == ["w2"]
    out = state.handle([done("w2", "r-0")], now=1.0)
    assert where(out, "r-1") == ["w2"]
    out = state.handle([done("w2", "r-1")], now=2.0)
    assert where(out, "r-2") == ["w2"]
    assert state.workers["w1"].processing == set()


def test_restriction_by_name_or_host() -> None:
    state = make_scheduler()
    state.handle([joined("tcp://10.0.0.1:7000", 1, name="alpha"),
                  joined("tcp://10.0.0.2:7000", 1, name="beta")], now=0.0)  # fmt: skip
    out = state.handle([submit("c1", make_spec("by-name", workers=["beta"]),
                               make_spec("by-host", workers=["10.0.0.1"]))], now=0.0)  # fmt: skip
    assert where(out, "by-name") == ["tcp://10.0.0.2:7000"]
    assert where(out, "by-host") == ["tcp://10.0.0.1:7000"]


def test_allow_other_workers_prefers_the_named_worker_while_it_has_room() -> None:
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x", workers=["w2"], allow_other_workers=True))],
                       now=0.0)  # fmt: skip
    assert where(out, "x") == ["w2"]


def test_allow_other_workers_goes_elsewhere_when_the_preferred_is_busy() -> None:
    # given: w2 busy
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([submit("c1", make_spec("busy", workers=["w2"]))], now=0.0)

    # when: a task prefers w2 but allows others; another insists on w2
    out = state.handle([submit("c1", make_spec("flexible", workers=["w2"], allow_other_workers=True),
                               make_spec("strict", workers=["w2"]))], now=1.0)  # fmt: skip

    # then: the flexible one runs on w1 now; the strict one waits for w2
    assert where(out, "flexible") == ["w1"]
    assert state.tasks["strict"].state == "queued"
    out = state.handle([done("w2", "busy")], now=2.0)
    assert where(out, "strict") == ["w2"]


def test_allow_other_workers_when_the_preferred_is_absent() -> None:
    state = make_scheduler({"w1": 1})
    out = state.handle([submit("c1", make_spec("x", workers=["nowhere"], allow_other_workers=True))],
                       now=0.0)  # fmt: skip
    assert where(out, "x") == ["w1"]
    assert sent_to_client(out, "c1", TaskWarning) == []


def test_restriction_to_an_absent_worker_is_no_worker_with_a_reason() -> None:
    # given
    state = make_scheduler({"w1": 1})

    # when
    out = state.handle([submit("c1", make_spec("x", workers=["nowhere"]))], now=0.0)

    # then
    assert state.tasks["x"].state == "no-worker"
    [warning] = sent_to_client(out, "c1", TaskWarning)
    assert "restricted to workers ['nowhere']" in warning.text
    assert any("nowhere" in row[3] for row in state.story("x") if row[2] == "no-worker")

    # when that worker joins: it runs there
    out = state.handle([joined("nowhere", 1)], now=1.0)
    assert where(out, "x") == ["nowhere"]


# ---------------------------------------------------------------------- retries


def test_retry_waits_for_its_delay_and_the_delays_double() -> None:
    # given: a task with 2 retries, 1 s apart at first
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("flaky", retries=2, retry_delay=1.0))], now=0.0)

    # when it fails at t=10
    out = state.handle([task_erred("w1", "flaky")], now=10.0)

    # then: it waits in the queue until t=11, and asks to be woken then; the client hears nothing
    assert compute_keys(out) == [] and messages(out, KeyErred) == []
    assert state.tasks["flaky"].state == "queued" and state.tasks["flaky"].not_before == 11.0
    assert [i for i in out if isinstance(i, WakeAt)] == [WakeAt(11.0)]

    # when other work frees the worker early, or time ticks too soon: still not sent
    out = state.handle([submit("c1", make_spec("other")), tick()], now=10.5)
    assert compute_keys(out) == ["other"]
    out = state.handle([done("w1", "other"), tick()], now=10.9)
    assert compute_keys(out) == []
    assert [i for i in out if isinstance(i, WakeAt)] == [WakeAt(11.0)]  # asks again

    # when the tick comes at t=11: it runs
    out = state.handle([tick()], now=11.0)
    assert compute_keys(out) == ["flaky"]

    # when it fails again at t=20: the delay doubles
    out = state.handle([task_erred("w1", "flaky")], now=20.0)
    assert state.tasks["flaky"].not_before == 22.0
    assert [i for i in out if isinstance(i, WakeAt)] == [WakeAt(22.0)]
    assert compute_keys(state.handle([tick()], now=21.0)) == []
    assert compute_keys(state.handle([tick()], now=22.0)) == ["flaky"]

    # when it fails a third time: retries are used up and the client hears
    out = state.handle([task_erred("w1", "flaky", text="boom")], now=30.0)
    assert [(m.key, m.text) for m in sent_to_client(out, "c1", KeyErred)] == [("flaky", "boom")]
    assert [i for i in out if isinstance(i, WakeAt)] == []


def test_retry_without_delay_is_sent_at_once() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("flaky", retries=1, retry_delay=0.0))], now=0.0)
    out = state.handle([task_erred("w1", "flaky")], now=1.0)
    assert compute_keys(out) == ["flaky"]
    assert [i for i in out if isinstance(i, WakeAt)] == []


def test_released_retry_is_dropped_from_the_queue() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("flaky", retries=1, retry_delay=5.0))], now=0.0)
    state.handle([task_erred("w1", "flaky")], now=1.0)
    state.handle([KeysReleased("bye", "c1", ["flaky"])], now=2.0)
    assert state.tasks == {}
    assert compute_keys(state.handle([tick()], now=6.0)) == []


# -------------------------------------------------------------- fire and forget


def test_fire_and_forget_runs_to_the_end_then_is_forgotten() -> None:
    # given: a running task the client fires and forgets, then releases
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("side-effect"))], now=0.0)

    # when
    out = state.handle([FireAndForget("ff", ["side-effect"]),
                        KeysReleased("drop", "c1", ["side-effect"])], now=1.0)  # fmt: skip

    # then: it keeps running (the worker is not told to drop it)
    assert out == []
    assert state.tasks["side-effect"].state == "processing"

    # when it finishes: nobody is told, the worker drops the result, the scheduler forgets it
    out = state.handle([done("w1", "side-effect")], now=2.0)
    assert [i for i in out if isinstance(i, ToClient)] == []
    assert messages(out, FreeKeys) == [FreeKeys(["side-effect"], messages(out, FreeKeys)[0].stimulus_id)]
    assert state.tasks == {}
    assert_idle_books(state.workers["w1"])


def test_fire_and_forget_keeps_inputs_until_it_has_run() -> None:
    # given: y = f(x), both released by the client, y fired and forgotten while x runs
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"), make_spec("y", ["x"]))], now=0.0)
    state.handle([FireAndForget("ff", ["y"]), KeysReleased("drop", "c1", ["x", "y"])], now=1.0)

    # when x finishes: y runs
    out = state.handle([done("w1", "x")], now=2.0)
    assert compute_keys(out) == ["y"]

    # when y finishes: everything is gone
    state.handle([done("w1", "y")], now=3.0)
    assert state.tasks == {}


def test_fire_and_forget_of_a_failing_task_is_forgotten_too() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("doomed"))], now=0.0)
    state.handle([FireAndForget("ff", ["doomed"]), KeysReleased("drop", "c1", ["doomed"])],
                 now=1.0)  # fmt: skip
    out = state.handle([task_erred("w1", "doomed")], now=2.0)
    assert [i for i in out if isinstance(i, ToClient)] == []
    assert state.tasks == {}


def test_fire_and_forget_of_a_finished_key_lets_it_go() -> None:
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"))], now=0.0)
    state.handle([done("w1", "x")], now=1.0)
    out = state.handle([FireAndForget("ff", ["x"]), KeysReleased("drop", "c1", ["x"])], now=2.0)
    assert [i for i in out if isinstance(i, ToClient)] == []
    assert state.tasks == {}


# ---------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_task_releases_it_without_telling_any_worker() -> None:
    # given: the only thread busy, q queued behind it, and r = f(q) waiting
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("busy"), make_spec("q"), make_spec("r", ["q"]))],
                 now=0.0)  # fmt: skip
    assert queued(state) == ["q"]

    # when
    out = state.handle([KeysCancelled("cancel-q", "c1", ["q"])], now=1.0)

    # then: q and its dependent are cancelled and forgotten; no FreeKeys (nothing was sent)
    assert sorted(m.key for m in sent_to_client(out, "c1", KeyCancelled)) == ["q", "r"]
    assert messages(out, FreeKeys) == []
    assert set(state.tasks) == {"busy"}

    # when the thread frees: nothing more is sent
    out = state.handle([done("w1", "busy")], now=2.0)
    assert compute_keys(out) == []


# -------------------------------------------------------------------- stealing


def _holder_busy(nbytes: int) -> tuple[SchedulerState, str, str]:
    """x (``nbytes``) on one worker, both workers busy with a long task; returns the state,
    x's holder and the other worker."""
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [holder] = where(out, "x")
    other = "w2" if holder == "w1" else "w1"
    state.handle([done(holder, "x", nbytes=nbytes)], now=1.0)
    state.handle([submit("c1", make_spec("long-a", workers=[holder]),
                         make_spec("long-b", workers=[other]))], now=1.0)  # fmt: skip
    return state, holder, other


def test_queued_task_with_a_small_input_goes_to_the_worker_that_frees_first() -> None:
    # given: y needs x (1 kB) whose holder is busy; both workers busy, so y is queued
    state, holder, other = _holder_busy(1_000)
    state.handle([submit("c1", make_spec("y", ["x"]))], now=2.0)
    assert state.tasks["y"].state == "queued"

    # when the other worker frees up
    out = state.handle([done(other, "long-b")], now=3.0)

    # then: it takes y (moving 1 kB beats waiting for the holder)
    assert where(out, "y") == [other]
    [msg] = messages(out, ComputeTask)
    assert msg.who_has == {"x": [holder]}


def test_queued_task_with_a_huge_input_waits_for_its_holder() -> None:
    # given: y needs x (2 GB) whose holder is busy
    state, holder, other = _holder_busy(2_000_000_000)
    state.handle([submit("c1", make_spec("y", ["x"]))], now=2.0)

    # when the other worker frees up: it does not take y
    out = state.handle([done(other, "long-b")], now=3.0)
    assert compute_keys(out) == []
    assert state.tasks["y"].state == "queued"

    # when the holder frees up: y runs there
    out = state.handle([done(holder, "long-a")], now=4.0)
    assert where(out, "y") == [holder]


def test_steal_at_placement_picks_the_cheapest_move() -> None:
    # given: x (60 MB) on a, z (50 MB) on b; a is busy; b has a free thread; c is idle
    state = make_scheduler()
    state.handle([joined("a", 1), joined("b", 2), joined("c", 1)], now=0.0)
    state.handle([submit("c1", make_spec("x", workers=["a"]), make_spec("z", workers=["b"]))],
                 now=0.0)  # fmt: skip
    state.handle([done("a", "x", nbytes=60_000_000), done("b", "z", nbytes=50_000_000)], now=1.0)
    state.handle([submit("c1", make_spec("long-a", workers=["a"]),
                         make_spec("long-b", workers=["b"]))], now=1.0)  # fmt: skip

    # when a task needs both (its best worker, a, has no room)
    out = state.handle([submit("c1", make_spec("y", ["x", "z"]))], now=2.0)

    # then: it goes to b, which has to fetch only x (0.3 s at the assumed bandwidth, less than
    # the wait at a), not to the idle c, which would have to fetch both
    assert where(out, "y") == ["b"]


# ------------------------------------------------------------------ randomized

RESOURCE_KINDS = ["GPU", "MEM"]


class PlacementSim:
    """Clients and workers acting at random on a validating `SchedulerState`, with
    resources, restrictions, priorities, delayed retries and fire-and-forget.

    After every step it checks what placement promises: restrictions and resource limits
    are kept, ``occupancy`` and ``used_resources`` are the sums over ``processing``, no
    queued task could run on a worker with room, and the budget per thread holds.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.state = SchedulerState(validate=True)
        self.assigned: dict[str, set[str]] = {}  #: worker -> keys it was told to compute
        self.names: dict[str, str] = {}
        self.now = 0.0
        self.wake = float("inf")
        self.n = 0
        self.ghosts: list[str] = []  #: names tasks may be restricted to before they exist
        self.restricted_to: set[str] = set()  #: every name a task was restricted to

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def handle(self, *events: SchedulerEvent) -> list[Instruction]:
        self.now += self.rng.choice([0.0, 0.01, 0.3, 1.0])
        batch = list(events)
        if self.wake <= self.now:  # the server's timer fires
            self.wake = float("inf")
            batch.insert(0, tick())
        out = self.state.handle(batch, self.now)
        for inst in out:
            if isinstance(inst, WakeAt):
                assert inst.when > self.now - 1e-9
                self.wake = min(self.wake, inst.when)
            elif isinstance(inst, ToWorker):
                assert inst.address in self.assigned, inst
                if isinstance(inst.msg, ComputeTask):
                    self.assigned[inst.address].add(inst.msg.key)
                elif isinstance(inst.msg, FreeKeys):
                    self.assigned[inst.address].difference_update(inst.msg.keys)
            else:
                assert inst.client != "fire-and-forget", inst
        self.check()
        return out

    def check(self) -> None:
        state = self.state
        for address, ws in state.workers.items():
            assert {ts.key for ts in ws.processing} <= self.assigned[address]
            for r, total in ws.resources.items():
                assert ws.used_resources.get(r, 0.0) <= total + 1e-9, (ws, r)
            assert_within_budget(ws)
            for ts in ws.processing:
                spec = ts.spec
                assert spec is not None
                for r, need in (spec.resources or {}).items():
                    assert ws.resources.get(r, 0.0) >= need, (ts, ws)
                if spec.workers and not spec.allow_other_workers:
                    assert ws.address in spec.workers or ws.name in spec.workers, (ts, ws)
        # Liveness: a queued task that is due has no valid worker with room that holds all
        # its inputs. (Not checked: a worker that would have to move inputs. Whether that
        # pays changes as other workers take work, and an idle worker looks at the queue
        # again only when it gains room: there is no periodic rebalancing.)
        for ts in state.tasks.values():
            if ts.state == "queued" and ts.not_before <= self.now:
                valid, _ = placement.valid_workers(ts, state.workers.values())
                assert valid, f"{ts} is queued with no valid worker"
                takers = [w for w in valid if placement.has_room(w, ts)
                          and placement.transfer_time(ts, w) == 0]  # fmt: skip
                assert not takers, f"{ts} is queued while {takers} have room and its inputs"

    # ------------------------------------------------------------ actions

    def add_worker(self, name: str | None = None, everything: bool = False) -> None:
        address = self.fresh("tcp://w")
        resources: dict[str, float] = {}
        for r in RESOURCE_KINDS:
            if everything or self.rng.random() < 0.4:
                resources[r] = 8.0 if everything else self.rng.choice([0.3, 1.0, 2.0])
        self.assigned[address] = set()
        self.names[address] = name or address
        self.handle(joined(address, self.rng.randint(1, 3), resources, name=name or address))

    def remove_worker(self) -> None:
        address = self.rng.choice(sorted(self.state.workers))
        self.handle(WorkerLeft(self.fresh("leave"), address, "chaos",
                               graceful=self.rng.random() < 0.5))  # fmt: skip
        del self.assigned[address]

    def submit(self) -> None:
        in_memory = sorted(k for k, ts in self.state.tasks.items() if ts.state != "erred")
        specs = []
        for _ in range(self.rng.randint(1, 8)):
            key = self.fresh(self.rng.choice(["a", "b", "c"]))
            deps = self.rng.sample(in_memory, min(len(in_memory), self.rng.randint(0, 2)))
            resources = None
            if self.rng.random() < 0.3:
                resources = {self.rng.choice(RESOURCE_KINDS): self.rng.choice([0.1, 0.2, 1.0])}
            workers = None
            if self.rng.random() < 0.2:
                pool = sorted(self.names.values())[:3] + self.ghosts
                if not pool or self.rng.random() < 0.2:
                    self.ghosts.append(self.fresh("ghost"))
                    pool = self.ghosts
                workers = self.rng.sample(pool, min(len(pool), self.rng.randint(1, 2)))
                self.restricted_to.update(workers)
            specs.append(make_spec(
                key, deps, priority=self.rng.randint(-2, 2), retries=self.rng.choice([0, 1, 2]),
                workers=workers, allow_other_workers=self.rng.random() < 0.4,
                resources=resources, retry_delay=self.rng.choice([0.0, 0.5, 2.0])))  # fmt: skip
        client = self.rng.choice(["c1", "c2"])
        wanted = [s.key for s in specs if self.rng.random() < 0.8]
        self.handle(submit(client, *specs, wanted=wanted))

    def busy(self) -> list[tuple[str, str]]:
        return [(a, ts.key) for a, ws in sorted(self.state.workers.items())
                for ts in sorted(ws.processing, key=lambda t: t.key)]  # fmt: skip

    def finish(self, err: bool = False) -> None:
        busy = self.busy()
        if not busy:
            return
        picks = self.rng.sample(busy, self.rng.randint(1, min(3, len(busy))))
        events: list[SchedulerEvent] = []
        for address, key in picks:
            self.assigned[address].discard(key)
            if err:
                events.append(task_erred(address, key))
            else:
                events.append(done(address, key, took=self.rng.choice([0.0005, 0.01, 0.2, 2.0]),
                                   nbytes=self.rng.choice([8, 1_000, 50_000_000])))  # fmt: skip
        self.handle(*events)

    def release(self) -> None:
        client = self.rng.choice(["c1", "c2"])
        keys = sorted(ts.key for ts in self.state.clients.get(client, ()))
        if keys:
            chosen = self.rng.sample(keys, self.rng.randint(1, len(keys)))
            if self.rng.random() < 0.3:
                self.handle(FireAndForget(self.fresh("ff"), chosen[:2]))
            if self.rng.random() < 0.3:
                self.handle(KeysCancelled(self.fresh("cancel"), client, chosen[:1]))
            else:
                self.handle(KeysReleased(self.fresh("release"), client, chosen))

    def step(self) -> None:
        r = self.rng.random()
        if not self.state.workers or r < 0.05:
            self.add_worker(self.rng.choice(self.ghosts) if self.ghosts and r < 0.01 else None)
        elif r < 0.08 and len(self.state.workers) > 1:
            self.remove_worker()
        elif r < 0.30:
            self.submit()
        elif r < 0.75:
            self.finish()
        elif r < 0.80:
            self.finish(err=True)
        elif r < 0.90:
            self.release()
        else:
            self.handle()  # time passes

    def drain(self) -> None:
        """Workers that can run anything join (one per name tasks are restricted to); then
        everything runs to an end, retries' delays included."""
        for name in sorted(self.restricted_to):
            self.add_worker(name, everything=True)
        self.add_worker(everything=True)
        for _ in range(100_000):
            if self.busy():
                self.finish(err=self.rng.random() < 0.1)
            elif self.wake < float("inf"):
                self.now = max(self.now, self.wake)
                self.handle()
            else:
                break
        else:  # pragma: no cover
            raise AssertionError("did not settle")
        for ts in self.state.tasks.values():
            assert ts.state in ("memory", "erred", "released"), ts


@pytest.mark.parametrize("seed", range(12))
def test_randomized_books_return_to_zero(seed: int) -> None:
    # given random workers (with resources) and tasks (with resources, restrictions, retries)
    sim = PlacementSim(seed)

    # when they do random things, then everything runs to an end and is released
    for _ in range(3):
        for _ in range(300):
            sim.step()
        sim.drain()
    for client in ("c1", "c2"):
        sim.handle(KeysReleased("release-all", client,
                                sorted(ts.key for ts in sim.state.clients.get(client, ()))))  # fmt: skip

    # then: nothing is left and every worker's books read zero
    assert sim.state.tasks == {}
    assert sim.state.unrunnable == set()
    for ws in sim.state.workers.values():
        assert_idle_books(ws)
        assert not ws.has_what and ws.nbytes == 0
    assert sum(sim.state.transition_counts.values()) > 300
    assert sim.state.transition_counts.get(("waiting", "queued"), 0) > 0
