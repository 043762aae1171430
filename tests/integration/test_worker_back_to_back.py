"""Tasks back to back: the thread that ends a task starts the next one handed to its lane
(`WorkerState`'s lanes), with no hand-off through the event loop; a task handed ahead and
then freed never runs; a task that secedes lets its lane go on without it.

Counted, not timed: `Worker.thread_starts` counts the tasks handed to a thread through
the event loop (a lane's thread started), the rest started on the thread before them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import shoal
from shoal.testing import gen_cluster
from shoal.testing.cluster import Gate, Tally, wait_until
from shoal.worker.server import Worker


def nap(x: int) -> int:
    time.sleep(0.005)  # the GIL is free meanwhile: the loop keeps the lane filled
    return x + 1


def hold(gate: Gate, value: Any, then: Gate | None = None) -> Any:
    """``gate(value)``; then, if given, secede and wait for ``then`` too."""
    gate(value)
    if then is None:
        return value
    shoal.secede()
    return then(value)


def worker_of(client: shoal.Client) -> Worker:
    worker = client.cluster.workers[0]
    assert isinstance(worker, Worker)
    return worker


def in_lane(worker: Worker, key: str) -> bool:
    state = worker.state
    ts = state.tasks.get(key) if state is not None else None
    return ts is not None and ts.lane is not None


def test_ready_tasks_run_back_to_back_on_one_thread() -> None:
    # given one worker with one thread, and 200 tasks it is asked to run
    with gen_cluster(n_workers=1, threads_per_worker=1) as client:
        worker = worker_of(client)
        assert client.submit(nap, -1).result(timeout=10) == 0  # its duration is known now
        before = worker.thread_starts
        # when it runs them
        results = client.gather(client.map(nap, range(200)))
        # then all results are right, and most tasks started on the thread that ended the
        # one before them, not through the event loop
        assert results == list(range(1, 201))
        started = worker.thread_starts - before
        assert started <= 40, f"{started} of 200 tasks went through the event loop"


def test_a_task_handed_ahead_and_freed_never_runs(tmp_path: Path) -> None:
    # given one thread, busy, with two tasks handed to its lane behind the running one
    tally = Tally(tmp_path / "runs")
    warm = Gate()
    gate = Gate()
    try:
        with gen_cluster(n_workers=1, threads_per_worker=1) as client:
            worker = worker_of(client)
            warm.open()  # durations of both kinds of task known: the scheduler sends ahead
            assert client.submit(hold, warm, 0).result(timeout=10) == 0
            assert client.submit(tally.record, "warm-up").result(timeout=10) == "warm-up"
            running = client.submit(hold, gate, 1)
            wait_until(lambda: in_lane(worker, running.key), message="the held task runs")
            freed = client.submit(tally.record, "freed", pure=False)
            kept = client.submit(tally.record, "kept", pure=False)
            wait_until(lambda: in_lane(worker, freed.key) and in_lane(worker, kept.key),
                       message="both handed to the lane")  # fmt: skip
            # when the first is cancelled before the thread gets to it
            client.cancel(freed)
            wait_until(lambda: worker.state is not None and freed.key not in worker.state.tasks,
                       message="the freed task forgotten")  # fmt: skip
            gate.open()
            # then the other one still runs, and the freed one never did
            assert kept.result(timeout=10) == "kept"
            assert running.result(timeout=10) == 1
            assert tally.count("freed") == 0 and tally.count("kept") == 1
    finally:
        warm.close()
        gate.close()


def test_a_task_that_secedes_lets_its_lane_go_on() -> None:
    # given one thread running a task with more tasks handed behind it
    warm = Gate()
    first = Gate()
    then = Gate()
    try:
        with gen_cluster(n_workers=1, threads_per_worker=1) as client:
            worker = worker_of(client)
            warm.open()
            assert client.submit(hold, warm, 0).result(timeout=10) == 0
            assert client.submit(nap, 0).result(timeout=10) == 1
            waiter = client.submit(hold, first, "waited", then)
            wait_until(lambda: in_lane(worker, waiter.key), message="the waiter runs")
            behind = client.map(nap, range(10, 20))
            wait_until(lambda: any(in_lane(worker, f.key) for f in behind),
                       message="tasks handed behind it")  # fmt: skip
            # when the running task secedes (and waits for another gate)
            first.open()
            # then the tasks behind it run meanwhile, on another thread
            assert client.gather(behind) == list(range(11, 21))
            assert not waiter.done()
            then.open()
            assert waiter.result(timeout=10) == "waited"
            state = worker.state
            assert state is not None
            wait_until(lambda: not state.executing and not state.long_running and not state.lanes,
                       message="the worker idle")  # fmt: skip
    finally:
        for g in (warm, first, then):
            g.close()
