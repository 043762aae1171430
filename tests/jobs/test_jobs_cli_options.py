"""``shoal jobs`` options, end to end: ``worker --queues`` and ``--no-schedules`` on real
worker processes, ``purge --older-than``, and arguments a worker process cannot unpickle
(dead-lettered with the reason, and the worker goes on).

The worker processes run ``optapp:app``, a small app written into the test's directory; the
test enqueues through its own `JobQueue` on the same SQLite file, with jobs of the same names.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli import main
from shoal.jobs import JobQueue
from shoal.testing import wait_until

OPTAPP = textwrap.dedent('''
    """A job app for test_jobs_cli_options.py (its worker processes import it)."""
    import os
    import threading

    from shoal.jobs import JobQueue

    app = JobQueue(os.environ["OPTAPP_URL"], lease=5.0)


    @app.job(name="opt.on_a", queue="a", retries=0)
    def on_a(n):
        return ("a", n)


    @app.job(name="opt.on_b", queue="b", retries=0)
    def on_b(n):
        return ("b", n)


    @app.job(name="opt.on_c", queue="c", retries=0)
    def on_c(n):
        return ("c", n)


    @app.job(name="opt.on_default", retries=0)
    def on_default(n):
        return ("default", n)


    @app.job(name="opt.describe", retries=0)
    def describe(x):
        return repr(x)


    @app.job(name="opt.threads", queue="a", retries=0)
    def threads():
        return sorted(t.name for t in threading.enumerate())


    @app.periodic(every=0.2, name="opt.tick", queue="ticks")
    def tick():
        return None
''')

JOB_NAMES = {"opt.on_a": "a", "opt.on_b": "b", "opt.on_c": "c", "opt.on_default": "default",
             "opt.describe": "default", "opt.threads": "a"}  # fmt: skip


def _stub(*args: object) -> None:
    raise AssertionError("runs only on the job worker process")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def producer(url: str, tmp_path: Path) -> Iterator[JobQueue]:
    """The enqueuing side: a `JobQueue` on ``url`` with optapp's job names (stub bodies);
    writes optapp.py beside the database for the worker processes."""
    (tmp_path / "optapp.py").write_text(OPTAPP)
    app = JobQueue(url, lease=5.0)
    for name, queue in JOB_NAMES.items():
        app.job(name=name, queue=queue, retries=0)(_stub)
    try:
        yield app
    finally:
        app.close()


@contextmanager
def job_worker(url: str, directory: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``shoal jobs worker optapp:app ARGS`` process in ``directory``, ready when yielded;
    stopped with SIGTERM (which must exit 0) or killed after a failure."""
    env = dict(os.environ, OPTAPP_URL=url, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "jobs", "worker", "optapp:app", "--log-level",
         "warning", *args], cwd=directory, env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the worker prints "ready" or exits
        assert "ready" in line, f"job worker did not start: {line!r}"
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, ["jobs", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# --------------------------------------------------------------------------- --queues


def test_a_worker_takes_jobs_only_from_its_queues(producer: JobQueue, url: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    jobs = producer.jobs
    # given: jobs on queues c and default first, with the highest priority, then on a and b
    others = [jobs["opt.on_c"].enqueue(args=(i,), priority=100) for i in range(3)]
    others += [jobs["opt.on_default"].enqueue(args=(i,), priority=100) for i in range(3)]
    mine = [jobs["opt.on_a"].delay(i) for i in range(3)] + [jobs["opt.on_b"].delay(i)
                                                          for i in range(3)]  # fmt: skip
    # when: a worker for queues a and b runs
    with job_worker(url, tmp_path, "--queues", "a,b", "--no-schedules"):
        # then: it runs every job of a and b
        results = [h.result(timeout=30) for h in mine]
        assert results == [("a", i) for i in range(3)] + [("b", i) for i in range(3)]
    # and has not touched the others, though they were first in line
    for handle in others:
        assert handle.status == "queued" and handle.attempts == 0
    counts = producer.broker.counts()
    assert counts["a"] == {"succeeded": 3} and counts["b"] == {"succeeded": 3}
    assert counts["c"] == {"queued": 3} and counts["default"] == {"queued": 3}

    # and a worker for queue c (-Q) takes exactly those
    with job_worker(url, tmp_path, "-Q", "c", "--no-schedules"):
        assert [h.result(timeout=30) for h in others[:3]] == [("c", i) for i in range(3)]
    assert producer.broker.counts()["default"] == {"queued": 3}


# ----------------------------------------------------------------------- --no-schedules


def _ticks(app: JobQueue) -> list[str]:
    return [r.id for r in app.broker.list(queue="ticks", limit=1000)]


def test_no_schedules_fires_no_periodic_job(producer: JobQueue, url: str,
                                            tmp_path: Path) -> None:  # fmt: skip
    threads = producer.jobs["opt.threads"]
    # given: an app with a schedule due every 0.2 s (a first-seen slot fires at once)
    # when: its worker runs with --no-schedules
    with job_worker(url, tmp_path, "--queues", "a", "--no-schedules"):
        # then: it runs no schedule loop (its thread lists, from inside a job) ...
        names = threads.delay().result(timeout=30)
        assert "shoal-jobs-fetcher" in names and "shoal-jobs-scheduler" not in names
    # ... and nothing was enqueued or recorded for the schedule
    assert _ticks(producer) == []
    assert producer.broker.schedule_last("opt.tick") is None

    # while the same worker without the flag fires it (the check above could have failed)
    with job_worker(url, tmp_path, "--queues", "a"):
        assert "shoal-jobs-scheduler" in threads.delay().result(timeout=30)
        wait_until(lambda: _ticks(producer), timeout=15, message="a periodic tick enqueued")
    assert producer.broker.schedule_last("opt.tick") is not None


# -------------------------------------------------------------------- purge --older-than


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """``purge`` on both shared brokers (conftest's ``broker_url`` builds the URL)."""
    return str(request.param)


def _backdate(app: JobQueue, job_id: str, seconds: float) -> None:
    """Make a finished job look as if it finished ``seconds`` earlier."""
    broker = app.broker
    record = broker.get(job_id)
    assert record is not None and record.finished
    when = record.finished - seconds
    if app.url.startswith("sqlite"):
        path = app.url[len("sqlite:///"):]
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("UPDATE jobs SET finished = ? WHERE id = ?", (when, job_id))
        finally:
            conn.close()
    else:  # the job's hash, and the index of finished jobs that purge reads
        r, k = broker.redis, broker._k  # type: ignore[attr-defined]
        r.hset(k("job", job_id), "finished", repr(when))
        assert r.zscore(k("finished"), job_id) is not None
        r.zadd(k("finished"), {job_id: when})


def test_purge_older_than_removes_only_older_finished_jobs(broker_url: str) -> None:
    app = JobQueue(broker_url, lease=5.0)

    @app.job(name="purge.ok", retries=0)
    def ok(n: int) -> int:
        return n

    @app.job(name="purge.bad", retries=0)
    def bad() -> None:
        raise OSError("disk on fire")

    try:
        # given: finished jobs, some of them two hours old, and one not run yet
        old_ok, new_ok = ok.delay(1), ok.delay(2)
        old_bad, new_bad = bad.delay(), bad.delay()
        with app.worker(schedules=False):
            finished = (old_ok, new_ok, old_bad, new_bad)
            wait_until(lambda: all(h.done() for h in finished), timeout=20,
                       message="four jobs finished")  # fmt: skip
        waiting = ok.delay(3)
        for handle in (old_ok, old_bad):
            _backdate(app, handle.id, 7200)

        # when: purging jobs finished more than an hour ago
        assert "purged 2 jobs" in invoke("purge", broker_url, "--older-than", "3600", "--yes")

        # then: exactly the two old ones are gone, failed or not
        left = {r.id for r in app.broker.list(limit=100)}
        assert left == {new_ok.id, new_bad.id, waiting.id}
        assert {r.id for r in app.broker.dead(limit=100)} == {new_bad.id}
        assert new_ok.result(timeout=1) == 2
        # and nothing is older than a day
        assert "purged 0 jobs" in invoke("purge", broker_url, "--older-than", "86400", "--yes")
    finally:
        app.close()


# --------------------------------------------------------- arguments a worker cannot read


@contextmanager
def class_only_here() -> Iterator[type]:
    """A class whose module exists only in this process: pickled by reference, so no other
    process can unpickle its instances."""
    module = types.ModuleType("shoal_only_in_the_producer")
    secret = type("Secret", (), {"__module__": module.__name__, "__qualname__": "Secret"})
    module.Secret = secret  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        yield secret
    finally:
        del sys.modules[module.__name__]


def _garble(url: str, job_id: str) -> None:
    """Overwrite a queued job's stored envelope with bytes no worker can decode."""
    conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    try:
        conn.execute("UPDATE jobs SET message = ? WHERE id = ?", (b"\xc1not msgpack", job_id))
    finally:
        conn.close()


def test_arguments_the_worker_cannot_unpickle_dead_letter_and_the_worker_goes_on(
        producer: JobQueue, url: str, tmp_path: Path) -> None:  # fmt: skip
    describe = producer.jobs["opt.describe"]
    # given: a job whose argument's class exists only in this process, a job whose stored
    # message was corrupted, then a good job, all on one queue
    with class_only_here() as Secret:
        unreadable = describe.delay(Secret())
    garbled = describe.delay("fine")
    _garble(url, garbled.id)
    good = describe.delay([1, 2])

    # when: a worker process (one slot) takes them in order
    with job_worker(url, tmp_path, "--no-schedules"):
        # then: the good job runs after the two bad ones
        assert good.result(timeout=30) == "[1, 2]"
        wait_until(lambda: len(producer.broker.dead(limit=10)) == 2, timeout=15,
                   message="two dead letters")  # fmt: skip

    # and each bad one failed for good (no retry) with the reason
    assert unreadable.status == "failed" and unreadable.attempts == 1
    error = unreadable.last_error or ""
    assert error.startswith("UndecodableArguments: cannot unpickle the job's arguments")
    assert "shoal_only_in_the_producer" in error
    assert garbled.status == "failed"
    assert (garbled.last_error or "").startswith("UndecodableMessage")
    dead = invoke("dead", url)
    assert unreadable.id in dead and garbled.id in dead and "UndecodableArguments" in dead
