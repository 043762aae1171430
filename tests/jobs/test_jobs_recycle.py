"""Recycling the processes pool's children (--max-jobs-per-child, --max-memory-per-child)
and fair dispatch with --prefetch 0."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli import main
from shoal.jobs import JobQueue
from shoal.testing import wait_until

HERE = Path(__file__).resolve().parent


@pytest.fixture
def testapp(app: JobQueue) -> Iterator[object]:
    """tests/jobs/jobs_testapp.py on this test's broker (its jobs import by name in children)."""
    sys.path.insert(0, str(HERE))
    import jobs_testapp

    old = jobs_testapp.app._broker, jobs_testapp.app.url
    jobs_testapp.app._broker, jobs_testapp.app.url = app.broker, app.url
    try:
        yield jobs_testapp
    finally:
        jobs_testapp.app._broker, jobs_testapp.app.url = old
        sys.path.remove(str(HERE))


@pytest.mark.parametrize("backend", ["memory"])
def test_leaky_child_is_replaced_while_other_slots_run(testapp: object, tmp_path: Path) -> None:
    import jobs_testapp

    release, started = tmp_path / "release", tmp_path / "started"
    long = jobs_testapp.hold_until.delay(str(release), str(started))
    w = jobs_testapp.app.worker(pool="processes", concurrency=2, prefetch=0,
                                max_memory_per_child=60 << 20)
    with w:
        wait_until(started.exists, timeout=30, message="long job started")
        try:
            results = [jobs_testapp.leak.delay(25).result(timeout=30) for _ in range(6)]
            assert long.status == "running"  # the other slot kept its child and its job
        finally:
            release.touch()
        pid = long.result(timeout=30)
    assert pid not in {p for p, _ in results}  # it ran in the slot that was never recycled
    pids = [pid for pid, _ in results]
    kept = [mb for _, mb in results]
    # Each child grows 25 MiB a job and is replaced once above 60 MiB (Python itself
    # takes ~15-30 MiB): a new pid, starting from 25 MiB again.
    assert len(set(pids)) >= 2, results
    assert max(kept) <= 100, results
    assert any(a > b for a, b in zip(kept, kept[1:])), results  # the hoard was dropped
    assert w._executors[0].recycled + w._executors[1].recycled >= 1  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["memory"])
def test_max_jobs_per_child(testapp: object) -> None:
    import jobs_testapp

    with jobs_testapp.app.worker(pool="processes", concurrency=1, max_jobs_per_child=3):
        pids = [jobs_testapp.leak.delay(0).result(timeout=30)[0] for _ in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6], pids
    assert os.getpid() not in pids


@pytest.mark.parametrize("backend", ["memory"])
def test_recycling_needs_the_processes_pool(app: JobQueue) -> None:
    with pytest.raises(ValueError, match="need pool='processes'"):
        app.worker(max_jobs_per_child=3)
    out = CliRunner().invoke(main, ["jobs", "worker", "x:app", "--max-memory-per-child", "lots"])
    assert out.exit_code != 0 and "is not a size" in out.output


def test_prefetch_zero_keeps_short_jobs_off_a_busy_worker(app: JobQueue) -> None:
    """Two workers, one slot each, prefetch 0: the one running the long job takes nothing
    else, so every short job runs on the other while the long one still runs."""
    release = threading.Event()

    @app.job
    def long() -> None:
        release.wait(30)

    @app.job
    def short(i: int) -> int:
        return i

    with app.worker(concurrency=1, prefetch=0, name="a") as a, \
            app.worker(concurrency=1, prefetch=0, name="b") as b:
        busy = long.delay()
        wait_until(lambda: busy.status == "running", message="long job started")
        holder = busy.record.worker
        handles = [short.delay(i) for i in range(10)]
        try:
            for h in handles:
                h.result(timeout=20)  # all done while the long job still runs
            assert busy.status == "running"
        finally:
            release.set()
        busy.result(timeout=20)
        assert holder in (a.name, b.name)
        other = b if holder == a.name else a
        assert other.processed >= 10
