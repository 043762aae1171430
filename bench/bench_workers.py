"""A thousand workers (issue #11): one ``shoal scheduler`` process, 1,000 real workers.

    .venv/bin/python bench/bench_workers.py                      # 100, 300, 1000 workers
    .venv/bin/python bench/bench_workers.py --sizes 100 --tasks 10000 --idle 5
    .venv/bin/python bench/bench_workers.py --write-results      # append to bench/RESULTS.md

The workers are hosted by `shoal.testing.many_workers.ManyWorkers`, ``--processes`` child
processes (2 by default) with one event loop each; every worker is the real worker server
with its own listener and connection to the scheduler (one task thread each). Measured:

- join: seconds from starting the hosts until every worker has registered (target <= 30 s
  for 1,000);
- idle: the scheduler process's CPU (psutil ``cpu_times``) over ``--idle`` seconds while
  the workers only heartbeat (target < 10% of one core at 1,000), and the traffic it
  reads: bytes (``rchar`` of /proc/PID/io: every byte the process read from its sockets)
  and read calls per second, and heartbeats per second as the workers counted them;
  per-worker figures must stay flat from 100 to 1,000 workers;
- /metrics: the size of the scheduler's Prometheus output, per worker;
- tasks (at the largest size): a client ``map``s ``--tasks`` no-op tasks that return the
  address of the worker that ran them, and gathers them: wall time, tasks/s, workers used
  (target: every one), and the scheduler's decisions per second: its task state
  transitions (``shoal_transitions_total`` of /metrics) over the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

import shoal
from shoal.testing import spawn_scheduler, wait_until
from shoal.testing.many_workers import ManyWorkers
from shoal.worker.context import get_worker

HERE = Path(__file__).resolve().parent


def where_am_i(i: int) -> str:
    return get_worker().address


where_am_i.__module__ = "__main__"  # sent by value: the hosts cannot import this script


class SchedulerProbe:
    """Reads the scheduler process's CPU, its socket reads and its /metrics."""

    def __init__(self, pid: int, metrics_url: str) -> None:
        self.proc = psutil.Process(pid)
        self.metrics_url = metrics_url

    def sample(self) -> dict[str, float]:
        cpu = self.proc.cpu_times()
        io = self.proc.io_counters()  # rchar/syscr: every read, sockets included
        return {"t": time.monotonic(), "cpu": cpu.user + cpu.system,
                "read_bytes": float(getattr(io, "read_chars", 0)),
                "read_calls": float(io.read_count)}  # fmt: skip

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            text: str = response.read().decode()
        return text

    def transitions(self) -> int:
        total = 0
        for line in self.metrics().splitlines():
            if line.startswith("shoal_transitions_total{"):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total


def heartbeats(mw: ManyWorkers) -> int:
    return sum(s["heartbeats_sent"] for s in mw.stats())


def host_cpu(mw: ManyWorkers) -> float:
    return float(sum(s["cpu_seconds"] for s in mw.stats()))


def idle_figures(probe: SchedulerProbe, mw: ManyWorkers, n: int, seconds: float) -> dict[str, Any]:
    """What the scheduler spends and reads while ``n`` workers only heartbeat."""
    # Let every worker's heartbeat loop reach its pace (the first beats follow the join).
    time.sleep(2 * mw.heartbeat_interval)
    beats0, hosts0, before = heartbeats(mw), host_cpu(mw), probe.sample()
    time.sleep(seconds)
    beats1, hosts1, after = heartbeats(mw), host_cpu(mw), probe.sample()
    span = after["t"] - before["t"]
    beat_rate = (beats1 - beats0) / span
    read_rate = (after["read_bytes"] - before["read_bytes"]) / span
    return {
        "workers": n,
        "idle_s": span,
        "sched_cpu_pct": 100 * (after["cpu"] - before["cpu"]) / span,
        "hosts_cpu_pct": 100 * (hosts1 - hosts0) / span,
        "heartbeats_per_s": beat_rate,
        "read_bytes_per_s": read_rate,
        "read_calls_per_s": (after["read_calls"] - before["read_calls"]) / span,
        "bytes_per_heartbeat": read_rate / beat_rate if beat_rate else 0.0,
        "metrics_bytes": len(probe.metrics().encode()),
    }


def run_tasks(probe: SchedulerProbe, mw: ManyWorkers, address: str, n_tasks: int) -> dict[str, Any]:
    with shoal.Client(address, timeout=60) as client:
        client.gather(client.map(where_am_i, range(len(mw.addresses)), pure=False))  # warm up
        transitions0, cpu0, hosts0 = probe.transitions(), probe.sample(), host_cpu(mw)
        client0 = _own_cpu()
        start = time.perf_counter()
        futures = client.map(where_am_i, range(n_tasks), pure=False)
        submitted = time.perf_counter()
        ran_on = client.gather(futures)
        wall = time.perf_counter() - start
        cpu1, hosts1, client1 = probe.sample(), host_cpu(mw), _own_cpu()
        transitions = probe.transitions() - transitions0
        del futures
    used = set(ran_on)
    return {
        "tasks": n_tasks,
        "submit_s": submitted - start,
        "wall_s": wall,
        "tasks_per_s": n_tasks / wall,
        "workers_used": len(used),
        "workers_unknown": len(used - set(mw.addresses)),
        "tasks_per_worker_min": _min_count(ran_on, mw.addresses),
        "tasks_per_worker_max": max(_counts(ran_on).values()),
        "transitions": transitions,
        "decisions_per_s": transitions / wall,
        "sched_cpu_pct": 100 * (cpu1["cpu"] - cpu0["cpu"]) / (cpu1["t"] - cpu0["t"]),
        # what the scheduler could decide if it had a core of its own (it shares two)
        "decisions_per_cpu_s": transitions / max(1e-9, cpu1["cpu"] - cpu0["cpu"]),
        # CPU per task, which the machine's load does not change much (wall time it does)
        "sched_us_per_task": 1e6 * (cpu1["cpu"] - cpu0["cpu"]) / n_tasks,
        "hosts_us_per_task": 1e6 * (hosts1 - hosts0) / n_tasks,
        "client_us_per_task": 1e6 * (client1 - client0) / n_tasks,
    }


def _own_cpu() -> float:
    cpu = psutil.Process().cpu_times()
    return float(cpu.user + cpu.system)


def _counts(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _min_count(items: list[str], addresses: list[str]) -> int:
    counts = _counts(items)
    return min(counts.get(a, 0) for a in addresses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--shared-threads", type=int, default=0,
                        help="a pool of this many threads per host shared by its workers"
                        " (0: a thread per worker)")  # fmt: skip
    parser.add_argument("--write-results", action="store_true",
                        help="append the figures to bench/RESULTS.md")  # fmt: skip
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    idle_rows: list[dict[str, Any]] = []
    tasks_row: dict[str, Any] | None = None
    joins: dict[int, float] = {}
    print(f"shoal: a thousand workers; {os.cpu_count()} cores, load {load_before[0]:.2f};"
          f" {args.processes} worker host processes", flush=True)  # fmt: skip
    with spawn_scheduler(extra_args=["--dashboard-address", "127.0.0.1:0"]) as scheduler:
        dash = scheduler.wait_for_line(r"shoal dashboard at (\S+)", 10).group(1)
        probe = SchedulerProbe(scheduler.pid, dash.rstrip("/") + "/metrics")
        empty_metrics = len(probe.metrics().encode())
        for n in sizes:
            with ManyWorkers(scheduler.address, n=n, processes=min(args.processes, n),
                             heartbeat_interval=args.heartbeat_interval,
                             shared_threads=args.shared_threads,
                             start_timeout=120, name_prefix=f"w{n}-") as mw:  # fmt: skip
                joins[n] = mw.start_seconds
                listed = _workers_listed(probe)
                if listed != n:
                    raise AssertionError(f"the scheduler lists {listed} workers, not {n}")
                print(f"{n} workers joined in {mw.start_seconds:.2f} s", flush=True)
                row = idle_figures(probe, mw, n, args.idle)
                row["join_s"] = mw.start_seconds
                row["threads_per_host"] = max(s["threads"] for s in mw.stats())
                idle_rows.append(row)
                print_idle([row], empty_metrics, header=len(idle_rows) == 1)
                if n == sizes[-1] and args.tasks:
                    tasks_row = run_tasks(probe, mw, scheduler.address, args.tasks)
                    hosts = mw.stats()
                    tasks_row["threads_per_host"] = max(s["threads"] for s in hosts)
                    tasks_row["host_rss_mib"] = max(s["rss"] for s in hosts) / 2**20
                    print_tasks(tasks_row, n)
            wait_until(lambda: _workers_listed(probe) == 0,
                       timeout=60, message="the scheduler dropped the workers")  # fmt: skip
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=HERE).stdout.strip()  # fmt: skip
    report = markdown(started, commit, bool(dirty), load_before, load_after, args, idle_rows,
                      tasks_row, empty_metrics)  # fmt: skip
    print()
    print(report)
    if args.write_results:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + report)
        print(f"appended to {HERE / 'RESULTS.md'}")


def _workers_listed(probe: SchedulerProbe) -> int:
    match = re.search(r"^shoal_workers (\S+)$", probe.metrics(), re.MULTILINE)
    return int(float(match.group(1))) if match else -1


def print_idle(rows: list[dict[str, Any]], empty_metrics: int, header: bool) -> None:
    if header:
        print(f"{'workers':>8}{'join s':>8}{'sched CPU%':>11}{'hosts CPU%':>11}{'beats/s':>9}"
              f"{'beats/s/w':>10}{'read B/s':>10}{'B/beat':>8}{'reads/s':>9}"
              f"{'metrics B':>11}{'B/w':>6}")  # fmt: skip
    for r in rows:
        n = r["workers"]
        print(f"{n:>8}{r['join_s']:>8.2f}{r['sched_cpu_pct']:>11.2f}{r['hosts_cpu_pct']:>11.1f}"
              f"{r['heartbeats_per_s']:>9.0f}{r['heartbeats_per_s'] / n:>10.2f}"
              f"{r['read_bytes_per_s']:>10.0f}{r['bytes_per_heartbeat']:>8.1f}"
              f"{r['read_calls_per_s']:>9.0f}{r['metrics_bytes']:>11,}"
              f"{(r['metrics_bytes'] - empty_metrics) / n:>6.0f}", flush=True)  # fmt: skip


def print_tasks(r: dict[str, Any], n: int) -> None:
    print(f"{r['tasks']:,} tasks on {n} workers: map {r['submit_s']:.2f} s, wall"
          f" {r['wall_s']:.2f} s, {r['tasks_per_s']:,.0f} tasks/s, {r['workers_used']} workers"
          f" used (tasks per worker {r['tasks_per_worker_min']}-{r['tasks_per_worker_max']}),"
          f" {r['transitions']:,} transitions = {r['decisions_per_s']:,.0f} decisions/s,"
          f" scheduler CPU {r['sched_cpu_pct']:.0f}%, {r['decisions_per_cpu_s']:,.0f} decisions"
          f" per scheduler CPU-second; CPU per task: scheduler {r['sched_us_per_task']:.0f} us,"
          f" worker hosts {r['hosts_us_per_task']:.0f} us, client {r['client_us_per_task']:.0f}"
          f" us; hosts: {r['threads_per_host']} threads,"
          f" {r['host_rss_mib']:.0f} MiB", flush=True)  # fmt: skip


def markdown(started: datetime.datetime, commit: str, dirty: bool,
             load_before: tuple[float, float, float], load_after: tuple[float, float, float],
             args: argparse.Namespace, rows: list[dict[str, Any]],
             tasks: dict[str, Any] | None, empty_metrics: int) -> str:  # fmt: skip
    lines = [
        f"### Run of {started:%Y-%m-%d %H:%M} UTC, commit {commit}"
        f"{' (with uncommitted changes of others in the checkout)' if dirty else ''}",
        "",
        f"`bench/bench_workers.py --sizes {args.sizes} --tasks {args.tasks} --idle {args.idle:g}"
        f"{f' --shared-threads {args.shared_threads}' if args.shared_threads else ''}`:"
        f" {os.cpu_count()} cores shared with other engineers' runs, load average"
        f" {load_before[0]:.2f} before, {load_after[0]:.2f} after; {args.processes} host"
        f" processes, heartbeat every {args.heartbeat_interval:g} s, "
        + (f"a pool of {args.shared_threads} threads per host shared by its workers."
           if args.shared_threads else "a task thread per worker."),
        "",
        "| workers | join s | scheduler CPU % (idle) | heartbeats/s | per worker | scheduler"
        " reads B/s | B per heartbeat | read calls/s | /metrics B | /metrics B per worker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        n = r["workers"]
        lines.append(f"| {n:,} | {r['join_s']:.2f} | {r['sched_cpu_pct']:.2f} |"
                     f" {r['heartbeats_per_s']:,.0f} | {r['heartbeats_per_s'] / n:.2f} |"
                     f" {r['read_bytes_per_s']:,.0f} | {r['bytes_per_heartbeat']:.1f} |"
                     f" {r['read_calls_per_s']:,.0f} | {r['metrics_bytes']:,} |"
                     f" {(r['metrics_bytes'] - empty_metrics) / n:,.0f} |")  # fmt: skip
    if tasks is not None:
        lines += [
            "",
            f"{tasks['tasks']:,} no-op tasks (`map`, then `gather`) on {rows[-1]['workers']:,}"
            f" workers: `map` {tasks['submit_s']:.2f} s, wall {tasks['wall_s']:.2f} s,"
            f" **{tasks['tasks_per_s']:,.0f} tasks/s**; {tasks['workers_used']:,} workers used"
            f" ({tasks['tasks_per_worker_min']}-{tasks['tasks_per_worker_max']} tasks each);"
            f" {tasks['transitions']:,} transitions = **{tasks['decisions_per_s']:,.0f}"
            f" decisions/s**; scheduler CPU {tasks['sched_cpu_pct']:.0f}% of a core, so"
            f" {tasks['decisions_per_cpu_s']:,.0f} decisions per scheduler CPU-second; CPU per"
            f" task: scheduler {tasks['sched_us_per_task']:.0f} us, worker hosts"
            f" {tasks['hosts_us_per_task']:.0f} us, client {tasks['client_us_per_task']:.0f} us;"
            f" up to {tasks['threads_per_host']} threads and"
            f" {tasks['host_rss_mib']:.0f} MiB RSS per host process.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
