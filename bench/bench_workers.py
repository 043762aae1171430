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
  reads: bytes (``rchar`` of /proc/PID/io: every byte the process read with read(), which
  is how its uvloop reads sockets) and read calls per second, and heartbeats per second as
  the workers counted them;
  per-worker figures must stay flat from 100 to 1,000 workers;
- /metrics: the size of the scheduler's Prometheus output, per worker;
- tasks (at the largest size): a client ``map``s ``--tasks`` no-op tasks that return the
  address of the worker that ran them, and gathers them: wall time, tasks/s, workers used
  (target: every one), and the scheduler's decisions per second: its task state
  transitions (``shoal_transitions_total`` of /metrics) over the wall time; CPU per task of
  the scheduler, the worker hosts and the client (which the machine's load moves less);
- the peer (``--dask N``, if dask.distributed is installed): its scheduler process with N
  dask workers hosted the same way, many per process on one event loop: join time, idle
  scheduler CPU, tasks/s and scheduler CPU per task.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import threading
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


# ------------------------------------------------------- the peer: dask.distributed


async def _dask_host(address: str, n: int) -> None:
    """Host ``n`` dask workers on this event loop (as ManyWorkers does for shoal); close them
    when stdin closes."""
    import asyncio

    from distributed import Worker

    gate = asyncio.Semaphore(64)

    async def one(i: int) -> Any:
        async with gate:
            return await Worker(address, nthreads=1, dashboard=False, memory_limit=0,
                                name=f"dask-{os.getpid()}-{i}")  # fmt: skip

    workers = await asyncio.gather(*(one(i) for i in range(n)))
    print("ready", flush=True)
    stdin_closed = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stdin_closed.set)
    await stdin_closed.wait()
    await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


def dask_figures(n: int, processes: int, n_tasks: int, idle: float) -> dict[str, Any] | None:
    """The same measures for dask.distributed: its scheduler process and ``n`` workers hosted
    the same way. None when dask.distributed is not installed."""
    try:
        import distributed
    except ImportError:
        return None
    env = dict(os.environ)
    # Each dask worker reads the process's CPU times every 0.5 s (cost in proportion to the
    # process's threads): hosting hundreds per process, that swamped the hosts. Every 5 s.
    env["DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL"] = "5s"
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                              "127.0.0.1", "--port", "0", "--no-dashboard"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    hosts: list[subprocess.Popen[str]] = []
    try:
        assert sched.stderr is not None
        address = ""
        for line in sched.stderr:
            match = re.search(r"Scheduler at:\s+(\S+)", line)
            if match:
                address = match.group(1)
                break
        threading.Thread(target=sched.stderr.read, daemon=True).start()  # never a full pipe
        start = time.monotonic()
        shares = [n // processes + (i < n % processes) for i in range(processes)]
        hosts = [subprocess.Popen([sys.executable, __file__, "--dask-host", address, str(k)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env)
                 for k in shares]  # fmt: skip
        for host in hosts:
            assert host.stdout is not None
            if host.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a dask worker host exited with {host.wait()}")
        join = time.monotonic() - start
        proc = psutil.Process(sched.pid)
        time.sleep(5)  # heartbeats reach their pace (dask spaces them by cluster size)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        # (Not its traffic: its loop reads sockets with recv(), which /proc/PID/io does not
        # count, unlike the read() of shoal's uvloop.)
        row: dict[str, Any] = {"version": distributed.__version__, "workers": n,
                               "join_s": join, "sched_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0)}  # fmt: skip
        if n_tasks:
            row.update(_dask_tasks(address, proc, n_tasks))
        return row
    finally:
        for host in hosts:
            if host.stdin is not None:
                host.stdin.close()
        for host in hosts:
            try:
                host.wait(60)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait()
        sched.terminate()
        try:
            sched.wait(30)
        except subprocess.TimeoutExpired:
            sched.kill()
            sched.wait()


def _dask_tasks(address: str, proc: psutil.Process, n_tasks: int) -> dict[str, Any]:
    from distributed import Client

    def where(i: int) -> str:
        from distributed import get_worker

        return str(get_worker().address)

    def transitions(dask_scheduler: Any) -> int:
        return int(dask_scheduler.transition_counter)

    with Client(address, timeout=60) as client:
        client.gather(client.map(where, range(100), pure=False))
        before, cpu0 = client.run_on_scheduler(transitions), sum(proc.cpu_times()[:2])
        start = time.perf_counter()
        ran_on = client.gather(client.map(where, range(n_tasks), pure=False))
        wall = time.perf_counter() - start
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        made = client.run_on_scheduler(transitions) - before
    return {"tasks": n_tasks, "wall_s": wall, "tasks_per_s": n_tasks / wall,
            "workers_used": len(set(ran_on)), "transitions": made,
            "decisions_per_s": made / wall, "sched_us_per_task": 1e6 * cpu / n_tasks}  # fmt: skip


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
    parser.add_argument("--tasks-at-every-size", action="store_true",
                        help="run the tasks at every size, not only the largest")
    parser.add_argument("--dask", type=int, default=100,
                        help="workers for the dask.distributed comparison (0: none)")
    parser.add_argument("--dask-tasks", type=int, default=5000)
    parser.add_argument("--dask-host", nargs=2, metavar=("ADDRESS", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--write-results", action="store_true",
                        help="append the figures to bench/RESULTS.md")  # fmt: skip
    args = parser.parse_args()
    if args.dask_host:
        import asyncio

        asyncio.run(_dask_host(args.dask_host[0], int(args.dask_host[1])))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    idle_rows: list[dict[str, Any]] = []
    tasks_rows: list[dict[str, Any]] = []
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
                if args.tasks and (args.tasks_at_every_size or n == sizes[-1]):
                    tasks_row = run_tasks(probe, mw, scheduler.address, args.tasks)
                    hosts = mw.stats()
                    tasks_row["workers"] = n
                    tasks_row["threads_per_host"] = max(s["threads"] for s in hosts)
                    tasks_row["host_rss_mib"] = max(s["rss"] for s in hosts) / 2**20
                    tasks_rows.append(tasks_row)
                    print_tasks(tasks_row, n)
            wait_until(lambda: _workers_listed(probe) == 0,
                       timeout=60, message="the scheduler dropped the workers")  # fmt: skip
    dask_row = None
    if args.dask:
        dask_row = dask_figures(args.dask, args.processes, args.dask_tasks, args.idle)
        print(f"dask.distributed: {dask_row}" if dask_row else "dask.distributed: not installed",
              flush=True)  # fmt: skip
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=HERE,
                           check=False).stdout.strip()  # fmt: skip
    report = markdown(started, commit, bool(dirty), load_before, load_after, args, idle_rows,
                      tasks_rows, empty_metrics, dask_row)  # fmt: skip
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
             tasks_rows: list[dict[str, Any]], empty_metrics: int,
             dask: dict[str, Any] | None) -> str:  # fmt: skip
    lines = [
        (f"### Run of {started:%Y-%m-%d %H:%M} UTC, commit {commit}"
         f"{' (with uncommitted changes of others in the checkout)' if dirty else ''}"),
        "",
        (f"`bench/bench_workers.py --sizes {args.sizes} --tasks {args.tasks} --idle {args.idle:g}"
         f"{' --tasks-at-every-size' if args.tasks_at_every_size else ''}"
         f"{f' --dask {args.dask} --dask-tasks {args.dask_tasks}' if args.dask else ' --dask 0'}"
         f"{f' --shared-threads {args.shared_threads}' if args.shared_threads else ''}`:"
         f" {os.cpu_count()} cores shared with other engineers' runs, load average"
         f" {load_before[0]:.2f} before, {load_after[0]:.2f} after; {args.processes} host"
         f" processes, heartbeat every {args.heartbeat_interval:g} s, "
         + (f"a pool of {args.shared_threads} threads per host shared by its workers."
            if args.shared_threads else "a task thread per worker.")),
        "",
        ("| workers | join s | scheduler CPU % (idle) | heartbeats/s | per worker | scheduler"
         " reads B/s | B per heartbeat | read calls/s | /metrics B | /metrics B per worker |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        n = r["workers"]
        lines.append(f"| {n:,} | {r['join_s']:.2f} | {r['sched_cpu_pct']:.2f} |"
                     f" {r['heartbeats_per_s']:,.0f} | {r['heartbeats_per_s'] / n:.2f} |"
                     f" {r['read_bytes_per_s']:,.0f} | {r['bytes_per_heartbeat']:.1f} |"
                     f" {r['read_calls_per_s']:,.0f} | {r['metrics_bytes']:,} |"
                     f" {(r['metrics_bytes'] - empty_metrics) / n:,.0f} |")  # fmt: skip
    if tasks_rows:
        lines += [
            "",
            (f"{tasks_rows[0]['tasks']:,} no-op tasks (`map`, then `gather`) returning the"
             " address of the worker that ran them:"),
            "",
            ("| workers | `map` s | wall s | tasks/s | workers used | tasks per worker |"
             " transitions/s | scheduler CPU % | transitions per scheduler CPU-s | CPU us per"
             " task: scheduler / worker hosts / client | threads, MiB per host |"),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for t in tasks_rows:
            lines.append(
                f"| {t['workers']:,} | {t['submit_s']:.2f} | {t['wall_s']:.2f} |"
                f" **{t['tasks_per_s']:,.0f}** | {t['workers_used']:,} |"
                f" {t['tasks_per_worker_min']}-{t['tasks_per_worker_max']} |"
                f" **{t['decisions_per_s']:,.0f}** | {t['sched_cpu_pct']:.0f} |"
                f" {t['decisions_per_cpu_s']:,.0f} | {t['sched_us_per_task']:.0f} /"
                f" {t['hosts_us_per_task']:.0f} / {t['client_us_per_task']:.0f} |"
                f" {t['threads_per_host']}, {t['host_rss_mib']:.0f} |")  # fmt: skip
    if dask is not None:
        shoal_row = next((r for r in rows if r["workers"] == dask["workers"]), None)
        lines += [
            "",
            f"dask.distributed {dask['version']}, {dask['workers']} workers hosted the same way"
            f" (system monitor every 5 s): join {dask['join_s']:.2f} s; idle scheduler CPU"
            f" {dask['sched_cpu_pct']:.2f}%"
            + (f" (shoal {shoal_row['sched_cpu_pct']:.2f}%)" if shoal_row else "")
            + " (dask spaces heartbeats by cluster size: every 2 s at 100 workers, 6 s at"
            " 1,000)"
            + (f"; {dask['tasks']:,} tasks: {dask['tasks_per_s']:,.0f} tasks/s,"
               f" {dask['workers_used']} workers used, {dask['decisions_per_s']:,.0f}"
               f" transitions/s, scheduler CPU {dask['sched_us_per_task']:.0f} us per task"
               if "tasks" in dask else "") + ".",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
