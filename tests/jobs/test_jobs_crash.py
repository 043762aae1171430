"""Proof that nothing is lost: 10,000 jobs, job workers SIGKILLed 20 times at random
moments and restarted (and, on Redis, the server restarted once mid-run). Every job's
effect is there, and executions beyond 10,000 are no more than the jobs that were running
in the workers when they were killed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shoal.jobs import JobQueue
from shoal.jobs.testing import RedisServer

HERE = Path(__file__).resolve().parent
N_JOBS = 10_000
N_KILLS = 20
#: (pool, concurrency) of the two job worker processes
WORKERS = [("threads", 4), ("processes", 2)]


@pytest.fixture
def redis_server(require: Callable[[object, str], None]) -> Iterator[RedisServer]:
    require(shutil.which("redis-server"), "redis-server is not installed")
    with RedisServer() as server:
        yield server


def _spawn(url: str, pool: str, concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SHOAL_JOBS_TEST_URL=url, SHOAL_JOBS_TEST_LEASE="1.5",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "worker",
             "jobs_testapp:app", "--pool", pool, "--concurrency", str(concurrency),
             "--log-level", "error", "--grace", "2"],
            stdout=subprocess.DEVNULL, stderr=out, env=env, start_new_session=True)


def _chaos(url: str, tmp_path: Path, redis_server: RedisServer | None) -> None:
    effects = tmp_path / "effects.db"
    with sqlite3.connect(effects) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE runs (job INTEGER NOT NULL, pid INTEGER NOT NULL)")
    app = JobQueue(url, lease=1.5)
    sys.path.insert(0, str(HERE))
    try:
        import jobs_testapp

        record = jobs_testapp.record
        app.jobs[record.name] = record
        rng = random.Random(1234)
        t0 = time.monotonic()
        # Enqueue through this app (the module's own app points elsewhere).
        from shoal.jobs.definition import JobFunction

        job = JobFunction(app, record.fn, record.options)
        for n in range(N_JOBS):
            job.enqueue(args=(str(effects), n, 0.002 if n % 3 == 0 else 0.0))
        enqueued = time.monotonic() - t0
        log = tmp_path / "workers.log"
        procs = [_spawn(url, pool, c, log) for pool, c in WORKERS]
        bound = 0
        kills = 0
        try:
            deadline = time.monotonic() + 150
            while kills < N_KILLS:
                time.sleep(rng.uniform(0.2, 0.7))
                i = rng.randrange(len(procs))
                os.killpg(procs[i].pid, signal.SIGKILL)
                procs[i].wait()
                bound += WORKERS[i][1]  # at most `concurrency` attempts were running there
                kills += 1
                if redis_server is not None and kills == N_KILLS // 2:
                    redis_server.restart()
                procs[i] = _spawn(url, *WORKERS[i], log)
                assert time.monotonic() < deadline
            while app.broker.counts().get("default", {}).get("succeeded", 0) < N_JOBS:
                assert time.monotonic() < deadline, f"not done: {app.broker.counts()}"
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        elapsed = time.monotonic() - t0
        with sqlite3.connect(effects) as db:
            total = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            distinct = db.execute("SELECT COUNT(DISTINCT job) FROM runs").fetchone()[0]
            lo, hi = db.execute("SELECT MIN(job), MAX(job) FROM runs").fetchone()
        extra = total - N_JOBS
        print(f"\n{url.split(':')[0]}: {N_JOBS} jobs, {kills} kills, enqueue {enqueued:.1f}s, "
              f"total {elapsed:.1f}s; executions {total} ({extra} extra, bound {bound}); "
              f"dead {len(app.broker.dead())}")
        assert (distinct, lo, hi) == (N_JOBS, 0, N_JOBS - 1), "some job's effect is missing"
        assert 0 <= extra <= bound
        assert app.broker.dead() == []
    finally:
        sys.path.remove(str(HERE))
        app.close()


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_crash_sqlite(tmp_path: Path) -> None:
    _chaos(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path, None)


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_crash_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    _chaos(redis_server.url, tmp_path, redis_server)
