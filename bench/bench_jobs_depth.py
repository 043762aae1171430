"""The job queue at depth: a million jobs queued on Redis and on SQLite.

    .venv/bin/python bench/bench_jobs_depth.py [--jobs 1000000] [--backends redis,sqlite]
                                               [--window 10000] [--markdown]

For each backend, on an empty broker of its own (Redis: a ``redis-server`` on a free loopback
port, no persistence, in a temporary directory; SQLite: a file in a temporary directory,
WAL, ``synchronous=NORMAL``):

1. fill: N trivial jobs (``bench.trivial(i)``) with ``enqueue_many``, one call per window
   of ``--window`` jobs (SQLite: one transaction each; Redis: one script call per 1,000);
   the rate of each window, counting the broker call only (``prepare`` builds the envelopes
   before: it is the producer's cost, the same at any depth, and reported apart);
2. at depth N: broker memory per job (Redis ``INFO used_memory``, less the empty server's)
   and disk per job (SQLite file plus WAL), and ``shoal jobs status`` wall time (a fresh
   process: median of 3 with bytecode cached, and the first run that compiles shoal from
   source) and ``Broker.counts()`` time in this process;
3. reserve and ack as a worker does (``reserve(limit=10)``, then ``ack`` each) for three
   windows at depth N;
4. drain: ``reserve(limit=1000)`` windows (leases of an hour, not acked: they stay
   ``running``) until 90% of the jobs are taken, timing each window;
5. reserve and ack as in 3, with 90% of the jobs taken.

Rates are medians of several windows (the machine's load moves single ones). Per-job cost
is flat if the rates near the start and near 90% agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: windows whose median is reported at each point (one window moves with the machine's load)
SPAN = 5
#: windows of worker-like reserve + ack at each point
WORKER_WINDOWS = 3
RESULT = b"\x80\x05K\x01."  # pickle of 1


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _status_wall(url: str, pycache: str) -> tuple[float, float]:
    """Wall time of ``shoal jobs status URL`` in a new process: (median of 3 with shoal's
    bytecode cached, as an installed package has it; the first run, compiling from source,
    as in a checkout run with PYTHONDONTWRITEBYTECODE). The cache goes to ``pycache``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    times = []
    for _ in range(4):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "status",
                        url], check=True, stdout=subprocess.DEVNULL, timeout=120, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), times[0]


def _worker_window(broker: Any, n: int) -> tuple[float, float]:
    """Reserve (10 at a time) and ack ``n`` jobs; (reserve jobs/s, reserve+ack jobs/s)."""
    done, t_reserve = 0, 0.0
    t0 = time.perf_counter()
    while done < n:
        a = time.perf_counter()
        got = broker.reserve(["default"], "bench-worker", 3600.0, min(10, n - done))
        t_reserve += time.perf_counter() - a
        if not got:
            raise RuntimeError(f"queue ran dry after {done} of {n}")
        for d in got:
            broker.ack(d.id, d.token, RESULT)
        done += len(got)
    return _rate(n, t_reserve), _rate(n, time.perf_counter() - t0)


def _worker_windows(broker: Any, n: int) -> tuple[float, float]:
    runs = [_worker_window(broker, n) for _ in range(WORKER_WINDOWS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def run(backend: str, n: int, window: int, log: Callable[[str], None]) -> dict[str, Any]:
    from shoal.jobs import JobQueue
    from shoal.jobs.testing import _free_port, redis_ping

    tmp = tempfile.mkdtemp(prefix=f"shoal-depth-{backend}-")
    server: subprocess.Popen[bytes] | None = None
    try:
        if backend == "redis":
            port = _free_port()
            server = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no",
                 "--save", "", "--dir", tmp, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 20
            while not redis_ping(url, 0.5):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            url += "?prefix=depth"
        else:
            url = f"sqlite:///{tmp}/jobs.db"
        app = JobQueue(url)

        @app.job(retries=0, name="bench.trivial")
        def trivial(i: int) -> int:
            return i

        broker = app.broker
        out: dict[str, Any] = {"backend": backend, "jobs": n, "window": window}
        if backend == "redis":
            rds = broker.redis  # type: ignore[attr-defined]
            base_memory = int(rds.info("memory")["used_memory"])

        # 1. fill
        rates, prepare_s, t_fill = [], 0.0, time.perf_counter()
        for start in range(0, n, window):
            k = min(window, n - start)
            a = time.perf_counter()
            messages = [trivial.prepare((i,)) for i in range(start, start + k)]
            b = time.perf_counter()
            app.enqueue_many(messages)
            rates.append(_rate(k, time.perf_counter() - b))
            prepare_s += b - a
            if len(rates) % 10 == 0:
                log(f"{backend}: {start + k:,} queued, last window {rates[-1]:,.0f} jobs/s")
        out["fill_s"] = time.perf_counter() - t_fill
        out["enqueue_rates"] = rates
        out["prepare_rate"] = _rate(n, prepare_s)
        at90 = min(len(rates) - SPAN, int(0.9 * n) // window)
        out["enqueue_first"] = statistics.median(rates[:SPAN])
        out["enqueue_90"] = statistics.median(rates[at90:at90 + SPAN])
        out["enqueue_mean"] = _rate(n, sum(window / r for r in rates))

        # 2. footprint and status at depth
        if backend == "redis":
            out["bytes_per_job"] = (int(rds.info("memory")["used_memory"]) - base_memory) / n
        else:
            files = [Path(f"{tmp}/jobs.db{suffix}") for suffix in ("", "-wal")]
            out["bytes_per_job"] = sum(f.stat().st_size for f in files if f.exists()) / n
        t = time.perf_counter()
        counts = broker.counts()
        out["counts_ms"] = (time.perf_counter() - t) * 1e3
        assert counts == {"default": {"queued": n}}, counts
        out["status_s"], out["status_cold_s"] = _status_wall(url, f"{tmp}/pycache")
        log(f"{backend}: {out['bytes_per_job']:,.0f} bytes/job, status {out['status_s']:.3f} s")

        # 3. worker-like reserve + ack at full depth
        out["reserve_first"], out["worker_first"] = _worker_windows(broker, window)

        # 4. drain to 90% taken with bulk reserves
        taken, drain = WORKER_WINDOWS * window, []
        target = int(0.9 * n)
        while taken < target:
            k = min(window, target - taken)
            a = time.perf_counter()
            got = 0
            while got < k:
                got += len(broker.reserve(["default"], "bench-drain", 3600.0, min(1000, k - got)))
            drain.append(_rate(k, time.perf_counter() - a))
            taken += k
            if len(drain) % 10 == 0:
                log(f"{backend}: {taken:,} taken, last window {drain[-1]:,.0f} jobs/s")
        out["drain_rates"] = drain
        out["drain_first"] = statistics.median(drain[:SPAN])
        out["drain_last"] = statistics.median(drain[-SPAN:])

        # 5. worker-like reserve + ack with 90% taken
        out["reserve_90"], out["worker_90"] = _worker_windows(broker, window)
        out["status_90_s"], _ = _status_wall(url, f"{tmp}/pycache")
        app.close()
        return out
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[dict[str, Any]]) -> None:
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(f"- {r['backend']}: {r['jobs']:,} jobs queued in {r['fill_s']:.1f} s; "
              f"envelopes built (prepare) at {r['prepare_rate']:,.0f}/s")
    w = rows[0]["window"]
    lines = ["| measurement | unit | " + " | ".join(r["backend"] for r in rows) + " |",
             "|---|---|" + "---|" * len(rows)]

    def row(label: str, unit: str, key: str, fmt: str = "{:,.0f}") -> None:
        lines.append(f"| {label} | {unit} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |")

    n = rows[0]["jobs"]
    row(f"enqueue_many, windows of {w:,} from empty (median of {SPAN})", "jobs/s", "enqueue_first")
    row(f"enqueue_many, windows of {w:,} from {int(0.9 * n):,} queued (median of {SPAN})", "jobs/s",
        "enqueue_90")
    row(f"enqueue_many, all {n:,}", "jobs/s", "enqueue_mean")
    row("broker memory (Redis) / disk (SQLite) at depth", "bytes/job", "bytes_per_job")
    row(f"`shoal jobs status` with {n:,} queued (new process, bytecode cached)", "s", "status_s",
        "{:.3f}")
    row("the same, first run compiling shoal from source", "s", "status_cold_s", "{:.3f}")
    row("`Broker.counts()` in process", "ms", "counts_ms", "{:.2f}")
    k = f"median of {WORKER_WINDOWS} windows of {w:,}"
    row(f"reserve(10) + ack at full depth, {k}: reserve alone", "jobs/s", "reserve_first")
    row(f"reserve(10) + ack at full depth, {k}: both", "jobs/s", "worker_first")
    row(f"reserve(1000), first windows of the drain (median of {SPAN})", "jobs/s", "drain_first")
    row(f"reserve(1000), last windows before 90% taken (median of {SPAN})", "jobs/s", "drain_last")
    row(f"reserve(10) + ack with 90% taken, {k}: reserve alone", "jobs/s", "reserve_90")
    row(f"reserve(10) + ack with 90% taken, {k}: both", "jobs/s", "worker_90")
    row("`shoal jobs status` with 90% taken (new process)", "s", "status_90_s", "{:.3f}")
    print()
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--backends", default="redis,sqlite")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if "redis" in backends and not shutil.which("redis-server"):
        sys.exit("redis-server is not installed")

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    rows = [run(b, args.jobs, args.window, log) for b in backends]
    report(rows)


if __name__ == "__main__":
    main()
