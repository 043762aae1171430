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
