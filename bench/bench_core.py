"""Core benchmark: shoal against dask.distributed (and Ray, when installed) on one machine.

    .venv/bin/python bench/bench_core.py            # full run; writes bench/RESULTS.md
    .venv/bin/python bench/bench_core.py --quick    # small sizes, ~20 s smoke test, no write
    .venv/bin/python bench/bench_core.py --only dataplane   # rows d, g, h, n only, no write

Every system runs in its own fresh Python process (the driver, the client and the
scheduler share that process in both shoal's and dask's LocalCluster), one after the
other, never two at once, with 2 worker processes x 1 thread each. The parent process
only orchestrates: it starts each child in a new session, reads the child's results from
a JSON-lines file, checks that no process of that session is left behind, and prints and
records the table. See METHOD below for exactly what each row measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6  # decimal megabytes for the transfer row
MIB = 2**20

SIZES = {
    "full": dict(a_tasks=10_000, a_reps=3, a_warm=1_000, b_leaves=8_192, b_reps=3, b_warm=512,
                 c_calls=200, c_warm=20, d_bytes=100_000_000, d_reps=7, e_reps=3,
                 h_bytes=1_000_000_000, h_reps=3, child_timeout=3600.0),
    "quick": dict(a_tasks=1_000, a_reps=1, a_warm=100, b_leaves=512, b_reps=1, b_warm=32,
                  c_calls=30, c_warm=5, d_bytes=10_000_000, d_reps=2, e_reps=1,
                  h_bytes=100_000_000, h_reps=1, child_timeout=180.0),
}
#: The data-plane rows, run alone with ``--only dataplane``.
DATAPLANE_ROWS = "d,g,h,n"
#: Set to "false" by the TCP rows: same-host transfers then go over TCP, not shared memory.
SHM_ENV = "SHOAL_COMM__SHARED_MEMORY"

SYSTEMS = {
    "shoal": "shoal",
    "dask": "dask (default)",
    "dask-noqueue": "dask (queuing off)",
    "ray": "ray",
}

METHOD = """\
- Every system runs in a fresh child process (scheduler + client + driver in that process, as
  both LocalClusters put the scheduler in the caller's process), with 2 worker processes x 1
  thread, one system at a time. dask: `LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True, dashboard_address=None)`, once with its defaults and once with
  `distributed.scheduler.worker-saturation = inf` (queuing off) set before the cluster starts.
  shoal is compared with the better dask configuration in each row.
- (a) `map(noop, range(N), pure=False)` then `gather`, timed from the `map` call to the gathered
  list; median of the repeats after one smaller warm-up round.
- (b) leaves `map(ident, range(8192), pure=False)`, then pairwise `submit(add, f1, f2,
  pure=False)` level by level down to one future (16,383 tasks); timed from the first call
  to `result()` of the root, which is checked against `sum(range(8192))`.
- (c) `submit(inc, i, pure=False).result()` one after the other on an otherwise idle
  cluster; median over the calls, after a warm-up.
- (d) a float64 array of 100 MB of random (incompressible) numbers `x` is made by a task on
  worker A and an array `z` of 101 MB by a task on worker B. The consumer task
  `consume(x, z)` -> `(x.nbytes, sum of a strided 1/65536 sample of x)` is submitted and
  timed from `submit` to `result()`; it runs on B, so `x` has to travel A -> B over the
  worker-to-worker data plane. Both systems place the three tasks with `workers=[A]` /
  `[B]`, `allow_other_workers=False` (for a shoal without `workers=`, the script falls back
  to making `x` and `z` by tasks that depend on a tiny value scattered to A, resp. B, and
  lets shoal run the consumer where most of its input bytes are: B, since `z` is larger).
  A run counts only if `who_has` afterwards shows
  `x` on both workers and `z` on B only (i.e. the bytes did move); MB/s = 100 / time.
  Median of the repeats after one warm-up run. The time includes scheduling the consumer,
  the fetch, deserialising `x` on B, the (cheap) consumer and returning its small result.
  shoal runs (d) on a cluster of its own started with `SHOAL_COMM__SHARED_MEMORY=false`, so
  the bytes go over TCP on loopback (its main cluster idles meanwhile). Before each timed run, one sample of the raw socket
  floor is taken (interleaved): two fresh processes with plain blocking sockets, the sender
  `sendall`s a ready 100 MB buffer, the receiver `recv_into`s a buffer it allocated once,
  then answers one byte; timed by the sender from its first byte to the answer, after one
  untimed warm-up transfer on the same connection. "shoal over TCP / raw socket floor" is
  the median of shoal's runs over the median of the floor's. dask's runs are interleaved
  with floor samples the same way (its column of the floor rows), so both run under the
  same conditions.
- (g) as (d), on shoal's main cluster with default settings: same-host transfers go through
  shared memory.
- (h) a 1 GB float64 array `x` is made by a task on worker A (default settings); then
  `nbytes_of(x)` (`x.nbytes` and the sum of every millionth element: transfer-dominated) is
  submitted to run on B, and timed from that `submit` to its `result()`: scheduling, the
  fetch of `x` to B, deserialising it and returning a small tuple. GB/s = 1 / that time,
  median of the repeats after one warm-up; `who_has(x)` must show A and B afterwards. dask
  runs it too (over TCP), for information.
- (n) as (d) between Linux network namespaces: three "hosts" joined by veth pairs through a
  bridge (`shoal.testing.netns.VirtualNetwork`, kernel backend, no added delay or loss,
  MTU 1500): scheduler and the measuring client on host 0, worker A on host 1, worker B on
  host 2, shared memory off (`shoal scheduler`/`shoal worker`, `dask scheduler`/`dask
  worker` CLIs). The raw floor is measured from host 1 to host 2, interleaved with each
  system's runs. Skipped, saying why, without root or `ip`.
- (e) start: from constructing the cluster + client to the first `submit(inc, 1).result()`;
  shutdown: from `close()` until it returned and every worker process had exited (polled
  with psutil). Median of the cycles after one warm-up cycle, each on a new cluster that
  runs nothing else. (With `--quick`: one sample, the benchmark's own cluster, cold start,
  closed after all the other measurements.)
- (f) resident set size (psutil `memory_info().rss`) of the scheduler's process (which also
  holds the client and this driver: numpy, psutil and, for dask, `distributed` are
  imported) and of each worker process (PIDs from `client.run(os.getpid)`; the larger of
  the two is shown), idle (after start and a few warm-up tasks) and after (a) (its futures
  released, 1 s later). The "whole tree" row adds up the child process and all its
  descendants (dask's nanny lives in the scheduler process; multiprocessing helpers count).
- Ray, when installed, is run with `ray.init(num_cpus=2)` for (a), (b), (c) and (e) only;
  it is information, not a target.
"""


# ----------------------------------------------------------------------------- task functions
# (module level, so both systems pickle them the same way: by value, from __main__)


def noop(x: Any) -> Any:
    return x


def ident(x: Any) -> Any:
    return x


def inc(x: int) -> int:
    return x + 1


def add(x: Any, y: Any) -> Any:
    return x + y


def make_array(nbytes: int, seed: Any = None) -> Any:
    import numpy as np

    return np.random.default_rng(12345).random(nbytes // 8)


def consume(x: Any, z: Any) -> tuple[int, float]:
    return int(x.nbytes), float(x[:: 1 << 16].sum())


def nbytes_of(x: Any) -> tuple[int, float]:
    return int(x.nbytes), float(x[::1_000_000].sum())


def where_am_i(_: Any = None) -> int:
    return os.getpid()


# ----------------------------------------------------------------------------- system adapters


class TimeoutErr(Exception):
    pass


class ShoalSystem:
    name = "shoal"

    def __init__(self, address: str = "", env: dict[str, str] | None = None) -> None:
        import shoal

        self.shoal = shoal
        self.client: Any = None
        self.address = address  #: a running scheduler's, else a LocalCluster of our own
        self.env = env or {}  #: set while the cluster starts (its workers inherit it)

    def start(self) -> None:
        from dataplane import env

        with env(**self.env):
            if self.address:
                self.client = self.shoal.Client(self.address, timeout=30)
            else:
                self.client = self.shoal.Client(n_workers=2, threads_per_worker=1)

    def close(self) -> None:
        self.client.close()
        self.client = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def map(self, fn: Callable[..., Any], seq: Any) -> list[Any]:
        return self.client.map(fn, seq, pure=False)

    def wait(self, fs: list[Any], timeout: float) -> None:
        _, not_done = self.shoal.wait(fs, timeout=timeout)
        if not_done:
            raise TimeoutErr(f"{len(not_done)} of {len(fs)} futures not done after {timeout}s")

    def gather(self, fs: list[Any], timeout: float) -> list[Any]:
        self.wait(fs, timeout)
        return self.client.gather(fs)  # type: ignore[no-any-return]

    def result(self, f: Any, timeout: float) -> Any:
        return f.result(timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def who_has(self, fs: list[Any]) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.client.who_has(fs).items()}

    def n_scheduler_tasks(self) -> int:
        if self.address:  # a remote scheduler: not inspected
            return 0
        return len(self.client.cluster.scheduler.state.tasks)

    def prepare_d(self, a: str, b: str) -> None:
        import inspect

        self._restrict = "workers" in inspect.signature(self.client.submit).parameters
        if self._restrict:
            return
        self._seeds = (self.client.scatter("seed-a", workers=[a]),
                       self.client.scatter("seed-b", workers=[b]))
        # a round trip after the scatters: the scheduler has registered them by its reply
        where = self.who_has(list(self._seeds))
        if [where[f.key] for f in self._seeds] != [[a], [b]]:
            raise RuntimeError(f"scatter(workers=...) put the seeds at {where}")

    def place_big(self, a: str, b: str, nbytes: int) -> tuple[Any, Any]:
        """x on A, z (larger) on B: with ``workers=`` where shoal has it, else via tasks that
        depend on a tiny value scattered there."""
        if self._restrict:
            return (self.client.submit(make_array, nbytes, None, pure=False, workers=[a],
                                       allow_other_workers=False),
                    self.client.submit(make_array, nbytes + 1_000_000, None, pure=False,
                                       workers=[b], allow_other_workers=False))
        sa, sb = self._seeds
        x = self.client.submit(make_array, nbytes, sa, pure=False)
        z = self.client.submit(make_array, nbytes + 1_000_000, sb, pure=False)
        return x, z

    def consumer(self, x: Any, z: Any, b: str) -> Any:
        if self._restrict:
            return self.client.submit(consume, x, z, pure=False, workers=[b],
                                      allow_other_workers=False)
        return self.client.submit(consume, x, z, pure=False)

    def on(self, worker: str, fn: Callable[..., Any], *args: Any) -> Any:
        if not self._restrict:
            raise RuntimeError("this shoal has no submit(workers=...)")
        return self.client.submit(fn, *args, pure=False, workers=[worker],
                                  allow_other_workers=False)


class DaskSystem:
    def __init__(self, queuing: bool, address: str = "") -> None:
        import dask
        import distributed

        self.distributed = distributed
        self.name = "dask" if queuing else "dask-noqueue"
        if not queuing:
            dask.config.set({"distributed.scheduler.worker-saturation": float("inf")})
        self.cluster: Any = None
        self.client: Any = None
        self.address = address

    def start(self) -> None:
        d = self.distributed
        if self.address:
            self.client = d.Client(self.address, timeout=30)
            self.client.wait_for_workers(2, timeout=60)
            return
        self.cluster = d.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None)
        self.client = d.Client(self.cluster)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def map(self, fn: Callable[..., Any], seq: Any) -> list[Any]:
        return self.client.map(fn, seq, pure=False)

    def wait(self, fs: list[Any], timeout: float) -> None:
        try:
            self.distributed.wait(fs, timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutErr(f"futures not done after {timeout}s") from exc

    def gather(self, fs: list[Any], timeout: float) -> list[Any]:
        self.wait(fs, timeout)
        return self.client.gather(fs)  # type: ignore[no-any-return]

    def result(self, f: Any, timeout: float) -> Any:
        return f.result(timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def who_has(self, fs: list[Any]) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.client.who_has(fs).items()}

    def n_scheduler_tasks(self) -> int:
        if self.cluster is None:
            return 0
        return len(self.cluster.scheduler.tasks)

    def prepare_d(self, a: str, b: str) -> None:
        pass

    def place_big(self, a: str, b: str, nbytes: int) -> tuple[Any, Any]:
        x = self.client.submit(make_array, nbytes, None, pure=False, workers=[a],
                               allow_other_workers=False)
        z = self.client.submit(make_array, nbytes + 1_000_000, None, pure=False, workers=[b],
                               allow_other_workers=False)
        return x, z

    def consumer(self, x: Any, z: Any, b: str) -> Any:
        return self.client.submit(consume, x, z, pure=False, workers=[b],
                                  allow_other_workers=False)

    def on(self, worker: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False, workers=[worker],
                                  allow_other_workers=False)


class RaySystem:  # information only; not run where ray is not installed
    name = "ray"

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self._remote: dict[int, Any] = {}

    def start(self) -> None:
        self.ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def close(self) -> None:
        self.ray.shutdown()

    def _r(self, fn: Callable[..., Any]) -> Any:
        r = self._remote.get(id(fn))
        if r is None:
            r = self._remote[id(fn)] = self.ray.remote(fn)
        return r

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._r(fn).remote(*args)

    def map(self, fn: Callable[..., Any], seq: Any) -> list[Any]:
        r = self._r(fn)
        return [r.remote(x) for x in seq]

    def gather(self, fs: list[Any], timeout: float) -> list[Any]:
        return self.ray.get(fs, timeout=timeout)  # type: ignore[no-any-return]

    def result(self, f: Any, timeout: float) -> Any:
        return self.ray.get(f, timeout=timeout)

    def n_scheduler_tasks(self) -> int:
        return 0


# ----------------------------------------------------------------------------- child: measuring


class Recorder:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)
        self.t0 = time.monotonic()
        self.emitted: list[str] = []

    def put(self, row: str, **fields: Any) -> None:
        fields.setdefault("t", round(time.monotonic() - self.t0, 2))
        self.emitted.append(row)
        self.f.write(json.dumps({"row": row, **fields}) + "\n")
        self.f.flush()


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def _tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for p in me.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return int(total)


SETTLE_TIMEOUTS: list[str] = []


def _settle(sys_: Any, timeout: float = 10.0, base: int = 0) -> None:
    """Wait until the scheduler has forgotten all released tasks (bounded)."""
    gc.collect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sys_.n_scheduler_tasks() <= base:
                break
        except Exception:
            break
        time.sleep(0.02)
    else:
        SETTLE_TIMEOUTS.append(f"scheduler still held {sys_.n_scheduler_tasks()} tasks (expected"
                               f" <= {base}) {timeout:.0f} s after their futures were released")
    time.sleep(0.1)


def _wait_gone(pids: list[int], timeout: float = 30.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.005)
    return False


def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0))


def _our_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tree_cpu_seconds() -> float:
    """CPU time of this process, its live descendants and its reaped children."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + _our_cpu_seconds()
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return float(total)


def wait_quiet(max_wait: float, quiet_windows: int = 2) -> str:
    """Wait (bounded) until other processes leave the CPUs mostly idle; say how it went."""
    import psutil

    if max_wait <= 0:
        return ""
    t0 = time.monotonic()
    said = False
    calm = 0
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        calm = calm + 1 if busy < 15 else 0
        if calm >= quiet_windows:
            waited = time.monotonic() - t0 - 2.0 * quiet_windows
            return f"waited {waited:.0f} s for a quiet machine" if waited > 3 else ""
        if time.monotonic() - t0 > max_wait:
            return f"machine still {busy:.0f}% busy after waiting {max_wait:.0f} s; ran anyway"
        if not said:
            print(f"    waiting for the machine to go quiet ({busy:.0f}% CPU busy)", flush=True)
            said = True


def measure_e(sys_: Any, rec: Recorder, n: int) -> None:
    starts, stops = [], []
    for i in range(n + 1):
        t0 = time.perf_counter()
        sys_.start()
        sys_.result(sys_.submit(inc, 1), 60)
        t1 = time.perf_counter()
        pids = list(sys_.worker_pids().values()) if hasattr(sys_, "worker_pids") else []
        t2 = time.perf_counter()
        sys_.close()
        gone = _wait_gone(pids)
        t3 = time.perf_counter()
        if not gone:
            raise RuntimeError(f"worker processes {pids} still alive 30 s after close()")
        if i == 0:
            rec.put("e_start_cold", value=t1 - t0, unit="s")
        else:
            starts.append(t1 - t0)
            stops.append(t3 - t2)
    rec.put("e_start", value=_median(starts), samples=starts, unit="s")
    rec.put("e_stop", value=_median(stops), samples=stops, unit="s")


def measure_f(sys_: Any, rec: Recorder, when: str) -> None:
    pids = sys_.worker_pids()
    sched = _rss(os.getpid())
    workers = {a: _rss(p) for a, p in pids.items()}
    rec.put(f"f_sched_{when}", value=sched / MIB, unit="MiB")
    rec.put(f"f_worker_{when}", value=max(workers.values()) / MIB, unit="MiB",
            samples=[w / MIB for w in workers.values()])
    rec.put(f"f_tree_{when}", value=_tree_rss() / MIB, unit="MiB")


def measure_c(sys_: Any, rec: Recorder, n: int, warm: int) -> None:
    for i in range(warm):
        sys_.result(sys_.submit(inc, i), 10)
    _settle(sys_)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = sys_.result(sys_.submit(inc, i), 10)
        lat.append((time.perf_counter() - t0) * 1e3)
        assert r == i + 1, r
    q = sorted(lat)
    rec.put("c", value=_median(lat), unit="ms", samples=[q[0], q[n // 10], _median(q),
                                                         q[(9 * n) // 10], q[-1]], n=n)


def measure_a(sys_: Any, rec: Recorder, n: int, reps: int, warm: int) -> None:
    fs = sys_.map(noop, range(warm))
    sys_.gather(fs, 120)
    del fs
    _settle(sys_)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fs = sys_.map(noop, range(n))
        out = sys_.gather(fs, 600)
        dt = time.perf_counter() - t0
        assert out == list(range(n))
        rates.append(n / dt)
        del fs, out
        _settle(sys_)
    rec.put("a", value=_median(rates), unit="tasks/s", samples=rates)


def _tree(sys_: Any, leaves: int, timeout: float) -> float:
    t0 = time.perf_counter()
    level = sys_.map(ident, range(leaves))
    while len(level) > 1:
        level = [sys_.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
    r = sys_.result(level[0], timeout)
    dt = time.perf_counter() - t0
    if r != sum(range(leaves)):
        raise AssertionError(f"tree reduction gave {r}, expected {sum(range(leaves))}")
    return dt


def measure_b(sys_: Any, rec: Recorder, leaves: int, reps: int, warm: int) -> None:
    _tree(sys_, warm, 120)
    _settle(sys_)
    rates = []
    for _ in range(reps):
        rates.append((2 * leaves - 1) / _tree(sys_, leaves, 900))
        _settle(sys_)
    rec.put("b", value=_median(rates), unit="tasks/s", samples=rates, tasks=2 * leaves - 1)


def measure_d(sys_: Any, rec: Recorder, nbytes: int, reps: int, row: str = "d",
              floor: Callable[[], float] | None = None) -> None:
    """Row (d) (and (g), (n)); with ``floor`` (one raw-socket sample, in seconds), a floor
    sample is taken before each timed run, interleaved, and rows ``<row>_floor`` and
    ``<row>_pct`` (median over median of the floor) are recorded too."""
    floors: list[float] = []
    pids = sys_.worker_pids()
    a, b = sorted(pids)
    sys_.prepare_d(a, b)
    base = sys_.n_scheduler_tasks()
    rates, discarded, notes, times = [], 0, [], []
    for i in range(reps + 1):
        x, z = sys_.place_big(a, b, nbytes)
        sys_.wait([x, z], 120)
        before = sys_.who_has([x, z])
        if before.get(x.key) != [a] or before.get(z.key) != [b]:
            notes.append(f"run {i}: inputs not where intended: {before}")
            discarded += 1
            del x, z
            _settle(sys_, base=base)
            continue
        if floor is not None and i > 0:
            floors.append(nbytes / MB / floor())
        t0 = time.perf_counter()
        c = sys_.consumer(x, z, b)
        got = sys_.result(c, 300)
        dt = time.perf_counter() - t0
        times.append(round(dt, 4))
        after = sys_.who_has([x, z])
        assert got[0] == (nbytes // 8) * 8, got
        moved = sorted(after.get(x.key, [])) == sorted([a, b]) and after.get(z.key) == [b]
        if not moved:
            notes.append(f"run {i}: x did not move A->B: who_has after = {after}")
            discarded += 1
        elif i > 0:  # run 0 is the warm-up (connections, first fetch)
            rates.append(nbytes / MB / dt)
        del x, z, c
        _settle(sys_, base=base)
    if not rates:
        raise RuntimeError("no valid transfer run: " + "; ".join(notes))
    rec.put(row, value=_median(rates), unit="MB/s", samples=rates, discarded=discarded,
            notes=notes, nbytes=nbytes, times=times)
    if floors:
        rec.put(f"{row}_floor", value=_median(floors), unit="MB/s", samples=floors)
        rec.put(f"{row}_pct", value=100 * _median(rates) / _median(floors), unit="%")


def measure_h(sys_: Any, rec: Recorder, nbytes: int, reps: int) -> None:
    """Row (h): ``x`` made by a task on A; timed from submitting ``nbytes_of(x)`` on B to its
    result (the fetch of ``x`` to B and a cheap task)."""
    a, b = sorted(sys_.worker_pids())
    sys_.prepare_d(a, b)
    base = sys_.n_scheduler_tasks()
    rates, times = [], []
    for i in range(reps + 1):
        x = sys_.on(a, make_array, nbytes, None)
        sys_.wait([x], 300)
        t0 = time.perf_counter()
        got = sys_.result(sys_.on(b, nbytes_of, x), 300)
        dt = time.perf_counter() - t0
        assert got[0] == (nbytes // 8) * 8, got
        where = sys_.who_has([x]).get(x.key, [])
        if sorted(where) != sorted([a, b]):
            raise RuntimeError(f"x is on {where} after the consumer ran; expected on A and B")
        times.append(round(dt, 4))
        if i > 0:
            rates.append(nbytes / 1e9 / dt)
        del x
        _settle(sys_, base=base)
    rec.put("h", value=_median(rates), unit="GB/s", samples=rates, nbytes=nbytes, times=times)


def measure_d_tcp(rec: Recorder, nbytes: int, reps: int) -> None:
    """Row (d) for shoal: on a cluster of its own with shared memory off (TCP between the
    workers), interleaved with samples of the raw socket floor."""
    from dataplane import floor_times

    tcp = ShoalSystem(env={SHM_ENV: "false"})
    tcp.start()
    try:
        tcp.result(tcp.submit(inc, 1), 60)
        measure_d(tcp, rec, nbytes, reps, floor=lambda: floor_times(nbytes, 1)[0])
    finally:
        tcp.close()


def netns_floor(nbytes: int, floor_ns: str) -> Callable[[], float]:
    """One raw floor sample from host A's namespace to host B's (``NS_A,ADDR_A,NS_B,ADDR_B``)."""
    from dataplane import floor_times

    ns_a, _, ns_b, addr_b = floor_ns.split(",")
    return lambda: floor_times(nbytes, 1, recv_host=addr_b,
                               recv_prefix=["ip", "netns", "exec", ns_b],
                               send_prefix=["ip", "netns", "exec", ns_a])[0]


ONLY: set[str] = set()


def child_main(system: str, out: str, quick: bool, scheduler: str = "",
               floor_ns: str = "") -> int:
    """Measure one system; with ``scheduler``, only row (n), against that scheduler (and its
    two workers) on other network namespaces."""
    cfg = SIZES["quick" if quick else "full"]
    rec = Recorder(out)
    sys_: Any
    if system == "shoal":
        sys_ = ShoalSystem(scheduler)
    elif system == "dask":
        sys_ = DaskSystem(queuing=True, address=scheduler)
    elif system == "dask-noqueue":
        sys_ = DaskSystem(queuing=False)
    elif system == "ray":
        sys_ = RaySystem()
    else:
        raise SystemExit(f"unknown system {system}")
    import numpy  # noqa: F401  (same imports in the driver of every system)
    import psutil  # noqa: F401
    from dataplane import floor_times

    def guarded(name: str, fn: Callable[[], None]) -> bool:
        quiet = wait_quiet(0 if quick else 240, quiet_windows=1)
        first = len(rec.emitted)
        busy0, ours0, wall0 = _busy_cpu_seconds(), _tree_cpu_seconds(), time.monotonic()
        try:
            fn()
            return True
        except BaseException as exc:
            rec.put(name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            return False
        finally:
            if time.monotonic() - wall0 < 1.0:  # too short to tell: look at a 1 s window
                time.sleep(1.0 - (time.monotonic() - wall0))
            wall = time.monotonic() - wall0
            other = (_busy_cpu_seconds() - busy0) - (_tree_cpu_seconds() - ours0)
            rec.put("_load", rows=rec.emitted[first:], quiet=quiet,
                    others_pct=max(0.0, 100 * other / (max(wall, 1e-3) * (os.cpu_count() or 1))))

    if scheduler:
        try:
            sys_.start()
        except BaseException as exc:
            rec.put("n", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            return 1
        try:
            floor = netns_floor(cfg["d_bytes"], floor_ns)
            guarded("n", lambda: measure_d(sys_, rec, cfg["d_bytes"], cfg["d_reps"], row="n",
                                           floor=floor))
        finally:
            sys_.close()
        return 0

    if (not quick and (not ONLY or "e" in ONLY)
            and not guarded("e_start", lambda: measure_e(sys_, rec, cfg["e_reps"]))):
        try:
            sys_.close()
        except Exception:
            pass
        return 1
    try:  # with --quick, (e) is measured on this cluster: its start and, at the end, its close
        t0 = time.perf_counter()
        sys_.start()
        sys_.result(sys_.submit(inc, 1), 60)
        if quick:
            rec.put("e_start_cold", value=time.perf_counter() - t0, unit="s")
    except BaseException as exc:
        rec.put("e_start_cold" if quick else "start", error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc())
        try:
            sys_.close()
        except Exception:
            pass
        return 1
    try:
        for i in range(5):
            sys_.result(sys_.submit(inc, i), 30)
        time.sleep(0.5)
        steps: list[tuple[str, Callable[[], None]]] = []
        if system != "ray":
            steps.append(("f_sched_idle", lambda: measure_f(sys_, rec, "idle")))
        steps.append(("c", lambda: measure_c(sys_, rec, cfg["c_calls"], cfg["c_warm"])))
        steps.append(("a", lambda: measure_a(sys_, rec, cfg["a_tasks"], cfg["a_reps"],
                                             cfg["a_warm"])))
        if system != "ray":
            def f_after_a() -> None:
                _settle(sys_)
                time.sleep(1.0)
                measure_f(sys_, rec, "after_a")

            steps.append(("f_sched_after_a", f_after_a))
        steps.append(("b", lambda: measure_b(sys_, rec, cfg["b_leaves"], cfg["b_reps"],
                                             cfg["b_warm"])))
        if system == "shoal":
            steps.append(("d", lambda: measure_d_tcp(rec, cfg["d_bytes"], cfg["d_reps"])))
            steps.append(("g", lambda: measure_d(sys_, rec, cfg["d_bytes"], cfg["d_reps"],
                                                 row="g")))
        if system != "ray":
            if system != "shoal":  # with the floor interleaved too: the same conditions
                steps.append(("d", lambda: measure_d(
                    sys_, rec, cfg["d_bytes"], cfg["d_reps"],
                    floor=lambda: floor_times(cfg["d_bytes"], 1)[0])))
            steps.append(("h", lambda: measure_h(sys_, rec, cfg["h_bytes"], cfg["h_reps"])))
        for name, fn in steps:
            if ONLY and name[0] not in ONLY:
                continue
            if not guarded(name, fn):
                try:  # is the cluster still usable?
                    sys_.result(sys_.submit(inc, 1), 20)
                    _settle(sys_)
                except BaseException as exc:
                    rec.put("abort", error=f"cluster unusable after {name} failed: "
                            f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                    break
    finally:
        if SETTLE_TIMEOUTS:
            rec.put("settle", error=f"{len(SETTLE_TIMEOUTS)} x: {SETTLE_TIMEOUTS[0]}")
        try:
            pids = list(sys_.worker_pids().values()) if hasattr(sys_, "worker_pids") else []
        except BaseException:
            pids = []
        try:
            t0 = time.perf_counter()
            sys_.close()
            if not _wait_gone(pids):
                raise RuntimeError(f"worker processes {pids} still alive 30 s after close()")
            if quick:
                rec.put("e_stop", value=time.perf_counter() - t0, unit="s")
        except BaseException as exc:
            rec.put("e_stop" if quick else "close", error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())
    return 0


# ----------------------------------------------------------------------------- parent: report

ROWS = [
    # key, label, unit, better ("hi"/"lo"), target ratio shoal/dask, target text
    ("a", "(a) 10,000 no-op tasks, map+gather", "tasks/s", "hi", 2.0, ">= 2x"),
    ("b", "(b) tree reduction, 16,383 tasks", "tasks/s", "hi", 2.0, ">= 2x"),
    ("c", "(c) submit+result latency, idle", "ms", "lo", 0.1, "<= 0.1x"),
    ("d", "(d) 100 MB array worker A -> B over TCP", "MB/s", "hi", 2.0, ">= 2x"),
    ("d_floor", "(d) raw socket floor, 100 MB, loopback", "MB/s", "hi", None, "information"),
    ("d_pct", "(d) shoal over TCP / raw socket floor", "%", "hi", None, ">= 50%"),
    ("g", "(g) 100 MB worker A -> B, shared memory", "MB/s", "hi", None, ">= 4,962 (2x 2,481)"),
    ("h", "(h) 1 GB worker A -> B, shared memory", "GB/s", "hi", None, ">= 5 (aim 10)"),
    ("n", "(n) 100 MB A -> B, network namespaces (veth)", "MB/s", "hi", 2.0, ">= 2x"),
    ("n_floor", "(n) raw socket floor, namespaces", "MB/s", "hi", None, "information"),
    ("n_pct", "(n) shoal over TCP / raw socket floor", "%", "hi", None, ">= 50%"),
    ("e_start_cold", "(e) start to first result, 1st in process", "s", "lo", 0.5, "<= 0.5x"),
    ("e_start", "(e) start to first result, later starts", "s", "lo", 0.5, "<= 0.5x"),
    ("e_stop", "(e) shutdown", "s", "lo", 0.5, "<= 0.5x"),
    ("f_sched_idle", "(f) scheduler process RSS, idle", "MiB", "lo", 1.0, "<= 1x"),
    ("f_worker_idle", "(f) worker RSS (larger), idle", "MiB", "lo", 1.0, "<= 1x"),
    ("f_sched_after_a", "(f) scheduler process RSS, after (a)", "MiB", "lo", 1.0, "<= 1x"),
    ("f_worker_after_a", "(f) worker RSS (larger), after (a)", "MiB", "lo", 1.0, "<= 1x"),
    ("f_tree_idle", "(f) whole process tree RSS, idle", "MiB", "lo", 1.0, "<= 1x"),
    ("f_tree_after_a", "(f) whole process tree RSS, after (a)", "MiB", "lo", 1.0, "<= 1x"),
]


#: Rows whose target is an absolute figure of shoal's (the others compare with dask).
ABSOLUTE = {"d_pct": 50.0, "n_pct": 50.0, "g": 2 * 2481.0, "h": 5.0}


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "GB/s":
        return f"{v:.2f}"
    if unit == "%":
        return f"{v:.0f}%"
    if unit == "tasks/s" or unit == "MB/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}"
    if unit == "s":
        return f"{v:.3f}"
    return f"{v:.1f}"


def build_table(results: dict[str, dict[str, Any]], quick: bool) -> tuple[list[str], list[list[str]]]:
    systems = [s for s in SYSTEMS if s in results]
    header = ["measurement", "unit", *(SYSTEMS[s] for s in systems), "shoal / best dask",
              "target", "met?", "others' CPU"]
    rows = []
    for key, label, unit, better, target, ttext in ROWS:
        if ONLY and not any(key in results[s] for s in systems):
            continue
        if quick and key[0] in "dgn":
            label = label.replace("100 MB", f"{SIZES['quick']['d_bytes'] / MB:.0f} MB")
        if quick and key == "h":
            label = label.replace("1 GB", f"{SIZES['quick']['h_bytes'] / MB:.0f} MB")
        if quick and key == "a":
            label = label.replace("10,000", f"{SIZES['quick']['a_tasks']:,}")
        if quick and key == "b":
            label = label.replace("16,383", f"{2 * SIZES['quick']['b_leaves'] - 1:,}")
        vals = {s: results[s].get(key, {}).get("value") for s in systems}
        dask_vals = [vals[s] for s in ("dask", "dask-noqueue") if vals.get(s) is not None]
        best = (max(dask_vals) if better == "hi" else min(dask_vals)) if dask_vals else None
        sv = vals.get("shoal")
        if target is None:  # an absolute target of shoal's, or information only
            ratio = f"{sv / best:.2f}x" if sv is not None and best else "—"
            if key not in ABSOLUTE:
                met = "information"
            elif sv is None:
                failed = results.get("shoal", {}).get(key, {}).get("error")
                met = "NOT MET (shoal failed)" if failed else "no figure"
            else:
                met = "met" if sv >= ABSOLUTE[key] else "NOT MET"
        elif sv is None or best is None or best == 0:
            ratio, met = "—", "no figure"
            if sv is None and results.get("shoal", {}).get(key, {}).get("error"):
                met = "NOT MET (shoal failed)"
        else:
            r = sv / best
            ratio = f"{r:.2f}x"
            ok = r >= target if better == "hi" else r <= target
            met = "met" if ok else "NOT MET"
        cells = [label, unit]
        for s in systems:
            cell = results[s].get(key, {})
            cells.append("error" if cell.get("error") else _fmt(vals[s], unit))
        loads = [results[s].get(key, {}).get("others_pct") for s in systems]
        loads = [x for x in loads if x is not None]
        rows.append([*cells, ratio, ttext, met, f"{max(loads):.0f}%" if loads else "—"])
    return header, rows


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def print_rich(header: list[str], rows: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain_table(header, rows))
        return
    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        style = "green" if r[-2] == "met" else ("red" if r[-2].startswith("NOT") else None)
        t.add_row(*r, style=style)
    Console(width=200).print(t)


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except Exception as exc:
        return f"({exc})"


def environment() -> dict[str, str]:
    cpu = "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = sh(f"{sys.executable} -c \"import dask, distributed, numpy; "
                  "print(f'dask {dask.__version__}, distributed {distributed.__version__}, "
                  "numpy {numpy.__version__}')\"")
    dirty = sh(f"git -C {REPO} status --porcelain --untracked-files=no")
    return {
        "date": sh("date -u"),
        "uname": sh("uname -a"),
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "python": sys.version.replace("\n", " "),
        "shoal": f"git {sh(f'git -C {REPO} rev-parse --short HEAD')}"
                 + (" + uncommitted changes in the working tree" if dirty else ""),
        "others": versions,
    }


def session_leftovers(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    out.append(int(name))
            except OSError:
                pass
    return out


CHILD_SESSIONS: list[int] = []


def run_child(system: str, quick: bool, log_dir: Path) -> tuple[dict[str, Any], list[str]]:
    cfg = SIZES["quick" if quick else "full"]
    out = log_dir / f"{system}.jsonl"
    log = log_dir / f"{system}.log"
    out.write_text("")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    if ONLY:
        cmd += ["--only", ",".join(sorted(ONLY))]
    problems: list[str] = []
    print(f"--- {SYSTEMS[system]}", flush=True)
    quiet_note = wait_quiet(0 if quick else 900)
    busy0, ours0, wall0 = _busy_cpu_seconds(), _our_cpu_seconds(), time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(REPO))
        CHILD_SESSIONS.append(proc.pid)
        deadline = time.monotonic() + cfg["child_timeout"]
        seen = 0
        while True:
            rc = proc.poll()
            lines = out.read_text().splitlines()
            for ln in lines[seen:]:
                d = json.loads(ln)
                if d["row"] == "_load":
                    print(f"      (other processes: {d['others_pct']:.0f}% CPU during that"
                          f"{'; ' + d['quiet'] if d['quiet'] else ''})", flush=True)
                elif "error" in d:
                    print(f"    {d['row']}: ERROR {d['error']}", flush=True)
                else:
                    print(f"    {d['row']}: {_fmt(d['value'], d['unit'])} {d['unit'].strip('%')}", flush=True)
            seen = len(lines)
            if rc is not None:
                break
            if time.monotonic() > deadline:
                problems.append(f"{system}: timed out after {cfg['child_timeout']:.0f} s; killed")
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(0.25)
    wall = time.monotonic() - wall0
    other = max(0.0, (_busy_cpu_seconds() - busy0) - (_our_cpu_seconds() - ours0))
    other_pct = 100 * other / (wall * (os.cpu_count() or 1))
    print(f"    ({wall:.1f} s; other processes used {other_pct:.0f}% of the machine's CPU"
          f" meanwhile{'; ' + quiet_note if quiet_note else ''})", flush=True)
    if proc.returncode not in (0, None):
        problems.append(f"{system}: child exited with code {proc.returncode}")
    # no process of that session may outlive it
    deadline = time.monotonic() + 15
    left = session_leftovers(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_leftovers(proc.pid)
    if left:
        problems.append(f"{system}: processes left behind after the run: {left}; killed them")
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    results: dict[str, Any] = {"_run": {"wall": wall, "other_pct": other_pct, "quiet": quiet_note}}
    loads: list[dict[str, Any]] = []
    for ln in out.read_text().splitlines():
        d = json.loads(ln)
        if d["row"] == "_load":
            loads.append(d)
            continue
        results[d["row"]] = d
        if "error" in d:
            problems.append(f"{system}: {d['row']} failed: {d['error']}\n"
                            + d.get("traceback", ""))
    for d in loads:
        for r in d["rows"]:
            if r in results:
                results[r]["others_pct"] = d["others_pct"]
                results[r]["quiet"] = d["quiet"]
    log_text = log.read_text(errors="replace")
    if problems and log_text.strip():
        problems.append(f"{system}: last lines of its output:\n" + "\n".join(
            log_text.splitlines()[-40:]))
    return results, problems


def run_netns(systems: list[str], quick: bool,
              log_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Row (n): for shoal and dask (default), three network namespaces joined by veth links
    through a bridge (no added delay or loss): the scheduler and the measuring child on
    host 0, worker A on host 1, worker B on host 2, shared memory off. The raw floor is
    measured from host 1 to host 2, interleaved with each system's runs."""
    from dataplane import env, netns_unavailable

    results: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    why = netns_unavailable()
    if why:
        print(f"--- (n) network namespaces: skipped: {why}", flush=True)
        return results, problems
    from shoal.testing.netns import VirtualNetwork

    cfg = SIZES["quick" if quick else "full"]
    dask_cli = str(Path(sys.executable).parent / "dask")
    for system in [s for s in systems if s in ("shoal", "dask")]:
        print(f"--- {SYSTEMS[system]}, network namespaces", flush=True)
        out = log_dir / f"{system}-netns.jsonl"
        out.write_text("")
        log = log_dir / f"{system}-netns.log"
        wait_quiet(0 if quick else 900)
        try:
            with (env(**{SHM_ENV: "false"}), open(log, "wb") as logf,
                  VirtualNetwork(3, delay=(0.0, 0.0), loss=0.0, backend="kernel") as net):
                h0, h1, h2 = net.hosts
                if system == "shoal":
                    address = net.spawn_scheduler(0).address
                    for h in (1, 2):
                        net.spawn_worker(h, address)
                else:
                    address = f"tcp://{h0.address}:8786"
                    net.popen(0, [dask_cli, "scheduler", "--host", h0.address, "--port", "8786",
                                  "--no-dashboard"], stdout=logf, stderr=subprocess.STDOUT)
                    for h in (h1, h2):
                        net.popen(h.index, [dask_cli, "worker", address, "--host", h.address,
                                            "--nthreads", "1", "--no-dashboard"],
                                  stdout=logf, stderr=subprocess.STDOUT)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system,
                       "--out", str(out), "--scheduler", address,
                       "--floor-ns", f"{h1.netns},{h1.address},{h2.netns},{h2.address}",
                       *(["--quick"] if quick else [])]
                proc = net.popen(0, cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO))
                try:
                    proc.wait(cfg["child_timeout"])
                except subprocess.TimeoutExpired:
                    problems.append(f"{system} (netns): timed out after "
                                    f"{cfg['child_timeout']:.0f} s; killed")
        except Exception as exc:  # noqa: BLE001 - reported with the others
            problems.append(f"{system} (netns): {type(exc).__name__}: {exc}\n"
                            + traceback.format_exc())
        res: dict[str, Any] = {}
        load: dict[str, Any] = {}
        for ln in out.read_text().splitlines():
            d = json.loads(ln)
            if d["row"] == "_load":
                load = d
                continue
            res[d["row"]] = d
            if "error" in d:
                problems.append(f"{system} (netns): {d['row']} failed: {d['error']}\n"
                                + d.get("traceback", ""))
            else:
                print(f"    {d['row']}: {_fmt(d['value'], d['unit'])} {d['unit'].strip('%')}", flush=True)
        for d in res.values():
            d["others_pct"], d["quiet"] = load.get("others_pct"), load.get("quiet", "")
        if not res:
            problems.append(f"{system} (netns): no result; last lines of its output:\n"
                            + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        results[system] = res
    return results, problems


def write_results(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    marker = "## Core benchmark"
    if marker in old:
        head, rest = old.split(marker, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def parent_main(args: argparse.Namespace) -> int:
    import importlib.util

    systems = args.systems.split(",") if args.systems else ["shoal", "dask", "dask-noqueue"]
    if not args.systems and importlib.util.find_spec("ray") is not None:
        systems.append("ray")
    env = environment()
    mode = "quick" if args.quick else "full"
    print(f"shoal core benchmark ({mode}); {env['date']}; {env['cpu']}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        for s in systems:
            if ONLY and ONLY <= {"n"}:  # row (n) runs on clusters of its own
                break
            r, p = run_child(s, args.quick, Path(tmp))
            results[s] = r
            problems += p
            time.sleep(1.0)  # let the machine quiet down between systems
        if not ONLY or "n" in ONLY:
            r_ns, p_ns = run_netns(systems, args.quick, Path(tmp))
            for s, rows_ in r_ns.items():
                results.setdefault(s, {"_run": {"wall": 0.0, "other_pct": 0.0, "quiet": ""}})
                results[s].update(rows_)
            problems += p_ns
    elapsed = time.perf_counter() - t_start
    pg = subprocess.run(["pgrep", "-af", "shoal.cluster.worker_process|distributed"],
                        capture_output=True, text=True, check=False)
    ours, theirs = [], []
    for ln in pg.stdout.splitlines():
        pid = int(ln.split(" ", 1)[0])
        if pid == os.getpid():
            continue
        try:
            sid = os.getsid(pid)
        except OSError:
            continue
        (ours if sid in CHILD_SESSIONS or sid == os.getsid(0) else theirs).append(ln)
    if ours:
        problems.append("leftover processes of this run at the end (pgrep):\n" + "\n".join(ours))
    if theirs:
        print(f"(pgrep also matches {len(theirs)} processes of other sessions on this machine;"
              " not started by this run)")
    header, rows = build_table(results, args.quick)
    title = f"shoal vs dask.distributed, 2 workers x 1 thread ({mode})"
    print()
    print_rich(header, rows, title)
    met = sum(r[-2] == "met" for r in rows)
    summary = f"{met} of {sum(r[-2] != 'information' for r in rows)} targets met."
    print(summary)
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print("  " + p.replace("\n", "\n  "))
    else:
        print("No failures; no processes left behind.")
    print(f"(total {elapsed:.0f} s)")

    samples = []
    for s in results:
        for key, d in results[s].items():
            if "samples" in d:
                xs = ", ".join(_fmt(x, d["unit"]) for x in d["samples"])
                extra = ""
                if d["unit"] in ("MB/s", "GB/s"):
                    extra = (f"; median {_fmt(d['value'], d['unit'])}, spread"
                             f" {_fmt(min(d['samples']), d['unit'])}-"
                             f"{_fmt(max(d['samples']), d['unit'])}")
                if key in ("d", "g", "n"):
                    extra += f"; discarded runs: {d.get('discarded', 0)}"
                    if d.get("notes"):
                        extra += " (" + "; ".join(d["notes"]) + ")"
                if key == "c":
                    extra = f" (min, p10, median, p90, max of {d['n']} calls)"
                samples.append(f"- {SYSTEMS[s]} {key}: {xs} {d['unit']}{extra}")
    text = "\n".join([
        "## Core benchmark",
        "",
        f"`.venv/bin/python bench/bench_core.py{' --quick' if args.quick else ''}` "
        f"({mode} run, {elapsed:.0f} s). Ratio = shoal / the better dask configuration "
        "(higher is better for tasks/s and MB/s, lower for ms, s and MiB).",
        "",
        f"- date: {env['date']}",
        f"- uname: `{env['uname']}`",
        f"- CPU: {env['cpu']}",
        f"- Python: {env['python']}",
        f"- shoal: {env['shoal']}; {env['others']}",
        "",
        "The last column is the highest share of the machine's CPU that unrelated processes"
        " used while that row was measured (any system); before each measurement the run"
        " waits (up to 4 min) for a quiet machine. Other sessions share this 2-core machine,"
        " so rows with a high figure there are disturbed.",
        "",
        "Runs (one after the other; CPU used by unrelated processes during the whole run):",
        *(f"- {SYSTEMS[k]}: {v['_run']['wall']:.0f} s, others {v['_run']['other_pct']:.0f}% CPU"
          + (f" ({v['_run']['quiet']})" if v['_run']['quiet'] else "")
          for k, v in results.items()),
        "",
        plain_table(header, rows),
        "",
        f"**{summary}**",
        "",
        "### Problems found" if problems else "No failures; no processes left behind.",
        *(["", *("```\n" + p + "\n```" for p in problems)] if problems else []),
        "",
        "### What each row measures",
        "",
        METHOD,
        "### Samples (after warm-up)",
        "",
        *samples,
        "",
    ])
    if (not args.quick or args.write) and not args.no_write:
        write_results(Path(args.results), text)
        print(f"wrote {args.results}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (~20 s smoke test)")
    p.add_argument("--systems", default="", help="comma list of shoal,dask,dask-noqueue,ray")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    p.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="comma list of rows to run, e.g. d or a,b, or"
                   f" 'dataplane' for {DATAPLANE_ROWS} (for checks; implies --no-write unless"
                   " --write)")
    p.add_argument("--scheduler", default="", help=argparse.SUPPRESS)
    p.add_argument("--floor-ns", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    ONLY.update(x.strip() for x in args.only.replace("dataplane", DATAPLANE_ROWS).split(",")
                if x.strip())
    if ONLY and not args.write:
        args.no_write = True
    if args.child:
        return child_main(args.child, args.out, args.quick, args.scheduler, args.floor_ns)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
