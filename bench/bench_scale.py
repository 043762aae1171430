"""Scale benchmark: does shoal's cost per task stay flat from 10,000 to 1,000,000 tasks?

    .venv/bin/python bench/bench_scale.py                    # N = 10k, 100k, 1M
    .venv/bin/python bench/bench_scale.py --sizes 10000,100000 --quick

Each case runs in a fresh child process with `Client(n_workers=2, threads_per_worker=1)`
(scheduler, client and driver in that process, 2 worker processes). Rows:
- map: `gather(map(noop, range(N), pure=False))`: tasks/s (from `map` to the gathered list),
  the time of the `map` call alone, and the client+scheduler process's RSS growth per held
  task (measured with every future held and done, before they are dropped);
- tree: N leaves reduced 8 at a time by `submit(sum, chunk)`: tasks/s over all tasks;
- as_completed: `map` of N, then `for f in as_completed(futures)`: tasks/s.
Targets (issue #11): tasks/s at 1M >= 0.8x tasks/s at 10k; `map` of 1M submitted in <= 10 s;
<= 1.5 KiB per held task in the client+scheduler process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KIB = 1024


def noop(x: int) -> int:
    return x


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(kind: str, n: int) -> dict[str, float]:
    import gc

    import shoal

    with shoal.Client(n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        client.gather(client.map(noop, range(1000), pure=False))  # warm up
        gc.collect()
        before = rss()
        start = time.perf_counter()
        if kind == "map":
            futures = client.map(noop, range(n), pure=False)
            submitted = time.perf_counter()
            values = client.gather(futures)
            done = time.perf_counter()
            assert values[-1] == n - 1
            gc.collect()
            held = rss() - before
            total_tasks = n
        elif kind == "tree":
            layer = client.map(noop, range(n), pure=False)
            submitted = time.perf_counter()
            total_tasks = n
            while len(layer) > 1:
                layer = [client.submit(sum, layer[i:i + 8], pure=False)
                         for i in range(0, len(layer), 8)]  # fmt: skip
                total_tasks += len(layer)
            assert layer[0].result() == n * (n - 1) // 2
            done = time.perf_counter()
            held = 0
        else:  # as_completed
            futures = client.map(noop, range(n), pure=False)
            submitted = time.perf_counter()
            count = sum(1 for _ in shoal.as_completed(futures))
            done = time.perf_counter()
            assert count == n
            held = 0
            total_tasks = n
        return {"tasks_per_s": total_tasks / (done - start), "submit_s": submitted - start,
                "total_s": done - start, "bytes_per_task": held / n}


def run_case(kind: str, n: int, timeout: float) -> dict[str, float] | None:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n)],
                         capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if out.returncode != 0:
        print(f"{kind} {n}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="map,tree,as_completed")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"shoal scale benchmark, {os.cpu_count()} cores, Client(n_workers=2, threads_per_worker=1)")
    print(f"{'case':<14}{'N':>10}{'tasks/s':>10}{'submit s':>10}{'total s':>10}{'B/task':>9}")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for kind in args.kinds.split(","):
        for n in sizes:
            r = run_case(kind, n, args.timeout)
            if r is None:
                continue
            results[kind, n] = r
            print(f"{kind:<14}{n:>10,}{r['tasks_per_s']:>10,.0f}{r['submit_s']:>10.2f}"
                  f"{r['total_s']:>10.2f}{r['bytes_per_task']:>9,.0f}", flush=True)
    for kind in args.kinds.split(","):
        small, big = results.get((kind, sizes[0])), results.get((kind, sizes[-1]))
        if small and big and len(sizes) > 1:
            print(f"{kind}: tasks/s at {sizes[-1]:,} = {big['tasks_per_s'] / small['tasks_per_s']:.2f}x"
                  f" tasks/s at {sizes[0]:,} (target >= 0.8x)")


if __name__ == "__main__":
    main()
