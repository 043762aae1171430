"""Result lifetimes, idempotency keys raced by several producer processes, and rate and
concurrency limits held across several worker processes, end to end."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from shoal.jobs import JobQueue, ResultExpired
from shoal.testing import wait_until
from test_jobs_cli import _env, job_worker  # worker processes on the test app

HERE = Path(__file__).resolve().parent
SHARED = ["sqlite", "redis"]  # brokers several processes can share


def test_result_expires_after_its_ttl(app: JobQueue) -> None:
    app.result_ttl = 0.5

    @app.job
    def short() -> int:
        return 1

    @app.job(result_ttl=60)
    def kept() -> int:
        return 2

    a, b = short.delay(), kept.delay()
    c = short.enqueue(result_ttl=None)  # None: the job's default, here the app's
    with app.worker(concurrency=2):
        assert a.result(timeout=10) == 1 and b.result(timeout=10) == 2 and c.result(timeout=10) == 1
    assert a.record.result_ttl == 0.5 and b.record.result_ttl == 60
    def expired(job_id: str) -> bool:
        record = app.broker.get(job_id)
        return record is None or record.expired(app.broker.clock())

    wait_until(lambda: expired(a.id) and expired(c.id), timeout=10, message="the results expired")
    with pytest.raises(ResultExpired, match=f"job {a.id}"):
        a.result(0)
    assert b.result(0) == 2
    assert {r.id for r in app.broker.list()} == {b.id}


def test_expired_job_is_deleted_without_a_worker(app: JobQueue) -> None:
    @app.job(result_ttl=0.2)
    def once() -> None: ...

    handle = once.delay()
    with app.worker():
        handle.result(timeout=10)
    time.sleep(0.3)  # the TTL passes; then any producer's call deletes it
    for _ in range(2):
        once.enqueue(delay=60)
        if app.broker.get(handle.id) is None:
            break
        time.sleep(1.0)  # memory:// sweeps at most once a second
    assert app.broker.get(handle.id) is None
    with pytest.raises(ResultExpired, match="not in the broker: its result_ttl passed"):
        handle.result(0)


@pytest.mark.parametrize("backend", SHARED)
def test_keys_raced_by_producer_processes(broker_url: str) -> None:
    """Four processes enqueue under the same keys at the same moment: one job per key, for
    each lifetime (no worker runs, so every job stays queued and every key holds)."""
    keys = [("k-forever", "forever"), ("k-start", "start"), ("k-finish", "finish")]
    start_at = time.time() + 1.5
    code = ("import sys, json; from jobs_testapp import enqueue_with_keys; "
            "enqueue_with_keys(float(sys.argv[1]), json.loads(sys.argv[2]), 5)")
    procs = [subprocess.Popen([sys.executable, "-c", code, repr(start_at), json.dumps(keys)],
                              stdout=subprocess.PIPE, text=True, env=_env(broker_url))
             for _ in range(4)]
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        outputs += [line.split() for line in out.splitlines()]
    assert len(outputs) == 4 * 5 * len(keys)
    for key, _ in keys:
        mine = [(job_id, int(created)) for k, job_id, created in outputs if k == key]
        assert len({job_id for job_id, _ in mine}) == 1, key
        assert sum(created for _, created in mine) == 1, key
    app = JobQueue(broker_url)
    try:
        assert app.broker.counts() == {"default": {"queued": len(keys)}}
    finally:
        app.close()


def test_max_concurrency_holds_across_workers(app: JobQueue) -> None:
    lock = threading.Lock()
    now = {"running": 0, "most": 0}

    @app.job(max_concurrency=2)
    def crowded(i: int) -> int:
        with lock:
            now["running"] += 1
            now["most"] = max(now["most"], now["running"])
        time.sleep(0.1)
        with lock:
            now["running"] -= 1
        return i

    handles = [crowded.delay(i) for i in range(8)]
    with app.worker(concurrency=3), app.worker(concurrency=3):
        assert [h.result(timeout=30) for h in handles] == list(range(8))
    assert now["most"] == 2
    assert all(h.attempts == 1 and h.last_error is None for h in handles)


def test_limit_key_limits_per_value(app: JobQueue) -> None:
    starts: dict[str, list[float]] = {"ada": [], "bob": []}

    @app.job(rate_limit="2/s", limit_key=lambda user, i: user)
    def per_user(user: str, i: int) -> None:
        starts[user].append(time.monotonic())

    handles = [per_user.delay(u, i) for i in range(3) for u in ("ada", "bob")]
    with app.worker(concurrency=4):
        for h in handles:
            h.result(timeout=30)
    for user, times in starts.items():
        times.sort()
        assert all(b - a >= 0.4 for a, b in zip(times, times[1:])), (user, times)
    # The two users did not wait for each other: their first jobs started together.
    assert abs(starts["ada"][0] - starts["bob"][0]) < 0.4


def _rate_limit_run(url: str, tmp_path: Path, seconds: float) -> None:
    """10/s for ``seconds`` seconds with four worker processes: count starts per second."""
    sys.path.insert(0, str(HERE))
    import jobs_testapp

    db = str(tmp_path / "starts.db")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE starts (job INTEGER, at REAL)")
    conn.close()
    n = int(seconds * 10)
    app = jobs_testapp.app
    old = app._broker, app.url
    app._broker, app.url = None, url
    try:
        # A long lease: on a loaded machine a 1 s lease can lapse between heartbeats.
        with ExitStack() as workers:
            for _ in range(4):
                workers.enter_context(job_worker(url, "--concurrency", "2", "--prefetch", "0",
                                                 lease=10.0))
            handles = jobs_testapp.rate_limited.enqueue_many([(db, i) for i in range(n)])
            for h in handles:
                h.result(timeout=seconds * 3 + 30)
            # When the broker handed each out (what it limits): with --prefetch 0, when a
            # slot began it, give or take the worker's own latency (the job's clock below).
            handed_out = sorted(h.record.started or 0.0 for h in handles)
    finally:
        app.close()
        app._broker, app.url = old
        sys.path.remove(str(HERE))
    conn = sqlite3.connect(db)
    ran_at = sorted(t for (t,) in conn.execute("SELECT at FROM starts"))
    conn.close()
    assert len(ran_at) == n and len(handed_out) == n
    times = handed_out
    per_second = Counter(int(t - times[0]) for t in times)
    ran_per_second = Counter(int(t - ran_at[0]) for t in ran_at)
    assert max(per_second.values()) <= 10, (sorted(per_second.items()),
                                            sorted(ran_per_second.items()))
    span = times[-1] - times[0]
    assert span >= (n - 1) * 0.1 * 0.95  # never faster than the limit ...
    assert span <= (n - 1) * 0.1 * 1.5 + 2  # ... and not much slower


@pytest.mark.parametrize("backend", SHARED)
def test_rate_limit_holds_across_worker_processes(broker_url: str, tmp_path: Path) -> None:
    _rate_limit_run(broker_url, tmp_path, 3.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", SHARED)
def test_rate_limit_holds_for_30_seconds(broker_url: str, tmp_path: Path) -> None:
    _rate_limit_run(broker_url, tmp_path, 30.0)
