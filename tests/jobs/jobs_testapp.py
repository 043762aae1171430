"""A job app for tests that run job workers as processes (``shoal jobs worker
jobs_testapp:app``). Its broker URL and lease come from the environment."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from shoal.jobs import JobQueue

app = JobQueue(os.environ.get("SHOAL_JOBS_TEST_URL", "memory://"),
               lease=float(os.environ.get("SHOAL_JOBS_TEST_LEASE", "2")))


@app.job(retries=0)
def add(a: int, b: int) -> int:
    return a + b


@app.job(retries=0)
def sleep_then_mark(seconds: float, marker: str) -> str:
    """Touch ``marker + '.started'``, sleep, then touch ``marker``."""
    Path(marker + ".started").touch()
    time.sleep(seconds)
    Path(marker).touch()
    return marker


@app.job(retries=20, backoff=0.05, backoff_max=0.2)
def record(db: str, n: int, pause: float = 0.0) -> int:
    """Insert ``n`` into table ``runs`` of SQLite file ``db`` (one row per execution)."""
    if pause:
        time.sleep(pause)
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        conn.execute("INSERT INTO runs (job, pid) VALUES (?, ?)", (n, os.getpid()))
    finally:
        conn.close()
    return n


@app.job
def noop() -> None:
    return None


@app.job(retries=0)
def cluster_sum(n: int) -> int:
    """Submit work to the shoal cluster the job worker was started with (--scheduler)."""
    import shoal

    return int(shoal.get_client().submit(sum, range(n), pure=False).result(timeout=30))


@app.job(retries=0, rate_limit="10/s")
def rate_limited(db: str, n: int) -> None:
    """Insert ``(n, start time)`` into table ``starts`` of SQLite file ``db``; at most 10
    start per second across every worker."""
    started = time.time()
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        conn.execute("INSERT INTO starts (job, at) VALUES (?, ?)", (n, started))
    finally:
        conn.close()


def enqueue_with_keys(start_at: float, keys: list[tuple[str, str]], n: int) -> None:
    """Wait until ``start_at`` (epoch seconds), then enqueue ``n`` jobs under each
    ``(key, key_until)``, printing ``key id created`` for each (for tests racing producers
    in several processes)."""
    time.sleep(max(0.0, start_at - time.time()))
    for i in range(n):
        for key, until in keys:
            h = add.enqueue(args=(i, 0), key=key, key_until=until)  # type: ignore[arg-type]
            print(key, h.id, int(h.created), flush=True)


_hoard: list[bytes] = []


@app.job(retries=0)
def leak(mb: int) -> tuple[int, int]:
    """Keep ``mb`` more MiB for good in this process (a leaky job); (pid, MiB kept)."""
    _hoard.append(b"x" * (mb << 20))
    return os.getpid(), sum(map(len, _hoard)) >> 20


@app.job(retries=0)
def hold_until(path: str, started: str) -> int:
    """Touch ``started``, then wait (up to 60 s) until ``path`` exists; return this pid."""
    Path(started).touch()
    deadline = time.monotonic() + 60
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()
