"""`ManyWorkers`: many real workers on one event loop join a real scheduler (issue #11).

- 50 workers in this process join a ``shoal scheduler`` process, run 2,000 tasks spread over
  all of them, and close leaving no thread, process or port behind;
- a heartbeat's size on the wire, and the scheduler's /metrics per worker, do not grow with
  the number of workers (bytes counted, not time);
- the 1,000-worker version (2 processes x 500) is marked slow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import shoal
from shoal.dashboard.metrics import render, scheduler_registry
from shoal.protocol.codec import Codec
from shoal.protocol.framing import frame_prefix
from shoal.protocol.messages import Heartbeat
from shoal.scheduler import Scheduler
from shoal.testing import no_leaks, spawn_scheduler, wait_until
from shoal.testing.many_workers import ManyWorkers
from shoal.utils.loop import LoopThread
from shoal.worker.context import get_worker
from shoal.worker.process_usage import ProcessUsage, process_usage


def where_am_i(i: int) -> str:
    return get_worker().address


# Sent by value (cloudpickle pickles __main__-like and nested functions so), for child
# processes that cannot import this test module.
where_am_i.__module__ = "__main__"


def spread_over_all(address: str, n_workers: int, n_tasks: int, processes: int,
                    timeout: float, shared_threads: int = 0) -> None:  # fmt: skip
    """``n_workers`` join the scheduler at ``address``; ``n_tasks`` run, on every one of them."""
    with ManyWorkers(address, n=n_workers, processes=processes, start_timeout=timeout,
                     shared_threads=shared_threads) as mw:  # fmt: skip
        assert len(set(mw.addresses)) == n_workers
        with shoal.Client(address, timeout=timeout) as client:
            assert client.nthreads() == {a: 1 for a in mw.addresses}  # registered, 1 thread
            futures = client.map(where_am_i, range(n_tasks), pure=False)
            ran_on = client.gather(futures)
            assert len(ran_on) == n_tasks
            assert set(ran_on) == set(mw.addresses), (
                f"{n_workers - len(set(ran_on))} workers ran no task")
            holders = client.who_has(futures)
            assert {a for held in holders.values() for a in held} == set(mw.addresses)
            del futures
        assert sum(s["running"] for s in mw.stats()) == n_workers
        wait_until(lambda: sum(s["heartbeats_sent"] for s in mw.stats()) >= n_workers,
                   timeout=10, message="a heartbeat per worker")  # fmt: skip


def test_fifty_workers_on_one_loop_share_two_thousand_tasks() -> None:
    # (Its budget in the suite is 20 s; it takes 1-3 s, ~10 s with the machine at load 10.)
    with no_leaks(timeout=15), spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler:
        spread_over_all(scheduler.address, n_workers=50, n_tasks=2000, processes=0, timeout=30)


def test_workers_sharing_a_small_pool_of_threads_all_run_tasks() -> None:
    with no_leaks(timeout=15), spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler:
        spread_over_all(scheduler.address, n_workers=20, n_tasks=400, processes=0, timeout=30,
                        shared_threads=2)  # fmt: skip


def test_workers_in_child_processes_leave_nothing_behind() -> None:
    with no_leaks(timeout=15), spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler:
        spread_over_all(scheduler.address, n_workers=20, n_tasks=400, processes=2, timeout=30)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="n=0"):
        ManyWorkers("tcp://127.0.0.1:1", n=0)
    with pytest.raises(ValueError, match="processes"):
        ManyWorkers("tcp://127.0.0.1:1", n=2, processes=3)


@pytest.mark.parametrize("processes", [0, 1])
def test_a_scheduler_that_is_not_there_fails_within_the_start_timeout(processes: int) -> None:
    with no_leaks(timeout=15):
        start = time.monotonic()
        with pytest.raises(OSError, match="127.0.0.1:9"):
            ManyWorkers("tcp://127.0.0.1:9", n=3, processes=processes, start_timeout=3).start()
        assert time.monotonic() - start < 10


# ------------------------------------------------ costs that must stay per worker


@pytest.fixture
def scheduler_here() -> Iterator[tuple[LoopThread, Scheduler]]:
    """A real scheduler in this process (on its own loop), so the test can read its state."""
    with no_leaks(timeout=15):
        loop = LoopThread(name="test-scheduler-loop")
        try:
            scheduler = loop.run(Scheduler(port=0, worker_ttl=30).start(), 10)
            try:
                yield loop, scheduler
            finally:
                loop.run(scheduler.close(), 30)
        finally:
            loop.stop()


def heartbeat_bytes(loop: LoopThread, scheduler: Scheduler, n: int) -> list[int]:
    """The wire size (frame prefix and body) of the latest heartbeat of each of ``n``
    workers, as the scheduler received them."""

    async def latest() -> list[Heartbeat] | None:
        beats = list(scheduler.heartbeats.values())
        return beats if len(beats) == n else None

    beats: list[Heartbeat] = wait_until(lambda: loop.run(latest(), 5), timeout=20,
                                        message=f"heartbeats from {n} workers")  # fmt: skip
    sizes = []
    for beat in beats:
        parts = Codec().encode([beat])
        sizes.append(len(frame_prefix(parts)) + sum(memoryview(p).nbytes for p in parts))
    return sizes


def metrics_bytes(loop: LoopThread, scheduler: Scheduler) -> int:
    async def scrape() -> int:
        return len(render(scheduler_registry(scheduler, None)))

    size: int = loop.run(scrape(), 10)
    return size


def test_heartbeats_and_metrics_per_worker_do_not_grow_with_the_cluster(
    scheduler_here: tuple[LoopThread, Scheduler],
) -> None:
    loop, scheduler = scheduler_here
    no_workers = metrics_bytes(loop, scheduler)
    sizes: dict[int, list[int]] = {}
    metrics: dict[int, int] = {}
    for n in (4, 40):
        with ManyWorkers(scheduler.address, n=n, heartbeat_interval=0.05,
                         name_prefix=f"w{n:03d}") as mw:  # fmt: skip
            # Every worker has sent several by the time all are seen; the latest are compared.
            wanted = 3 * n
            wait_until(lambda: sum(s["heartbeats_sent"] for s in mw.stats()) >= wanted,  # noqa: B023
                       timeout=20, message="3 heartbeats per worker")  # fmt: skip
            sizes[n] = heartbeat_bytes(loop, scheduler, n)
            metrics[n] = metrics_bytes(loop, scheduler)
        wait_until(lambda: not scheduler.heartbeats, timeout=20, message="workers gone")
    # The same fields and values of the same widths (one int may change width: the RSS).
    assert max(sizes[40]) <= min(sizes[4]) + 4, sizes
    assert max(sizes[40]) < 200  # a few counters, nothing per peer
    # /metrics: each further worker adds what each of the first ones did (names, ports and
    # values differ in length a little: 10%).
    per_worker_first = (metrics[4] - no_workers) / 4
    per_worker_next = (metrics[40] - metrics[4]) / 36
    assert per_worker_next <= 1.1 * per_worker_first, (no_workers, metrics)


def test_workers_of_one_process_share_one_reading_of_its_usage() -> None:
    now = [0.0]
    usage = ProcessUsage(max_age=0.2, clock=lambda: now[0])
    first = [usage.read() for _ in range(500)]  # 500 workers' heartbeats at once
    assert usage.readings == 1 and len(set(first)) == 1
    assert first[0][0] > 0  # the RSS of this process
    now[0] += 0.2
    usage.read()
    assert usage.readings == 2
    assert process_usage() is process_usage()


@pytest.mark.slow
def test_a_thousand_workers_in_two_processes() -> None:
    with no_leaks(timeout=30), spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler:
        spread_over_all(scheduler.address, n_workers=1000, n_tasks=20_000, processes=2,
                        timeout=60)  # fmt: skip
