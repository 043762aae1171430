"""Workers under a nanny: a worker that dies is replaced and the scheduler learns why
(a signal, or memory above the terminate fraction); ``shoal worker`` is a nanny that stops
cleanly; a nanny gives up on a worker that keeps dying."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil

import shoal
from shoal.cluster.nanny import Nanny, death_reason
from shoal.worker.memory import MemoryFractions
from shoal.scheduler import Scheduler
from shoal.testing import gen_cluster, no_leaks, spawn_scheduler, spawn_worker, wait_until
from shoal.utils.loop import run

# Worker processes cannot import this module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 10**6


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def worker_pids(client: shoal.Client) -> dict[str, int]:
    pids: dict[str, int] = client.run(os.getpid)
    return pids


def test_death_reasons_name_the_signal_or_the_exit_code() -> None:
    assert death_reason(-signal.SIGKILL) == "signal SIGKILL"
    assert death_reason(-signal.SIGSEGV) == "signal SIGSEGV"
    assert death_reason(3) == "exit code 3"


def test_a_worker_killed_with_sigkill_is_restarted_and_the_scheduler_says_why() -> None:
    # given a cluster of two worker processes under their nannies, with results held
    with gen_cluster(n_workers=2, processes=True, timeout=60) as client:
        nannies = client.cluster.nannies
        before = worker_pids(client)
        squares = client.map(lambda x: x * x, range(10))
        assert sum(client.gather(squares)) == 285
        victim, pid = sorted(before.items())[0]
        name = client.scheduler_info()["workers"][victim]["name"]

        # when one worker process is killed with SIGKILL (no chance to say anything)
        os.kill(pid, signal.SIGKILL)

        # then its nanny starts a new one, which tells the scheduler how the old one died
        deaths = wait_until(client.worker_deaths, timeout=30, message="a death reported")
        assert [(d["address"], d["name"], d["reason"]) for d in deaths] == [
            (victim, name, "signal SIGKILL")]
        assert abs(deaths[0]["time"] - time.time()) < 60
        client.wait_for_workers(2, timeout=30)
        after = worker_pids(client)
        assert victim not in after and pid not in after.values() and len(after) == 2
        assert sum(n.restarts for n in nannies) == 1

        # and the lost results are recomputed: the work still comes out right
        assert sum(client.gather(squares)) == 285
        assert client.submit(sum, squares).result(timeout=30) == 285
    assert gone(pid) and all(gone(p) for p in after.values())
    assert all(not os.path.exists(n.spill_directory) for n in nannies)


def hog_once(flag: str, megabytes: int) -> str:
    """Hold ``megabytes`` the first time it runs (until killed); after that, return."""
    if os.path.exists(flag):
        return "second run"
    open(flag, "w").close()
    hog = np.ones(megabytes * MB // 8)
    time.sleep(30)  # the nanny kills us long before this ends
    return str(hog.sum())


def test_a_worker_above_its_terminate_fraction_is_restarted_for_memory(tmp_path: Path) -> None:
    # given a worker process with 250 MB (terminate at 95%), no pausing or spilling in the way
    fractions = MemoryFractions(target=None, spill=None, pause=None, terminate=0.95)
    with gen_cluster(n_workers=1, processes=True, memory_limit="250MB", timeout=60,
                     memory_fractions=fractions) as client:  # fmt: skip
        [address] = client.scheduler_info()["workers"]

        # when a task makes it hold 300 MB
        future = client.submit(hog_once, str(tmp_path / "ran"), 300)

        # then its nanny kills it and starts a new one; the scheduler says it was memory
        deaths = wait_until(client.worker_deaths, timeout=30, message="a death reported")
        assert len(deaths) == 1 and deaths[0]["address"] == address
        reason = deaths[0]["reason"]
        assert reason.startswith("memory: RSS ") and reason.endswith("of limit 238.4 MiB")
        # and the task, run again on the new worker, finishes
        assert future.result(timeout=30) == "second run"


def test_shoal_worker_runs_its_worker_under_a_nanny_that_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    # given a scheduler and `shoal worker` (a nanny, its worker in a child process)
    with no_leaks(timeout=15), spawn_scheduler() as scheduler, \
            spawn_worker(scheduler.address, name="supervised", env=env) as worker:  # fmt: skip
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=20)
            [(address, child)] = worker_pids(client).items()
            assert address == worker.address and psutil.Process(child).ppid() == worker.pid
            assert os.listdir(tmp_path) == [f for f in os.listdir(tmp_path)
                                            if f.startswith("shoal-supervised-")]  # fmt: skip

            # when the worker process is killed with SIGKILL
            os.kill(child, signal.SIGKILL)

            # then the nanny starts a new one and says so; the scheduler learns why
            worker.wait_for_line(r"restarted, listening at", timeout=30)
            deaths = wait_until(client.worker_deaths, timeout=30, message="a death reported")
            assert [(d["name"], d["reason"]) for d in deaths] == [("supervised",
                                                                    "signal SIGKILL")]
            client.wait_for_workers(1, timeout=20)
            [(_, new_child)] = worker_pids(client).items()
            assert new_child != child and psutil.Process(new_child).ppid() == worker.pid

        # when the nanny gets SIGTERM, then it exits 0 (checked by stop) and so does its worker
        worker.stop(signal.SIGTERM, timeout=15)
        wait_until(lambda: gone(new_child), timeout=10, message="the worker process exits")
    # and nothing is left behind: processes (no_leaks), spill directory
    assert os.listdir(tmp_path) == []


def test_shoal_worker_no_nanny_runs_the_worker_in_process() -> None:
    with no_leaks(timeout=15), spawn_scheduler() as scheduler, \
            spawn_worker(scheduler.address, extra_args=["--no-nanny"]) as worker:  # fmt: skip
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=20)
            assert list(worker_pids(client).values()) == [worker.pid]


def test_a_nanny_gives_up_on_a_worker_that_keeps_dying() -> None:
    async def main() -> tuple[Nanny, list[str]]:
        scheduler = await Scheduler(port=0).start()
        nanny = Nanny(scheduler.address, name="fragile", max_deaths=2, death_window=60)
        try:
            await nanny.start()
            # when its worker is killed twice within the window
            for _ in range(2):
                pid = nanny.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await _until(lambda: nanny.status != "running" or nanny.pid != pid)
                await _until(lambda: nanny.status in ("running", "failed"), timeout=30)
            await asyncio.wait_for(nanny.finished(), 10)
            return nanny, [d.reason for d in scheduler.deaths]
        finally:
            await nanny.close()
            await scheduler.close()

    with no_leaks(timeout=15):
        nanny, reported = run(main())
    # then it restarted it once, then gave up, saying why
    assert nanny.status == "failed" and nanny.restarts == 1
    assert [d.reason for d in nanny.deaths] == ["signal SIGKILL"] * 2
    assert "died 2 times within 60s" in nanny.error
    assert reported == ["signal SIGKILL"]  # told by the one replacement worker
    assert nanny.proc is not None and nanny.proc.poll() is not None


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.01)
