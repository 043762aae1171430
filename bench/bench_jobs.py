"""Benchmark shoal.jobs on Redis, and Celery on the same Redis when it is installed.

    .venv/bin/python bench/bench_jobs.py [--jobs 10000] [--markdown] [--secret]

Starts its own redis-server (append-only file on, as the jobs are meant to be durable) on a
free loopback port in a temporary directory, and for each system:

- throughput: N trivial jobs enqueued one by one, then waited for; jobs/s from the first
  enqueue to the last job done, with 2 worker processes already running and idle; for shoal
  also with the N enqueued by one ``enqueue_many`` call, and by ``delay()`` inside
  ``with app.batch():`` (sent 500 at a time), both compared with Celery's ``delay()``;
- enqueue latency: median time of one ``delay()`` call (over the N calls above);
- round trip: median of ``delay(i)`` then waiting for its result, one at a time, idle.

``--limits``: the cost of rate and concurrency limits (issue #17): the worker CPU per job and
the throughput of the same trivial job without limits and with limits that never bind
(``max_concurrency=1000``: every reserve checks and counts it; a rate limit is not used
here, as it spaces starts strictly, at most one per reserve call and limit key, so it binds
at any rate),
in alternating rounds on the same workers, and the CPU of a whole job on ``memory://``
likewise. Whether the code for limits costs jobs that do not use them is measured by
running this benchmark on the commit before limits and on this one, back to back.

``--secret``: also the cost of signed payloads (``JobQueue(secret=...)``): the time to sign
and check one payload; the CPU of a whole job (delay, run, result) in one process on
``memory://`` without and with a secret; and shoal's rows run again with a secret on the
producer and both workers (before the unsigned run), with CPU per job.

Each job increments one Redis counter (the same for both), which is also how the driver
sees that all N are done. shoal: two ``shoal jobs worker bench_jobs:app --concurrency 1``
processes. Celery: ``celery -A bench_jobs:celery_app worker --concurrency 2`` (prefork: two
worker processes), its defaults otherwise (early acks, prefetch multiplier 4). Celery is a
benchmark-only install (``pip install celery``), never a dependency of shoal.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as redis_lib

from shoal.jobs import JobQueue
from shoal.jobs.signing import ENV_VAR, Signer, args_context

HERE = Path(__file__).resolve().parent
URL = os.environ.get("SHOAL_BENCH_REDIS", "redis://127.0.0.1:6379/0")
COUNTER = "bench:done"

app = JobQueue(URL + "?prefix=bench")
_redis: Any = None


def _counter() -> Any:
    global _redis
    if _redis is None:
        _redis = redis_lib.Redis.from_url(URL)
    return _redis


@app.job(retries=0, name="bench.trivial")  # explicit: the driver runs as __main__
def trivial(i: int) -> int:
    _counter().incr(COUNTER)
    return i


@app.job(retries=0, name="bench.trivial_limited", max_concurrency=1000)
def trivial_limited(i: int) -> int:
    _counter().incr(COUNTER)
    return i


@app.job(retries=0, name="bench.echo")
def echo(i: int) -> int:
    return i


try:
    from celery import Celery

    celery_app: Any = Celery("bench_jobs", broker=URL, backend=URL)
    celery_app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                           task_ignore_result=True)

    @celery_app.task(name="ctrivial", ignore_result=True)
    def ctrivial(i: int) -> int:
        _counter().incr(COUNTER)
        return i

    @celery_app.task(name="cecho", ignore_result=False)
    def cecho(i: int) -> int:
        return i
except ImportError:  # pragma: no cover - celery is optional
    celery_app = None


# ------------------------------------------------------------------ driver


def _wait_count(r: Any, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(r.get(COUNTER) or 0) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {r.get(COUNTER)} of {n} jobs done after {timeout}s")
        time.sleep(0.002)


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _timed_enqueues(delay: Callable[[int], Any], n: int) -> list[float]:
    latencies = []
    for i in range(n):
        a = time.perf_counter()
        delay(i)
        latencies.append(time.perf_counter() - a)
    return latencies


def throughput(enqueue_all: Callable[[int], Any], n: int, r: Any) -> dict[str, Any]:
    """Jobs/s from the first enqueue to the N-th job done; how long enqueueing took, and
    the producer's CPU seconds for it."""
    r.set(COUNTER, 0)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = enqueue_all(n)
    t_enq = time.perf_counter() - t0
    cpu_enq = time.process_time() - c0
    _wait_count(r, n, 300)
    elapsed = time.perf_counter() - t0
    return {"jobs_s": n / elapsed, "elapsed": elapsed, "enqueue_s": t_enq, "out": out,
            "enqueue_cpu": cpu_enq}


def _cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU seconds of the worker processes and their children so far."""
    import psutil

    total = 0.0
    for p in procs:
        root = psutil.Process(p.pid)
        for proc in [root, *root.children(recursive=True)]:
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def measure(name: str, delay: Callable[[int], Any], round_trip: Callable[[int], Any],
            n: int, r: Any, batched: dict[str, Callable[[int], Any]] | None = None,
            workers_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    # warm-up: both workers have imported everything and run a job
    r.set(COUNTER, 0)
    for i in range(50):
        delay(i)
    _wait_count(r, 50, 60)
    cpu0 = workers_cpu() if workers_cpu is not None else 0.0
    one = throughput(lambda k: _timed_enqueues(delay, k), n, r)
    row = {"name": name, "jobs_s": one["jobs_s"], "elapsed": one["elapsed"],
           "enqueue_s": one["enqueue_s"], "enqueue_ms": statistics.median(one["out"]) * 1e3,
           "enqueue_cpu_us": one["enqueue_cpu"] / n * 1e6}
    if workers_cpu is not None:
        # the worker processes' CPU per job over the one-by-one run: steadier than
        # wall-clock rates on a shared machine
        row["worker_cpu_us"] = (workers_cpu() - cpu0) / n * 1e6
    for label, enqueue_all in (batched or {}).items():
        got = throughput(enqueue_all, n, r)
        row[f"{label}_jobs_s"] = got["jobs_s"]
        row[f"{label}_elapsed"] = got["elapsed"]
        row[f"{label}_enqueue_s"] = got["enqueue_s"]
    trips = []
    for i in range(200):
        a = time.perf_counter()
        round_trip(i)
        trips.append(time.perf_counter() - a)
    row["round_trip_ms"] = statistics.median(trips) * 1e3
    return row


def _pipelined(n: int) -> None:
    with app.batch(size=500):
        for i in range(n):
            trivial.delay(i)


def _enqueue_many(n: int) -> None:
    trivial.enqueue_many([(i,) for i in range(n)])


def run_shoal(n: int, env: dict[str, str], r: Any, secret: str | None = None) -> dict[str, Any]:
    """shoal's rows; with ``secret``, the producer and both workers sign and check."""
    cmd = [sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "worker",
           "bench_jobs:app", "--concurrency", "1", "--log-level", "error"]
    env = {k: v for k, v in env.items() if k != ENV_VAR}
    if secret is not None:
        env[ENV_VAR] = secret
    app.signer = None if secret is None else Signer([secret])
    procs = [_spawn(cmd, env) for _ in range(2)]
    try:
        return measure("shoal.jobs" + (" signed" if secret else ""), lambda i: trivial.delay(i),
                       lambda i: echo.delay(i).result(timeout=30), n, r,
                       {"many": _enqueue_many, "batch": _pipelined}, lambda: _cpu_seconds(procs))
    finally:
        _stop(procs)
        app.broker.purge(pending=True)
        app.signer = None


def run_limits(n: int, env: dict[str, str], r: Any, rounds: int = 3) -> None:
    """Unlimited and loosely limited trivial jobs, alternating, on the same two workers."""
    cmd = [sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "worker",
           "bench_jobs:app", "--concurrency", "1", "--log-level", "error"]
    procs = [_spawn(cmd, env) for _ in range(2)]
    results: dict[str, list[tuple[float, float]]] = {"unlimited": [], "limited": []}
    try:
        r.set(COUNTER, 0)
        for i in range(50):
            trivial.delay(i)
        _wait_count(r, 50, 60)
        for _ in range(rounds):
            for label, job in (("unlimited", trivial), ("limited", trivial_limited)):
                cpu0 = _cpu_seconds(procs)
                def enqueue_all(k: int, job: Any = job) -> Any:
                    return job.enqueue_many([(i,) for i in range(k)])

                got = throughput(enqueue_all, n, r)
                results[label].append((got["jobs_s"], (_cpu_seconds(procs) - cpu0) / n * 1e6))
    finally:
        _stop(procs)
        app.broker.purge(pending=True)
    costs = job_path_limits()
    print(f"\nLimits: {n:,} trivial jobs by enqueue_many, 2 worker processes, {rounds} "
          "alternating rounds (best of each):\n")
    print("| measurement | unit | no limits | max_concurrency=1000 (never binding) | "
          "ratio |\n|---|---|---|---|---|")
    best = {k: (max(j for j, _ in v), min(c for _, c in v)) for k, v in results.items()}
    print(f"| enqueue to done | jobs/s | {best['unlimited'][0]:,.0f} | {best['limited'][0]:,.0f} | "
          f"{best['limited'][0] / best['unlimited'][0]:.2f}x |")
    print(f"| worker CPU per job | us | {best['unlimited'][1]:,.1f} | {best['limited'][1]:,.1f} | "
          f"{best['limited'][1] / best['unlimited'][1]:.2f}x |")
    print(f"| a whole job on memory:// (delay, run, result), CPU | us | {costs[0]:,.1f} | "
          f"{costs[1]:,.1f} | {costs[1] / costs[0]:.2f}x |")
    for label, runs in results.items():
        print(f"- {label}: " + ", ".join(f"{j:,.0f} jobs/s ({c:,.0f} us CPU/job)" for j, c in runs))


def job_path_limits(n: int = 2_000, rounds: int = 3) -> tuple[float, float]:
    """CPU microseconds per job on ``memory://`` without and with (loose) limits, best of
    ``rounds`` alternating runs."""
    costs: dict[bool, list[float]] = {False: [], True: []}
    logging.getLogger("shoal.jobs.worker").setLevel(logging.ERROR)
    for _ in range(rounds):
        for limited in (False, True):
            local = JobQueue("memory://")
            options: dict[str, Any] = {"max_concurrency": 1000} if limited else {}
            local.job(name="bench.local", **options)(lambda i: i)
            job = local.jobs["bench.local"]
            c0 = time.process_time()
            with local.worker(concurrency=1, poll_interval=0.001):
                handles = [job.delay(i) for i in range(n)]
                assert [h.result(timeout=60) for h in handles] == list(range(n))
            costs[limited].append((time.process_time() - c0) / n)
            local.close()
    return min(costs[False]) * 1e6, min(costs[True]) * 1e6


def signing_micro(repeat: int = 20_000) -> list[tuple[str, float, float]]:
    """(payload, sign us, check us): one HMAC-SHA256 sign and one check of a pickled
    payload, the best of 5 runs of ``repeat`` (fewer for big payloads): the least disturbed
    by other processes."""
    signer = Signer(["bench-secret-0123456789abcdef"])
    ctx = args_context("0" * 32, "bench.trivial", (), True)
    out = []
    for label, size in (("trivial call (28 B pickle)", 28), ("1 KB", 1024), ("1 MB", 1 << 20)):
        data = os.urandom(size)
        k = max(20, repeat * 64 // max(64, size))
        blob = signer.sign(ctx, data)
        signs, checks = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(k):
                signer.sign(ctx, data)
            t1 = time.perf_counter()
            for _ in range(k):
                signer.verify(ctx, blob, "x")
            t2 = time.perf_counter()
            signs.append((t1 - t0) / k)
            checks.append((t2 - t1) / k)
        out.append((label, min(signs) * 1e6, min(checks) * 1e6))
    return out


def job_path_cost(n: int = 2_000, rounds: int = 3) -> tuple[float, float]:
    """CPU microseconds per job of the whole path in one process on ``memory://``: enqueue
    (``delay``), run in a worker thread, read with ``result()``; without and with a secret,
    best of ``rounds`` alternating runs. With no network or Redis in the way, signing's
    share here is an upper bound of its share on a real broker."""
    costs: dict[bool, list[float]] = {False: [], True: []}
    logging.getLogger("shoal.jobs.worker").setLevel(logging.ERROR)  # the unsigned warning
    for _ in range(rounds):
        for signed in (False, True):
            local = JobQueue("memory://", secret="bench-secret-0123456789abcdef" if signed else None)
            local.job(name="bench.local")(lambda i: i)
            job = local.jobs["bench.local"]
            c0 = time.process_time()
            with local.worker(concurrency=1, poll_interval=0.001):
                handles = [job.delay(i) for i in range(n)]
                assert [h.result(timeout=60) for h in handles] == list(range(n))
            costs[signed].append((time.process_time() - c0) / n)
            local.close()
    return min(costs[False]) * 1e6, min(costs[True]) * 1e6


def run_celery(n: int, env: dict[str, str], r: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "celery", "-A", "bench_jobs:celery_app", "worker",
           "--concurrency", "2", "--pool", "prefork", "--loglevel", "ERROR", "--without-gossip",
           "--without-mingle", "--without-heartbeat"]
    procs = [_spawn(cmd, env)]
    try:
        return measure("celery", lambda i: ctrivial.delay(i),
                       lambda i: cecho.delay(i).get(timeout=30), n, r)
    finally:
        _stop(procs)


def main() -> None:
    global URL
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
    parser.add_argument("--secret", action="store_true",
                        help="also measure signed payloads (JobQueue(secret=...))")
    parser.add_argument("--limits", action="store_true",
                        help="only measure jobs with and without rate/concurrency limits")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests" / "jobs"))
    from shoal.jobs.testing import RedisServer

    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed")
    server = RedisServer().start()
    try:
        URL = server.url
        os.environ["SHOAL_BENCH_REDIS"] = URL
        app.url, app._broker = URL + "?prefix=bench", None
        if celery_app is not None:
            celery_app.conf.broker_url = celery_app.conf.result_backend = URL
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        r = redis_lib.Redis.from_url(URL)
        if args.limits:
            run_limits(args.jobs, env, r)
            r.close()
            return
        # signed first: a run seems to gain from coming second (a warmer Redis), which
        # should not make signing look free
        signed = run_shoal(args.jobs, env, r, "bench-secret-0123456789abcdef") if args.secret else None
        rows = [run_shoal(args.jobs, env, r)]
        if celery_app is not None:
            rows.append(run_celery(args.jobs, env, r))
        r.close()
        report(rows, args)
        if signed is not None:
            report_signing(rows[0], signed)
    finally:
        app.close()
        if _redis is not None:
            _redis.close()
        server.close()


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    s = rows[0]
    c = rows[1] if len(rows) > 1 else None
    lines = [
        "| measurement | unit | shoal.jobs | celery | shoal / celery | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(label: str, unit: str, key: str, target: str, better_high: bool, goal: float,
            celery_key: str | None = None) -> None:
        sv = s[key]
        if c is None:
            lines.append(f"| {label} | {unit} | {sv:,.2f} | - | - | {target} | - |")
            return
        cv = c[celery_key or key]
        ratio = sv / cv
        met = ratio >= goal if better_high else ratio <= goal
        lines.append(f"| {label} | {unit} | {sv:,.2f} | {cv:,.2f} | {ratio:.2f}x | {target} | "
                     f"{'met' if met else 'NOT MET'} |")

    row(f"{args.jobs:,} trivial jobs, enqueue to done, 2 worker processes", "jobs/s", "jobs_s",
        ">= 2x", True, 2.0)
    row("the same, shoal with `enqueue_many` (celery: delay() one by one)", "jobs/s", "many_jobs_s",
        ">= 4x", True, 4.0, "jobs_s")
    row("the same, shoal with delay() in `app.batch()` (celery: delay())", "jobs/s",
        "batch_jobs_s", ">= 4x", True, 4.0, "jobs_s")
    row("enqueue latency (median of the delay() calls)", "ms", "enqueue_ms", "<= 1x", False, 1.0)
    row("round trip, idle: delay + result (median of 200)", "ms", "round_trip_ms", "<= 1x", False, 1.0)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs")
    for r in rows:
        print(f"- {r['name']}, delay() one by one: {args.jobs:,} jobs in {r['elapsed']:.2f} s "
              f"(enqueueing took {r['enqueue_s']:.2f} s of it: {args.jobs / r['enqueue_s']:,.0f}/s)")
        for label, what in (("many", "enqueue_many"), ("batch", "delay() in app.batch()")):
            if f"{label}_elapsed" in r:
                print(f"- {r['name']}, {what}: {args.jobs:,} jobs in {r[label + '_elapsed']:.2f} s "
                      f"(enqueueing took {r[label + '_enqueue_s']:.2f} s of it: "
                      f"{args.jobs / r[label + '_enqueue_s']:,.0f}/s)")
    print()
    print("\n".join(lines))


def report_signing(plain: dict[str, Any], signed: dict[str, Any]) -> None:
    print("\nSigned payloads (HMAC-SHA256), one sign / one check:\n")
    print("| payload | sign, us | check, us |\n|---|---|---|")
    for label, sign_us, check_us in signing_micro():
        print(f"| {label} | {sign_us:,.2f} | {check_us:,.2f} |")
    plain_job, signed_job = job_path_cost()
    print(f"| a whole job in one process on memory:// (delay, run, result), CPU | "
          f"{plain_job:,.1f} -> {signed_job:,.1f} (+{signed_job - plain_job:,.1f}, "
          f"{signed_job / plain_job - 1:+.1%}) | |")
    print("\nshoal.jobs unsigned vs signed (producer and both workers with the secret; the "
          "signed run first). On a shared machine these move by more than signing costs:\n")
    print("| measurement | unit | unsigned | signed | signed / unsigned |\n|---|---|---|---|---|")
    for label, unit, key in (("delay() one by one, enqueue to done", "jobs/s", "jobs_s"),
                             ("`enqueue_many`, enqueue to done", "jobs/s", "many_jobs_s"),
                             ("delay() in `app.batch()`, enqueue to done", "jobs/s", "batch_jobs_s"),
                             ("enqueue latency (median delay())", "ms", "enqueue_ms"),
                             ("producer CPU per delay()", "us", "enqueue_cpu_us"),
                             ("worker CPU per job (both workers, one-by-one run)", "us",
                              "worker_cpu_us"),
                             ("round trip, idle (median of 200)", "ms", "round_trip_ms")):
        print(f"| {label} | {unit} | {plain[key]:,.2f} | {signed[key]:,.2f} | "
              f"{signed[key] / plain[key]:.2f}x |")


if __name__ == "__main__":
    main()
