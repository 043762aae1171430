"""The cost of TLS on the core benchmark rows: plain TCP against mutual TLS, same run.

    .venv/bin/python bench/bench_tls.py            # full sizes (~1-2 min)
    .venv/bin/python bench/bench_tls.py --quick    # small sizes (~20 s)

Each mode runs in a fresh child process with its own local cluster: 2 worker processes x 1
thread, the scheduler in the child (``shoal.Client(n_workers=2, threads_per_worker=1,
processes=True, dashboard_address=None)``; TLS: the same with ``security=True``, i.e. a
temporary CA, a certificate per role, TLS >= 1.2 both ways). The modes alternate
(tcp, tls, tcp, tls...) for ``--rounds`` rounds, and each row reports the median over the
rounds of each round's median, so that a slow patch of a shared machine hits both modes.

Rows (as in bench_core.py):
- tiny tasks: ``map(noop, range(N), pure=False)`` then ``gather``; tasks/s.
- tiny task CPU: CPU microseconds per task of this process and its worker processes.
- round trip: ``submit(inc, i, pure=False).result()`` one after the other; median ms.
- transfer: a 100 MB float64 array made on worker A, a consumer pinned to worker B
  (``workers=[B], allow_other_workers=False``) returns its size; timed from the submit of
  the consumer to its result, so the bytes cross A -> B on the worker data plane; MB/s.
- transfer CPU: CPU seconds used by this process and its worker processes during those
  transfers, per 100 MB (steadier than MB/s on a busy shared machine).
- connect: a new `Client` connecting to the running scheduler (TCP or TCP+TLS handshake,
  then shoal's handshake); median ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

SIZES = {
    "full": dict(tasks=5_000, task_reps=3, calls=200, nbytes=100_000_000, transfers=5,
                 connects=20, rounds=3),
    "quick": dict(tasks=1_000, task_reps=1, calls=50, nbytes=20_000_000, transfers=2,
                  connects=5, rounds=1),
}


def noop(x: Any) -> Any:
    return x


def inc(x: int) -> int:
    return x + 1


def make_array(nbytes: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(nbytes // 8)


def consume(x: Any) -> int:
    return int(x.nbytes)


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and its children so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def child(mode: str, size: dict[str, int]) -> dict[str, float]:
    import shoal

    out: dict[str, float] = {}
    with shoal.Client(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      security=True if mode == "tls" else None) as client:  # fmt: skip
        assert client.scheduler_address.startswith(f"{mode}://"), client.scheduler_address
        a, b = sorted(client.nthreads())
        client.gather(client.map(noop, range(200), pure=False))  # warm-up
        rates, cpu = [], []
        for _ in range(size["task_reps"]):
            t0, c0 = time.perf_counter(), tree_cpu()
            client.gather(client.map(noop, range(size["tasks"]), pure=False))
            rates.append(size["tasks"] / (time.perf_counter() - t0))
            cpu.append((tree_cpu() - c0) / size["tasks"] * 1e6)
        out["tiny tasks/s"] = statistics.median(rates)
        out["tiny task CPU us/task"] = statistics.median(cpu)

        for i in range(20):  # warm-up
            client.submit(inc, i, pure=False).result()
        times = []
        for i in range(size["calls"]):
            t0 = time.perf_counter()
            client.submit(inc, i, pure=False).result()
            times.append(time.perf_counter() - t0)
        out["round trip ms"] = statistics.median(times) * 1000

        rates, cpu = [], []
        for i in range(size["transfers"] + 1):
            x = client.submit(make_array, size["nbytes"], i, workers=[a],
                              allow_other_workers=False, pure=False)  # fmt: skip
            x.result()
            t0, c0 = time.perf_counter(), tree_cpu()
            got = client.submit(consume, x, workers=[b], allow_other_workers=False,
                                pure=False).result()  # fmt: skip
            dt, dc = time.perf_counter() - t0, tree_cpu() - c0
            assert got == size["nbytes"] // 8 * 8
            if i:  # the first opens the worker-to-worker connection
                rates.append(size["nbytes"] / 1e6 / dt)
                cpu.append(dc * 100e6 / size["nbytes"])
            del x
        out["transfer MB/s"] = statistics.median(rates)
        out["transfer CPU s/100MB"] = statistics.median(cpu)

        times = []
        security = client.security
        for _ in range(size["connects"]):
            t0 = time.perf_counter()
            other = shoal.Client(client.scheduler_address, security=security,
                                 set_as_default=False)  # fmt: skip
            times.append(time.perf_counter() - t0)
            other.close()
        out["connect ms"] = statistics.median(times) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--child", choices=["tcp", "tls"], default=None)
    args = parser.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.child:
        print(json.dumps(child(args.child, size)), flush=True)
        return 0
    rounds = args.rounds or size["rounds"]
    results: dict[str, list[dict[str, float]]] = {"tcp": [], "tls": []}
    for r in range(rounds):
        for mode in ("tcp", "tls"):
            cmd = [sys.executable, __file__, "--child", mode, *(["--quick"] if args.quick else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                  env=dict(os.environ, SHOAL_LOG_LEVEL="warning"))  # fmt: skip
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds} {mode}: {results[mode][-1]}", file=sys.stderr)
    rows = list(results["tcp"][0])
    print(f"\n| row | tcp | tls | tls / tcp |\n|---|---:|---:|---:|")
    for row in rows:
        tcp = statistics.median(run[row] for run in results["tcp"])
        tls = statistics.median(run[row] for run in results["tls"])
        print(f"| {row} | {tcp:,.2f} | {tls:,.2f} | {tls / tcp:.2f} |")
    print(f"\n{rounds} round(s); sizes: {size}; python {sys.version.split()[0]},"
          f" {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
