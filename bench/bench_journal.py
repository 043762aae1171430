"""The scheduler journal's cost and a restart's recovery time (issue #16).

    .venv/bin/python bench/bench_journal.py           # full run; prints the table
    .venv/bin/python bench/bench_journal.py --quick   # small sizes, a smoke test

A ``shoal scheduler`` process (with ``--journal`` or without), 2 ``shoal worker`` processes x
1 thread, the client in this process; journal on and off alternate, repeats are medians.
Rows, as in bench_core.py: (a) ``map(noop, range(N))`` + gather; (b) a tree reduction of
8,192 leaves. Recovery: the 5,000-task dependent graph of tests/journal (3 workers x 2
threads), once undisturbed and once with the scheduler SIGKILLed when half of it has run and
started again on its journal: the time from the restart to the result, and the run's total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "journal"))

import shoal  # noqa: E402
from restart_cluster import (  # noqa: E402
    RestartableCluster,
    count_runs,
    expected,
    submit_graph,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZES = {"full": dict(a=10_000, b=8_192, reps=3, width=100, depth=50, recover_reps=3),
         "quick": dict(a=1_000, b=512, reps=1, width=20, depth=20, recover_reps=1)}


def noop(x: Any) -> Any:
    return x


def add(x: Any, y: Any) -> Any:
    return x + y


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (robust to other load on the machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row_a(client: shoal.Client, n: int) -> float:
    started = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    client.gather(futures)
    return n / (time.perf_counter() - started)


def row_b(client: shoal.Client, leaves: int) -> float:
    started = time.perf_counter()
    layer = client.map(noop, range(leaves), pure=False)
    n = leaves
    while len(layer) > 1:
        layer = [client.submit(add, layer[i], layer[i + 1], pure=False)
                 for i in range(0, len(layer), 2)]  # fmt: skip
        n += len(layer)
    assert layer[0].result(timeout=600) == leaves * (leaves - 1) // 2
    return n / (time.perf_counter() - started)


def cost(size: dict[str, int]) -> tuple[dict[str, dict[bool, list[float]]],
                                        dict[str, dict[bool, list[float]]]]:  # fmt: skip
    """Tasks/s of each row, and the scheduler process's CPU microseconds per task."""
    rates: dict[str, dict[bool, list[float]]] = {"a": {True: [], False: []},
                                                 "b": {True: [], False: []}}  # fmt: skip
    cpu: dict[str, dict[bool, list[float]]] = {"a": {True: [], False: []},
                                               "b": {True: [], False: []}}  # fmt: skip
    for rep in range(size["reps"]):
        for journal in ((False, True) if rep % 2 == 0 else (True, False)):
            with tempfile.TemporaryDirectory(prefix="shoal-bench-journal-") as d:
                cluster = RestartableCluster(Path(d), n_workers=2, nthreads=1, journal=journal)
                try:
                    cluster.start_scheduler()
                    cluster.start_workers()
                    assert cluster.scheduler is not None
                    pid = cluster.scheduler.pid
                    with shoal.Client(cluster.address, set_as_default=False) as client:
                        row_a(client, size["a"] // 10)  # warm-up
                        before = cpu_seconds(pid)
                        rates["a"][journal].append(row_a(client, size["a"]))
                        middle = cpu_seconds(pid)
                        rates["b"][journal].append(row_b(client, size["b"]))
                        after = cpu_seconds(pid)
                        cpu["a"][journal].append((middle - before) / size["a"] * 1e6)
                        cpu["b"][journal].append((after - middle) / (2 * size["b"] - 1) * 1e6)
                finally:
                    cluster.close()
    return rates, cpu


def recovery(size: dict[str, int], kill: bool) -> dict[str, float]:
    width, depth = size["width"], size["depth"]
    with tempfile.TemporaryDirectory(prefix="shoal-bench-journal-") as d:
        tally = str(Path(d) / "runs")
        cluster = RestartableCluster(Path(d))
        try:
            cluster.start_scheduler()
            cluster.start_workers()
            with shoal.Client(cluster.address, reconnect_timeout=120,
                              set_as_default=False) as client:  # fmt: skip
                started = time.perf_counter()
                futures, final = submit_graph(client, width, depth, 0.001, tally)
                n = len(futures) + 1
                restart_to_end = 0.0
                if kill:
                    while count_runs(tally) < n // 2:
                        time.sleep(0.005)
                    cluster.kill_scheduler()
                    restarted = time.perf_counter()
                    cluster.start_scheduler()
                assert final.result(timeout=600) == expected(width, depth)
                end = time.perf_counter()
                if kill:
                    restart_to_end = end - restarted
                return {"total": end - started, "restart_to_end": restart_to_end,
                        "recomputed": count_runs(tally) - n}
        finally:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=0, help="repeats of the cost rows")
    args = parser.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.reps:
        size["reps"] = args.reps
    rates, cpu = cost(size)
    print("| row | journal off (tasks/s) | journal on (tasks/s) | on / off |"
          " scheduler CPU/task off (us) | on (us) | on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"a": f"(a) map {size['a']:,} no-op + gather",
             "b": f"(b) tree reduction, {size['b']:,} leaves"}  # fmt: skip
    for row in ("a", "b"):
        off, on = statistics.median(rates[row][False]), statistics.median(rates[row][True])
        c_off, c_on = statistics.median(cpu[row][False]), statistics.median(cpu[row][True])
        print(f"| {names[row]} | {off:,.0f} | {on:,.0f} | {on / off:.2f} | {c_off:.0f} |"
              f" {c_on:.0f} | {c_on / c_off:.2f} |")
        print(f"<!-- {row} tasks/s off {[round(x) for x in rates[row][False]]} on"
              f" {[round(x) for x in rates[row][True]]} -->")
    n = size["width"] * size["depth"] + 1
    print(f"\nrecovery, {n:,}-task dependent graph, 3 workers x 2 threads, kill at 50%:")
    print("| run | total (s) | restart -> result (s) | recomputed tasks |")
    print("|---|---:|---:|---:|")
    for kill in (False, True):
        runs = [recovery(size, kill) for _ in range(size["recover_reps"])]
        total = statistics.median(r["total"] for r in runs)
        rest = statistics.median(r["restart_to_end"] for r in runs)
        recomputed = statistics.median(r["recomputed"] for r in runs)
        print(f"| {'SIGKILL + restart' if kill else 'no kill'} | {total:.2f} |"
              f" {rest:.2f} | {recomputed:.0f} |" if kill else
              f"| no kill | {total:.2f} | - | {recomputed:.0f} |")


if __name__ == "__main__":
    main()
