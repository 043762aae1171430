"""Data moves worker to worker, between real worker processes."""

from __future__ import annotations

import os
import signal

import numpy as np

import shoal
from shoal.testing import wait_until


def test_run_reaches_each_worker_process(process_client: shoal.Client) -> None:
    # when os.getpid runs on every worker
    pids = process_client.run(os.getpid)
    # then two distinct processes answer, neither of them this one
    assert set(pids) == set(process_client.nthreads())
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_a_task_gets_inputs_that_live_on_both_workers(process_client: shoal.Client) -> None:
    # given one input on each worker
    w1, w2 = sorted(process_client.nthreads())
    x = process_client.scatter(1, workers=[w1])
    y = process_client.scatter(2, workers=[w2])
    assert process_client.who_has([x, y]) == {x.key: [w1], y.key: [w2]}
    # when a task takes both
    z = process_client.submit(lambda a, b: a + b, x, y)
    # then it gets both values, and one input now has a replica on the other worker
    assert z.result(timeout=30) == 3
    holders = sorted(process_client.who_has([x, y]).values(), key=len)
    assert len(holders[0]) == 1 and sorted(holders[1]) == [w1, w2]


def test_a_large_array_result_crosses_between_workers_intact(process_client: shoal.Client) -> None:
    # given a 20 MB array made by a task on one worker
    def make(n: int) -> np.ndarray:
        return np.arange(n, dtype=np.float64)

    n = 20 * 1024 * 1024 // 8
    big = process_client.submit(make, n)
    shoal.wait([big], timeout=30)
    (maker,) = process_client.who_has([big])[big.key]
    # and a larger input on the other worker, so the next task is placed there
    (other,) = set(process_client.nthreads()) - {maker}
    anchor = process_client.scatter(np.zeros(n + 1024), workers=[other])

    def check(a: np.ndarray, _anchor: np.ndarray) -> tuple[int, float, bool]:
        return os.getpid(), float(a.sum()), bool((a == np.arange(len(a))).all())

    # when a task needs both
    pid, total, exact = process_client.submit(check, big, anchor).result(timeout=60)
    # then it ran on the other worker and saw the array intact
    assert pid == process_client.run(os.getpid, workers=[other])[other]
    assert exact and total == float(n * (n - 1) // 2)
    assert sorted(process_client.who_has([big])[big.key]) == sorted([maker, other])
    # and the client gets it intact too
    assert np.array_equal(big.result(timeout=60), np.arange(n, dtype=np.float64))


def test_a_result_lost_with_its_worker_is_recomputed(process_client: shoal.Client) -> None:
    # given a result held by one worker process
    x = process_client.submit(lambda: list(range(10)))
    shoal.wait([x], timeout=30)
    (holder,) = process_client.who_has([x])[x.key]
    pid = process_client.run(os.getpid, workers=[holder])[holder]
    # when that worker is killed
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: holder not in process_client.nthreads(), timeout=30,
               message="the scheduler notices the dead worker")  # fmt: skip
    # then a task needing the result gets it recomputed from its recipe
    assert process_client.submit(sum, x).result(timeout=30) == 45
    assert x.result(timeout=30) == list(range(10))
    assert holder not in process_client.who_has([x])[x.key]
