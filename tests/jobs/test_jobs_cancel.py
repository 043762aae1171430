"""Cancelling running jobs on a real worker, on every backend and in both pools: the job
is told (check_cancelled), stopped by force after the grace period, never retried, and a
cancel racing the finish ends in one state only."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli import main
from shoal.jobs import JobCancelled, JobQueue, check_cancelled, is_cancelled
from shoal.testing import wait_until

#: (backend, pool): threads on every broker; the processes pool (a child per slot, slower to
#: start) on one, as the broker's part is the same (and in the conformance checks)
CASES = [("memory", "threads"), ("sqlite", "threads"), ("redis", "threads"),
         ("sqlite", "processes")]


@pytest.mark.parametrize(("backend", "pool"), CASES)
def test_running_job_is_told_and_stops(app: JobQueue, pool: str, tmp_path: Path) -> None:
    @app.job(retries=3, backoff=0.01)
    def patient(marker: str) -> str:
        Path(marker + ".started").touch()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                check_cancelled()
            except JobCancelled:
                Path(marker + ".stopped").write_text(str(is_cancelled()))
                raise
            time.sleep(0.01)
        return "ran out"

    marker = str(tmp_path / "m")
    handle = patient.delay(marker)
    child = patient.enqueue(args=(marker + "-child",), after=[handle])
    with app.worker(pool=pool, cancel_grace=30, cancel_poll=0.05):  # type: ignore[arg-type]
        wait_until(lambda: Path(marker + ".started").exists(), timeout=30, message="job started")
        assert handle.status == "running"
        assert handle.cancel()
        assert handle.status == "cancelled" and child.status == "cancelled"
        wait_until(lambda: Path(marker + ".stopped").exists(), timeout=10,
                   message="the job saw its cancel flag")
        assert Path(marker + ".stopped").read_text() == "True"
        time.sleep(0.3)  # a retry, if one were made, would have started by now
        assert handle.status == "cancelled" and handle.attempts == 1
    with pytest.raises(JobCancelled, match="was cancelled: Cancelled: while running"):
        handle.result(0)
    assert not handle.cancel()
    assert not Path(marker + "-child.started").exists()


@pytest.mark.parametrize(("backend", "pool"), CASES)
def test_job_ignoring_the_flag_is_stopped_after_the_grace(app: JobQueue, pool: str,
                                                           tmp_path: Path) -> None:
    @app.job(retries=3, backoff=0.01)
    def stubborn(marker: str) -> None:
        Path(marker).touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # Python bytecode: a thread can be interrupted
            time.sleep(0.01)

    @app.job
    def after(x: int) -> int:
        return x + 1

    marker = tmp_path / "started"
    handle = stubborn.delay(str(marker))
    with app.worker(pool=pool, concurrency=1, cancel_grace=0.3,  # type: ignore[arg-type]
                    cancel_poll=0.05):
        wait_until(marker.exists, timeout=30, message="job started")
        cancelled_at = time.monotonic()
        assert handle.cancel()
        # The only slot is free again: the next job runs well before the stubborn one's end.
        assert after.delay(1).result(timeout=20) == 2
        assert time.monotonic() - cancelled_at < 15
    assert handle.status == "cancelled" and handle.attempts == 1


@pytest.mark.parametrize("found_by", ["canceller", "heartbeat"])
def test_cancel_prefetched_job_never_runs(app: JobQueue, found_by: str) -> None:
    """Whether the canceller or a heartbeat (the cancel took the lease) sees it first."""
    release = threading.Event()
    ran: list[int] = []

    @app.job
    def hold(i: int) -> None:
        ran.append(i)
        release.wait(20)

    first, second = hold.delay(1), hold.delay(2)
    with app.worker(concurrency=1, prefetch=1,
                    cancel_poll=0.05 if found_by == "canceller" else 60) as w:
        wait_until(lambda: second.status == "running" and first.status == "running",
                   message="both reserved (one prefetched)")
        assert second.cancel()
        wait_until(lambda: second.id in w._cancelled, timeout=10,
                   message=f"the {found_by} saw the cancel")
        release.set()
        first.result(timeout=10)
        time.sleep(0.2)  # a slot would run the cancelled job now, if it were to
    assert ran == [1] and second.status == "cancelled"


def test_cancel_racing_the_finish_ends_in_one_state(app: JobQueue) -> None:
    runs: dict[int, int] = {}
    lock = threading.Lock()

    @app.job(retries=3, backoff=0.01)
    def quick(i: int, pause: float) -> int:
        with lock:
            runs[i] = runs.get(i, 0) + 1
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            check_cancelled()
            time.sleep(0.001)
        return i

    rng = random.Random(7)
    handles = [quick.delay(i, rng.uniform(0.02, 0.12)) for i in range(40)]
    answers: dict[int, bool] = {}
    with app.worker(concurrency=4, cancel_grace=0.2, cancel_poll=0.02):
        # Cancel from the moment jobs finish: some cancels come first, some come late.
        wait_until(lambda: any(h.status == "succeeded" for h in handles[:4]), timeout=20,
                   message="the first jobs finished")
        for i, h in enumerate(handles):  # faster than the jobs run: they race near the front
            time.sleep(rng.uniform(0, 0.004))
            answers[i] = h.cancel()
        wait_until(lambda: all(h.done() for h in handles), timeout=20, message="all finished")
        time.sleep(0.2)  # a refused ack must not come back as a retry
    states = {i: h.status for i, h in enumerate(handles)}
    assert set(states.values()) <= {"succeeded", "cancelled"}
    for i, h in enumerate(handles):
        assert (states[i] == "cancelled") == answers[i], (i, states[i], answers[i])
        assert runs.get(i, 0) <= 1 and h.attempts <= 1
        if states[i] == "succeeded":
            assert h.result(0) == i
        else:
            with pytest.raises(JobCancelled):
                h.result(0)
    assert "succeeded" in states.values() and "cancelled" in states.values()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_cli_cancel(broker_url: str) -> None:
    app = JobQueue(broker_url)

    @app.job
    def later() -> None: ...

    handle = later.enqueue(delay=60)
    done = later.enqueue()
    runner = CliRunner()
    out = runner.invoke(main, ["jobs", "cancel", broker_url, handle.id])
    assert out.exit_code == 0 and f"{handle.id}: cancelled" in out.output
    assert handle.status == "cancelled"
    assert app.broker.cancel(done.id)
    out = runner.invoke(main, ["jobs", "cancel", broker_url, done.id, "no-such-id"])
    assert out.exit_code == 1
    assert "not cancelled: it has cancelled already" in out.output
    assert "no-such-id: no such job" in out.output
    app.close()
