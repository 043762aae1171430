"""What the dashboard costs the scheduler: its CPU with and without a page open.

    .venv/bin/python bench/bench_dashboard.py [--tasks 100000] [--phase 15] [--rounds 2]

A ``shoal scheduler`` process (dashboard on a free port) runs on this machine; the driver
submits ``--tasks`` tasks (each sleeps 2 ms) at once, and the scheduler holds all of them
(results stay wanted) for the whole run. The scheduler process's CPU time (user + system,
psutil) is measured over phases of ``--phase`` seconds:

1. before any worker joins (the scheduler holds the tasks and does nothing else): no page,
   then a page open. The difference is the page's own cost, measured cleanly.
2. with two ``shoal worker`` processes (1 thread each) running the tasks: ``--rounds`` times
   no page / page open, then a stress phase (the page, 4 more event streams at 4 snapshots
   a second, and /metrics scraped every second).

"A page open" is headless Chromium showing the dashboard (its live event stream: a snapshot
a second with the new task runs; the graph view declines to draw 100,000 tasks), or, without
Chromium, a client reading the same event stream. The overhead reported is the page's own
cost against the scheduler's CPU while it runs the tasks; the per-task comparison of the
busy phases is shown too (noisier on a shared machine). Target: under 5%.
dask.distributed's dashboard is not compared: it is a different (Bokeh) design.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil

import shoal


def work(i: int) -> int:
    time.sleep(0.002)
    return i


class Servers:
    """A scheduler and (`add_workers`) two worker processes, started with ``shoal``."""

    def __init__(self) -> None:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen[str]] = []
        self.scheduler = self._start(["scheduler", "--port", "0", "--dashboard-address", ":0",
                                      "--log-level", "warning"])  # fmt: skip
        lines = self._read_until(self.scheduler, r"listening at (\S+)")
        self.address = re.search(r"listening at (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        self.dashboard = next(re.search(r"dashboard at (\S+)", line).group(1)  # type: ignore[union-attr]
                              for line in lines if "dashboard at" in line)  # fmt: skip

    def add_workers(self, n: int = 2) -> None:
        for i in range(n):
            worker = self._start(["worker", self.address, "--nthreads", "1", "--name", f"w{i}",
                                  "--no-dashboard", "--log-level", "warning"])  # fmt: skip
            self._read_until(worker, r"listening at")

    def _start(self, args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], env=self.env,
                                text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        self.procs.append(proc)
        return proc

    @staticmethod
    def _read_until(proc: subprocess.Popen[str], pattern: str) -> list[str]:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if re.search(pattern, line):
                return lines
        raise RuntimeError(f"process exited before printing {pattern!r}: {lines}")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Browser:
    """Headless Chromium showing the dashboard (live event stream), until `close`."""

    def __init__(self, url: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="shoal-bench-chromium-")
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             "--window-size=1366,900", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Streams:
    """Clients reading the event stream (and optionally scraping /metrics) on threads."""

    def __init__(self, dashboard: str, streams: int, interval: float, scrape: float | None) -> None:
        self.stop = threading.Event()
        self.events = 0
        self.scrapes = 0
        self.threads = [threading.Thread(target=self._stream, daemon=True,
                                         args=(f"{dashboard}api/events?interval={interval}",))
                        for _ in range(streams)]  # fmt: skip
        if scrape is not None:
            self.threads.append(threading.Thread(target=self._scrape, args=(dashboard, scrape),
                                                 daemon=True))  # fmt: skip
        for t in self.threads:
            t.start()

    def _stream(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as r:
            while not self.stop.is_set():
                line = r.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    self.events += 1

    def _scrape(self, dashboard: str, every: float) -> None:
        while not self.stop.wait(every):
            with urllib.request.urlopen(dashboard + "metrics", timeout=30) as r:
                r.read()
            self.scrapes += 1

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def runs_so_far(dashboard: str) -> int:
    with urllib.request.urlopen(dashboard + "api/task-stream?limit=0", timeout=30) as r:
        return int(json.loads(r.read())["next"])


def held(dashboard: str) -> int:
    with urllib.request.urlopen(dashboard + "api/info", timeout=30) as r:
        return int(json.loads(r.read())["tasks"])


def measure(proc: psutil.Process, dashboard: str, seconds: float) -> dict[str, float]:
    runs0, held0 = runs_so_far(dashboard), held(dashboard)
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
    runs1 = runs_so_far(dashboard)
    runs = runs1 - runs0
    return {"cpu": (cpu1 - cpu0) / (t1 - t0), "runs": runs, "rate": runs / (t1 - t0),
            "held": (held0 + held(dashboard)) / 2,
            "per_1k": 1e6 * (cpu1 - cpu0) / runs if runs else float("nan")}  # fmt: skip


def has_chromium() -> bool:
    return bool(shutil.which("chromium") or shutil.which("chromium-browser"))


class Page:
    """The dashboard open: headless Chromium, or an event-stream client standing in."""

    def __init__(self, dashboard: str) -> None:
        self.browser = Browser(dashboard) if has_chromium() else None
        self.streams = None if self.browser else Streams(dashboard, 1, 1.0, None)
        time.sleep(2.0)  # it loads and opens its event stream

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self.streams is not None:
            self.streams.close()


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--phase", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="no page / page rounds while running")
    args = parser.parse_args()
    page_kind = "headless Chromium" if has_chromium() else "an event-stream client"
    others = psutil.cpu_percent(interval=1.0)

    servers = Servers()
    idle: list[tuple[str, dict[str, float]]] = []
    running: list[tuple[str, dict[str, float], str]] = []
    try:
        proc = psutil.Process(servers.scheduler.pid)
        with shoal.Client(servers.address) as client:
            start = time.monotonic()
            futures = client.map(work, range(args.tasks), pure=False)
            client.scheduler_info()  # the submission has been handled
            submit_s = time.monotonic() - start
            time.sleep(1.0)

            # 1. The scheduler holds the tasks, no worker yet: the page's cost alone.
            idle.append(("no page", measure(proc, servers.dashboard, args.phase)))
            page = Page(servers.dashboard)
            idle.append((f"page open ({page_kind})", measure(proc, servers.dashboard, args.phase)))
            page.close()

            # 2. Workers run the tasks: the page against the scheduler's busy CPU.
            servers.add_workers(2)
            time.sleep(2.0)
            for _ in range(args.rounds):
                running.append(("no page", measure(proc, servers.dashboard, args.phase), ""))
                page = Page(servers.dashboard)
                running.append((f"page open ({page_kind})",
                                measure(proc, servers.dashboard, args.phase), ""))  # fmt: skip
                page.close()
            page = Page(servers.dashboard)
            streams = Streams(servers.dashboard, 4, 0.25, 1.0)
            time.sleep(1.0)
            m = measure(proc, servers.dashboard, args.phase)
            running.append(("stress: page + 4 streams at 4/s + /metrics every 1 s", m,
                            f"{streams.events} events, {streams.scrapes} scrapes"))  # fmt: skip
            streams.close()
            page.close()
            left = sum(1 for f in futures if not f.done())
            client.cancel(futures)
            del futures
    finally:
        servers.close()

    page_cost = idle[1][1]["cpu"] - idle[0][1]["cpu"]  # CPU seconds per second
    quiet = [m for name, m, _ in running if name == "no page"]
    loud = [m for name, m, _ in running if name.startswith("page open")]
    busy = statistics.mean(m["cpu"] for m in quiet)
    per_task_quiet = statistics.mean(m["per_1k"] for m in quiet)
    per_task_page = statistics.mean(m["per_1k"] for m in loud)

    print(f"- date: {time.strftime('%a %b %d %H:%M:%S %Z %Y')}; machine: {platform.machine()},"
          f" {psutil.cpu_count()} logical CPUs, {others:.0f}% busy with other work before the"
          f" run; Python {platform.python_version()}")  # fmt: skip
    print(f"- {args.tasks:,} tasks (2 ms sleeps) submitted in {submit_s:.1f} s and held by the"
          f" scheduler throughout; phases of {args.phase:.0f} s; {left:,} still pending at the"
          f" end (cancelled); the page: {page_kind}")  # fmt: skip
    print()
    print("Scheduler holding the tasks, no worker yet (the page's own cost):")
    print()
    table(["phase", "scheduler CPU (ms/s)"],
          [[name, f"{1000 * m['cpu']:.1f}"] for name, m in idle])
    print()
    print("Workers running the tasks:")
    print()
    table(["phase", "scheduler CPU (% of a core)", "tasks run/s", "CPU ms per 1,000 tasks", "note"],
          [[name, f"{100 * m['cpu']:.1f}", f"{m['rate']:,.0f}", f"{m['per_1k']:.1f}", note]
           for name, m, note in running])  # fmt: skip
    print()
    share = page_cost / busy if busy else float("nan")
    print(f"A page open costs the scheduler {1000 * page_cost:.1f} ms of CPU per second:"
          f" {100 * share:.1f}% of its CPU while it runs {statistics.mean(m['rate'] for m in quiet):,.0f}"
          f" tasks/s ({100 * busy:.1f}% of a core). Measured per task run while busy:"
          f" {100 * (per_task_page / per_task_quiet - 1):+.1f}% (noisier). Target < 5%:"
          f" {'met' if share < 0.05 else 'NOT MET'}.")  # fmt: skip


if __name__ == "__main__":
    main()
