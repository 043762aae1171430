"""Job workers end to end, on every backend: results, retries, dead letters, time limits,
bad messages, delays, idempotency, cancellation, prefetch and leases."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.jobs import JobCancelled, JobFailed, JobQueue, TimeLimitExceeded
from shoal.testing import wait_until


def test_delay_and_result(app: JobQueue) -> None:
    @app.job
    def add(a: int, b: int = 0) -> int:
        return a + b

    handle = add.delay(2, b=3)
    assert handle.status == "queued" and handle.attempts == 0
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    with app.worker(concurrency=2):
        assert handle.result(timeout=10) == 5
    assert handle.status == "succeeded" and handle.attempts == 1 and handle.last_error is None
    assert app.get(handle.id).result(0) == 5
    assert add(1, 1) == 2  # still callable here


def test_retries_until_success(app: JobQueue) -> None:
    calls: list[int] = []

    @app.job(retries=3, backoff=0.01)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"try {len(calls)}")
        return "ok"

    handle = flaky.delay()
    with app.worker():
        assert handle.result(timeout=10) == "ok"
    assert handle.attempts == 3 and len(calls) == 3
    assert handle.last_error == "ConnectionError: try 2"


def test_last_retry_goes_to_dead_letter_and_back(app: JobQueue) -> None:
    state = {"fail": True}

    @app.job(retries=1, backoff=0.01)
    def fragile(x: int) -> int:
        if state["fail"]:
            raise ValueError(f"bad {x}")
        return x

    handle = fragile.delay(7)
    with app.worker():
        with pytest.raises(ValueError, match="bad 7") as info:
            handle.result(timeout=10)
        assert isinstance(info.value.__cause__, shoal.RemoteTraceback)
        assert "fragile" in info.value.__cause__.tb
        assert handle.status == "failed" and handle.attempts == 2
        [dead] = app.broker.dead()
        assert dead.id == handle.id and dead.last_error == "ValueError: bad 7"
        assert dead.traceback and "raise ValueError" in dead.traceback
        state["fail"] = False
        assert handle.retry()
        assert handle.result(timeout=10) == 7
    assert app.broker.dead() == []


def test_retry_on_limits_what_is_retried(app: JobQueue) -> None:
    @app.job(retries=5, backoff=0.01, retry_on=(ConnectionError,))
    def picky() -> None:
        raise KeyError("no")

    handle = picky.delay()
    with app.worker(), pytest.raises(KeyError):
        handle.result(timeout=10)
    assert handle.attempts == 1


def test_unserializable_argument_fails_at_enqueue(app: JobQueue) -> None:
    @app.job
    def takes(x: object, lock: object = None) -> None: ...

    with pytest.raises(shoal.SerializationError, match="keyword argument 'lock'.*lock"):
        takes.delay(1, lock=threading.Lock())
    with pytest.raises(shoal.SerializationError, match="argument 0"):
        takes.delay(threading.Lock())
    assert app.broker.counts() == {}


def _corrupt(app: JobQueue, job_id: str) -> None:
    """Replace a queued job's stored envelope with bytes no worker can decode."""
    broker = app.broker
    garbage = b"\xc1not msgpack"
    if app.url.startswith("memory"):
        broker._jobs[job_id].message = garbage  # type: ignore[attr-defined]
    elif app.url.startswith("sqlite"):
        broker._conn().execute("UPDATE jobs SET message = ? WHERE id = ?", (garbage, job_id))  # type: ignore[attr-defined]
    else:
        broker.redis.set(broker._k("msg", job_id), garbage)  # type: ignore[attr-defined]


def test_bad_messages_go_to_dead_letter_and_worker_keeps_going(app: JobQueue) -> None:
    @app.job
    def fine() -> str:
        return "fine"

    @app.job(name="will.be.forgotten")
    def forgotten() -> None: ...

    garbled = fine.delay()
    _corrupt(app, garbled.id)
    unknown = forgotten.delay()
    del app.jobs["will.be.forgotten"]  # a worker whose app lacks the job
    after = fine.delay()
    with app.worker():
        assert after.result(timeout=10) == "fine"
        wait_until(lambda: len(app.broker.dead()) == 2, message="two dead letters")
    reasons = {r.id: r.last_error or "" for r in app.broker.dead()}
    assert reasons[garbled.id].startswith("UndecodableMessage")
    assert reasons[unknown.id] == "UnknownJob: this worker's app defines no job named 'will.be.forgotten'"
    with pytest.raises(JobFailed, match="UnknownJob"):
        unknown.result(0)


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_time_limit_stops_the_attempt(app: JobQueue, pool: str, tmp_path: Path) -> None:
    @app.job(retries=1, backoff=0.01, time_limit=0.3)
    def slow(path: str) -> None:
        with open(path, "a") as f:
            f.write("x")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Python bytecode: a thread can be interrupted
            time.sleep(0.01)

    marker = tmp_path / "runs"
    handle = slow.delay(str(marker))
    started = time.monotonic()
    with app.worker(pool=pool), pytest.raises(TimeLimitExceeded):  # type: ignore[arg-type]
        handle.result(timeout=20)
    assert time.monotonic() - started < 10
    assert handle.attempts == 2 and marker.read_text() == "xx"
    assert handle.last_error is not None and "time limit of 0.3s" in handle.last_error


def test_process_pool_runs_module_and_local_jobs(app: JobQueue) -> None:
    import os

    @app.job
    def where(x: int) -> tuple[int, int]:
        return x * 2, os.getpid()

    handles = [where.delay(i) for i in range(6)]
    with app.worker(pool="processes", concurrency=2):
        results = [h.result(timeout=30) for h in handles]
    assert [r[0] for r in results] == [0, 2, 4, 6, 8, 10]
    assert os.getpid() not in {r[1] for r in results}


def test_delay_and_at(app: JobQueue) -> None:
    @app.job
    def stamp() -> float:
        return time.time()

    t0 = time.time()
    later = stamp.enqueue(delay=0.4)
    at = stamp.enqueue(at=t0 + 0.2)
    assert later.status == "scheduled"
    with app.worker():
        assert later.result(timeout=10) >= t0 + 0.4
        assert at.result(timeout=10) >= t0 + 0.2


def test_idempotent_key_runs_once(app: JobQueue) -> None:
    runs: list[str] = []

    @app.job
    def charge(order: str) -> str:
        runs.append(order)
        return order

    first = charge.enqueue(args=("A",), key="charge-A")
    second = charge.enqueue(args=("A",), key="charge-A")
    assert first == second and first.created and not second.created
    with app.worker():
        assert first.result(timeout=10) == "A"
        charge.delay("B").result(timeout=10)
    assert runs == ["A", "B"]


def test_cancel_before_start(app: JobQueue) -> None:
    @app.job
    def never() -> None:
        raise AssertionError("ran")

    handle = never.enqueue(delay=60)
    assert handle.cancel()
    assert not handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(0)


def test_priority_runs_first(app: JobQueue) -> None:
    order: list[str] = []

    @app.job
    def note(x: str) -> None:
        order.append(x)

    for x in ("low1", "low2"):
        note.enqueue(args=(x,), priority=-1)
    note.enqueue(args=("high",), priority=5)
    note.delay("normal")
    with app.worker(prefetch=0):
        wait_until(lambda: len(order) == 4)
    assert order == ["high", "normal", "low1", "low2"]


def test_prefetch_is_bounded(app: JobQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    turns = threading.Semaphore(0)

    @app.job
    def block() -> None:
        turns.acquire(timeout=20)

    for _ in range(10):
        block.delay()
    # every reservation is recorded with how many jobs the worker then held
    held_after: list[int] = []
    reserve = app.broker.reserve

    def recording_reserve(*args: Any, **kwargs: Any) -> Any:
        got = reserve(*args, **kwargs)
        if got:
            held_after.append(running())
        return got

    def running() -> int:
        return int(app.broker.counts().get("default", {}).get("running", 0))

    def succeeded() -> int:
        return int(app.broker.counts().get("default", {}).get("succeeded", 0))

    monkeypatch.setattr(app.broker, "reserve", recording_reserve)
    try:
        with app.worker(concurrency=2, prefetch=1):
            # when the jobs are let finish one at a time
            for done in range(10):
                # (the fetcher refilled up to the bound: it had its chance to take more)
                held = min(3, 10 - done)
                wait_until(lambda n=held: running() == n, message="refilled")
                turns.release()
                wait_until(lambda n=done + 1: succeeded() == n, message=f"{done + 1} done")
    finally:
        for _ in range(10):
            turns.release()
    # then it reserved again after each one, and never held more than concurrency + prefetch
    assert len(held_after) >= 8 and max(held_after) == 3, held_after


def test_long_job_is_not_handed_out_twice(app: JobQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    lease = 0.8
    runs: list[int] = []
    #: (worker name, when) of each reservation attempt
    polls: list[tuple[str, float]] = []
    reserve = app.broker.reserve

    def recording_reserve(queues: Any, worker: str, *args: Any, **kwargs: Any) -> Any:
        polls.append((worker, time.monotonic()))
        return reserve(queues, worker, *args, **kwargs)

    monkeypatch.setattr(app.broker, "reserve", recording_reserve)

    @app.job(retries=3)
    def long() -> int:
        runs.append(1)
        # Run until the lease, had it not been renewed, would have lapsed twice over, and
        # both workers have asked for work since: either could have taken the job then.
        lapsed = time.monotonic() + 2 * lease

        def both_asked_since() -> bool:
            return {w for w, t in list(polls) if t > lapsed} == {"first", "second"}

        wait_until(both_asked_since, timeout=20, message="both workers asked after the lapse")
        return len(runs)

    handle = long.delay()
    with app.worker(lease=lease, name="first"), app.worker(lease=lease, name="second"):
        assert handle.result(timeout=30) == 1
    assert runs == [1] and handle.attempts == 1


def test_dead_workers_job_runs_again_after_its_lease(app: JobQueue) -> None:
    @app.job(retries=2)
    def work() -> str:
        return "done"

    handle = work.delay()
    # A worker that reserves the job and dies at once: it never renews nor acks.
    [d] = app.broker.reserve(["default"], "crashed", 0.5, 1)
    assert d.id == handle.id
    with app.worker():
        assert handle.result(timeout=15) == "done"
    assert handle.attempts == 2
    assert "WorkerLost" in (handle.last_error or "") and "crashed" in (handle.last_error or "")


def test_stop_hands_back_unfinished_jobs(app: JobQueue) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.job
    def stuck() -> None:
        started.set()
        release.wait(20)

    @app.job
    def other() -> None: ...

    handle = stuck.delay()
    waiting = [other.delay() for _ in range(3)]
    worker = app.worker(concurrency=1, prefetch=3).start()
    try:
        assert started.wait(10)
        t0 = time.monotonic()
        worker.stop(grace=0.3)
        assert time.monotonic() - t0 < 0.3 + 10  # after the grace, not the stuck job's 20 s
        assert handle.status == "queued" and handle.attempts == 0
        assert all(h.status == "queued" for h in waiting)
    finally:
        release.set()


def test_a_time_limit_in_a_thread_leaves_the_interpreter_sound(app: JobQueue) -> None:
    """Stopping an attempt raises into its thread; withdrawing an exception raised that way
    left CPython's eval breaker set, after which line tracing (debuggers, coverage) looped
    forever on one line."""

    @app.job(retries=0, time_limit=0.2)
    def spin() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)

    @app.job(time_limit=5)
    def quick() -> int:
        return 1

    handle, fast = spin.delay(), quick.delay()
    with app.worker(pool="threads"):  # type: ignore[arg-type]
        with pytest.raises(TimeLimitExceeded):
            handle.result(timeout=20)
        assert fast.result(timeout=20) == 1  # disarmed without firing

    lines = 0

    def count_lines(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines > 100_000:
                raise RuntimeError("line tracing loops on one line")
        return count_lines

    def work() -> int:
        return sum(i for i in range(1000))

    sys.settrace(count_lines)
    try:
        work()
    finally:
        sys.settrace(None)
    assert lines < 10_000
