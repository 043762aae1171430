"""A real cluster whose scheduler is SIGKILLed and restarted on its journal (tests, bench).

``shoal scheduler --journal`` and ``shoal worker`` processes on loopback, a fixed port (the
restarted scheduler must be at the same address), and a dependent graph whose every task
run is counted in a file (to count recomputations).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle

import shoal
from shoal.testing import ShoalProcess

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODULUS = 1_000_003


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _note(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x\n")
    finally:
        os.close(fd)


def leaf(i: int, tally: str) -> int:
    _note(tally)
    return (i * 7919 + 17) % MODULUS


def combine(a: int, b: int, pause: float, tally: str) -> int:
    _note(tally)
    if pause:
        time.sleep(pause)
    return (a * 31 + b) % MODULUS


def total(values: list[int], tally: str) -> int:
    _note(tally)
    return sum(values)


def expected(width: int, depth: int) -> int:
    layer = [(i * 7919 + 17) % MODULUS for i in range(width)]
    for _ in range(depth - 1):
        layer = [(layer[j] * 31 + layer[(j + 1) % width]) % MODULUS for j in range(width)]
    return sum(layer)


def submit_graph(client: shoal.Client, width: int, depth: int, pause: float,
                 tally: str) -> tuple[list[shoal.Future], shoal.Future]:  # fmt: skip
    """width x depth dependent tasks and their sum; the client holds every future."""
    layer = client.map(leaf, range(width), tally=tally)
    futures = list(layer)
    for _ in range(depth - 1):
        layer = [client.submit(combine, layer[j], layer[(j + 1) % width], pause, tally)
                 for j in range(width)]  # fmt: skip
        futures += layer
    final = client.submit(total, layer, tally)
    return futures, final


def count_runs(tally: str) -> int:
    try:
        with open(tally, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class RestartableCluster:
    """A journaled scheduler (killed and restarted at will) and worker processes."""

    def __init__(self, directory: Path, n_workers: int = 3, nthreads: int = 2,
                 fsync_interval: float = 0.05, restart_grace: float = 30.0,
                 journal: bool = True) -> None:  # fmt: skip
        self.directory = directory
        self.journal = directory / "scheduler.journal"
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.fsync_interval = fsync_interval
        self.restart_grace = restart_grace
        self.use_journal = journal
        self.scheduler: ShoalProcess | None = None
        self.workers: list[ShoalProcess] = []
        self.dead: list[ShoalProcess] = []

    def _spawn(self, args: list[str], what: str) -> ShoalProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SHOAL_TOKEN", None)
        proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        return ShoalProcess(proc, what)

    def start_scheduler(self, timeout: float = 30.0) -> float:
        """Start (or restart) the scheduler on the journal; returns the seconds it took."""
        started = time.monotonic()
        journal = (["--journal", str(self.journal), "--journal-fsync-interval",
                    str(self.fsync_interval), "--restart-grace", str(self.restart_grace)]
                   if self.use_journal else [])  # fmt: skip
        self.scheduler = self._spawn(
            ["scheduler", "--port", str(self.port), *journal, "--no-dashboard",
             "--log-level", "warning"], "shoal scheduler")  # fmt: skip
        self.scheduler.wait_for_line(r"listening at (\S+)", timeout)
        return time.monotonic() - started

    def start_workers(self, timeout: float = 30.0) -> None:
        for i in range(self.n_workers):
            self.workers.append(self._spawn(
                ["worker", self.address, "--nthreads", str(self.nthreads), "--name", f"w{i}",
                 "--death-timeout", "120", "--log-level", "warning"], f"shoal worker w{i}"))
        for w in self.workers:
            w.wait_for_line(r"listening at (\S+)", timeout)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        os.kill(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.proc.wait(timeout=10)
        self.dead.append(self.scheduler)
        self.scheduler = None

    def close(self) -> None:
        """SIGTERM everything (the scheduler first: its journal keeps the workers)."""
        procs = ([self.scheduler] if self.scheduler is not None else []) + self.workers
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=10)
        self.workers.clear()
        self.scheduler = None

    def logs(self) -> str:
        out = []
        for p in ([self.scheduler] if self.scheduler else []) + self.dead + self.workers:
            out.append(f"--- {p.what} (pid {p.pid})\n" + "\n".join(p.stderr[-40:]))
        return "\n".join(out)
