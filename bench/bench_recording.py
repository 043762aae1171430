"""What one dashboard snapshot and one /metrics scrape cost the scheduler, by task count.

    .venv/bin/python bench/bench_recording.py [--repeat 20]

A `Scheduler` (no sockets, no workers) holds N waiting tasks in two groups and 5,000 task
stream records; the page's snapshot (`api.info`, `api.workers`, `api.task_counts`,
`api.task_stream`) and a Prometheus collection are timed, best of 5 runs of ``--repeat``
each. The claim is that the cost does not grow with N (the tests check that nothing walks
the task table; this prints the time). Target: under 20 ms at 100,000 tasks, where a single
pass over the tasks takes about 50 ms. dask's dashboard is a different (Bokeh) design and
is not compared.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from shoal.core.scheduler_events import TasksSubmitted
from shoal.dashboard import api
from shoal.dashboard.metrics import SchedulerCollector
from shoal.protocol.messages import TaskSpec
from shoal.protocol.serialize import Serialized
from shoal.scheduler import Scheduler

ARGS = Serialized([b""])


def scheduler_with(n_tasks: int) -> Scheduler:
    scheduler = Scheduler()
    specs = [TaskSpec(f"inc-{i:08d}", b"f", ARGS, []) for i in range(n_tasks)]
    specs += [TaskSpec(f"dec-{i:08d}", b"f", ARGS, []) for i in range(1_000)]
    scheduler.state.handle([TasksSubmitted("s", "c1", specs, [s.key for s in specs])], 0.0)
    for i in range(5_000):
        scheduler.task_stream.record(f"inc-{i:08d}", "inc", "w1", 1.0, 1.01)
    return scheduler


async def per_snapshot(scheduler: Scheduler, repeat: int) -> float:
    """Seconds per snapshot and scrape, best of 5 runs."""
    collector = SchedulerCollector(scheduler)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            api.info(scheduler)
            api.workers(scheduler)
            api.task_counts(scheduler)
            api.task_stream(scheduler, since=scheduler.task_stream.count - 100)
            list(collector.collect())
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'tasks':>10}  {'ms per snapshot':>16}  {'one pass (ms)':>14}")
    for n in (1_000, 10_000, 100_000):
        scheduler = scheduler_with(n)
        seconds = asyncio.run(per_snapshot(scheduler, args.repeat))
        start = time.perf_counter()
        sum(1 for ts in scheduler.state.tasks.values() if ts.state == "waiting")
        one_pass = time.perf_counter() - start
        print(f"{n + 1_000:>10,}  {seconds * 1000:>16.3f}  {one_pass * 1000:>14.1f}")


if __name__ == "__main__":
    main()
