"""Cost per task stays flat as the graph grows: counted in operations, not seconds.

Every Python call into shoal's code (client, scheduler, in-process workers: one process here)
is counted while N tasks are submitted, waited on, gathered, iterated as completed and
released. A path that re-scans every task per task (a quadratic wait, a queue walked on every
completion) makes the count per task grow with N; a flat path keeps it level.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import shoal
from shoal.testing import gen_cluster, wait_until
from shoal.utils.loop import LoopThread

SHOAL_DIR = shoal.__file__.rsplit("/", 1)[0]


def noop(x: int) -> int:
    return x


class CallCounter:
    """Counts calls of Python functions defined under shoal/, on every thread."""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(SHOAL_DIR):
            self.calls += 1

    def __init__(self, loop_thread: LoopThread) -> None:
        self.calls = 0
        self.loop_thread = loop_thread

    def _on_loop(self, profile: Any) -> None:
        done = threading.Event()

        def install() -> None:
            sys.setprofile(profile)
            done.set()

        self.loop_thread.loop.call_soon_threadsafe(install)
        assert done.wait(10), "the client's loop did not answer"

    def __enter__(self) -> CallCounter:
        # This thread (the user's) and the client's loop thread, which runs the scheduler and
        # the in-process workers' servers too.
        self._on_loop(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)
        self._on_loop(None)


def calls_for(client: shoal.Client, n: int, work: Callable[[shoal.Client, int], None]) -> int:
    state = client.cluster.scheduler.state
    # warm up, so caches and connections are not counted
    work(client, 50)
    wait_until(lambda: not state.tasks, timeout=30, message="warm-up released")
    assert client._loop_thread is not None
    with CallCounter(client._loop_thread) as counter:
        work(client, n)
        wait_until(lambda: not state.tasks, timeout=60, message="tasks released")
    return counter.calls


def map_gather(client: shoal.Client, n: int) -> None:
    futures = client.map(noop, range(n), pure=False)
    assert client.gather(futures) == list(range(n))


def map_wait_as_completed(client: shoal.Client, n: int) -> None:
    futures = client.map(noop, range(n), pure=False)
    shoal.wait(futures, timeout=60)
    assert sorted(f.key for f in shoal.as_completed(futures)) == sorted(f.key for f in futures)


def tree_reduction(client: shoal.Client, n: int) -> None:
    layer = client.map(noop, range(n), pure=False)
    while len(layer) > 1:
        layer = [client.submit(sum, layer[i:i + 8], pure=False) for i in range(0, len(layer), 8)]
    assert layer[0].result(timeout=60) == sum(range(n))


def test_client_and_scheduler_calls_per_task_stay_flat() -> None:
    with gen_cluster(n_workers=2, threads_per_worker=1, processes=False, timeout=240) as client:
        for work in (map_gather, map_wait_as_completed, tree_reduction):
            small = calls_for(client, 500, work)
            large = calls_for(client, 2000, work)
            # 4x the tasks: linear cost gives ~4x the calls (fixed costs make it a bit less);
            # a quadratic path would give ~16x.
            assert large < 6 * small, (work.__name__, small, large, large / small)
