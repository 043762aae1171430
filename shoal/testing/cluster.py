"""Real clusters for tests: an embedded one that fails on leaks, and `shoal` processes.

`gen_cluster` yields a synchronous `Client` on a fresh `LocalCluster`; on the way out it
closes everything and fails the test (``AssertionError`` naming what is left) if the body
ran over its time limit or left threads, child processes or listening TCP ports behind::

    from shoal.testing import gen_cluster

    def test_sum() -> None:
        with gen_cluster(n_workers=2) as client:
            assert client.submit(sum, [1, 2]).result() == 3

`no_leaks` is the leak check on its own. `spawn_scheduler` and `spawn_worker` start the real
``shoal scheduler`` / ``shoal worker`` commands as subprocesses, read the address they print,
and on the way out stop them with SIGTERM and check they exit cleanly (code 0).
`wait_until` polls a condition with a deadline, for tests that must never sleep and hope.
Tasks for tests: a `Gate` blocks until the test opens it; a `Tally` counts how often a task
ran, across threads and processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psutil

from ..client.client import Client

__all__ = [
    "ClusterTimeoutError",
    "Gate",
    "ShoalProcess",
    "Tally",
    "gen_cluster",
    "no_leaks",
    "spawn_scheduler",
    "spawn_worker",
    "wait_until",
]


class ClusterTimeoutError(AssertionError):
    """The body of `gen_cluster` ran longer than its ``timeout``."""


# ------------------------------------------------------------------------ polling


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; raise
    ``AssertionError`` naming ``message`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} did not hold within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


# ------------------------------------------------------------------- test tasks

_GATES: dict[str, threading.Event] = {}


class Gate:
    """A task function that blocks until the test calls `open`: ``client.submit(gate, x)``
    returns ``x`` once the gate is open. It gives up (raising ``TimeoutError``) after
    ``max_wait`` seconds, so a forgotten gate cannot hang a worker thread forever.

    In-process workers only (``processes=False``): the event lives in this process; what is
    pickled is the gate's name. Call `close` (it opens the gate) when the test ends.
    """

    __name__ = "gate"  # the prefix of its tasks' keys

    def __init__(self, max_wait: float = 60.0) -> None:
        self.name = uuid.uuid4().hex
        self.max_wait = max_wait
        _GATES[self.name] = threading.Event()

    def __call__(self, value: Any = None) -> Any:
        event = _GATES.get(self.name)
        if event is None:
            raise RuntimeError("this Gate is closed, or was pickled into another process")
        if not event.wait(self.max_wait):
            raise TimeoutError(f"the gate was not opened within {self.max_wait}s")
        return value

    def open(self) -> None:
        _GATES[self.name].set()

    def close(self) -> None:
        event = _GATES.pop(self.name, None)
        if event is not None:
            event.set()


def _recorder(path: str) -> Callable[[Any], Any]:
    def record(value: Any) -> Any:
        with open(path, "a") as f:
            f.write(f"{value}\n")
        return value

    return record  # a closure: cloudpickle sends it by value, so worker processes get it


class Tally:
    """Counts task runs in a file that tasks append to: ``client.submit(tally.record, v)``
    notes ``v`` (one line per run) and returns it; `count` and `lines` read the file.
    Works across threads and worker processes on this machine. The caller owns ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.touch()
        self.record = _recorder(str(self.path))

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def count(self, value: object = None) -> int:
        """How many runs noted ``value`` (every run if it is None)."""
        return len([x for x in self.lines() if value is None or x == str(value)])


# ---------------------------------------------------------------------- leak check


class _Resources:
    """What this process owns that a test could leak: threads, children, listening ports."""

    def __init__(self, threads: set[threading.Thread], children: dict[int, str],
                 ports: set[tuple[str, int]]) -> None:  # fmt: skip
        self.threads = threads
        self.children = children
        self.ports = ports

    @classmethod
    def now(cls) -> _Resources:
        me = psutil.Process()
        children: dict[int, str] = {}
        for child in me.children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:  # exited; just not reaped yet
                    children[child.pid] = " ".join(child.cmdline()) or child.name()
            except psutil.Error:  # exited while we looked
                pass
        ports = {(c.laddr.ip, c.laddr.port) for c in me.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}  # fmt: skip
        threads = {t for t in threading.enumerate() if t.is_alive()}
        return cls(threads, children, ports)

    def leaked_since(self, before: _Resources) -> list[str]:
        problems = []
        threads = sorted(t.name for t in self.threads - before.threads)
        if threads:
            problems.append(f"threads {threads}")
        children = [f"{p} ({c})" for p, c in self.children.items() if p not in before.children]
        if children:
            problems.append("child processes " + ", ".join(children))
        ports = sorted(self.ports - before.ports)
        if ports:
            problems.append("listening ports " + ", ".join(f"{h}:{p}" for h, p in ports))
        return problems


@contextmanager
def no_leaks(timeout: float = 10.0) -> Iterator[None]:
    """Fail if the block leaves new threads, child processes or listening TCP ports.

    Things that are shutting down get up to ``timeout`` seconds to go (polled). The check
    is skipped when the block raised, so that the original error is what the test shows.
    """
    before = _Resources.now()
    yield
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        problems = _Resources.now().leaked_since(before)
        if not problems:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"leaked after {timeout}s of waiting: " + "; ".join(problems))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


@contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise `ClusterTimeoutError` in the block once it has run ``seconds``.

    In the main thread a SIGALRM timer interrupts even a blocked wait; an outer timer (e.g.
    pytest-timeout's) is put back with its remaining time, and if it would fire first it is
    left alone. Elsewhere the limit is checked when the block ends.
    """
    start = time.monotonic()

    def check_elapsed() -> None:
        elapsed = time.monotonic() - start
        if elapsed > seconds:
            raise ClusterTimeoutError(f"{what} took {elapsed:.1f}s, over its {seconds}s limit")

    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL) if usable else (0.0, 0.0)
    if not usable or (outer_delay and outer_delay <= seconds):
        yield
        check_elapsed()
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise ClusterTimeoutError(f"{what} did not finish within {seconds}s")

    outer_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_delay:
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), outer_interval)


# ------------------------------------------------------------------ embedded cluster


@contextmanager
def gen_cluster(
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = False,
    timeout: float = 30.0,
    leak_timeout: float = 10.0,
    **client_kwargs: Any,
) -> Iterator[Client]:
    """A synchronous `Client` on a fresh `LocalCluster` that must leave nothing behind.

    Fails with ``AssertionError`` if the body runs longer than ``timeout`` seconds, or if
    after closing there remain threads, child processes or listening ports that were not
    there before (``leak_timeout`` seconds are allowed for them to go). ``client_kwargs``
    go to `Client` (e.g. ``token``) or on to `LocalCluster`.
    """
    with no_leaks(leak_timeout):
        client = Client(n_workers=n_workers, threads_per_worker=threads_per_worker,
                        processes=processes, **client_kwargs)  # fmt: skip
        try:
            with _time_limit(timeout, f"the body of gen_cluster (n_workers={n_workers})"):
                yield client
        finally:
            client.close(timeout=30)


# ------------------------------------------------------------------- real processes


class ShoalProcess:
    """A running ``shoal`` command: its `address`, its `proc`, and what it has printed."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.what = what
        self.address = ""
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._drain, args=(proc.stdout, self.stdout),
                             name=f"shoal-testing-stdout-{proc.pid}", daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, self.stderr),
                             name=f"shoal-testing-stderr-{proc.pid}", daemon=True),
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain(self, stream: IO[str], lines: list[str]) -> None:
        # Read everything, so that a chatty process never blocks on a full pipe.
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line of stdout matching ``pattern``; fails if none comes in time or the
        process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stdout:
                    match = regex.search(line)
                    if match:
                        return match
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise AssertionError(
                        f"{self.what} exited with code {self.proc.returncode} before printing"
                        f" {pattern!r}:\n{self._unlocked_output()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.what} printed no line matching {pattern!r} within {timeout}s:"
                        f"\n{self._unlocked_output()}"
                    )
                self._changed.wait(min(left, 0.1))

    def _unlocked_output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit; fails unless it exits with code 0 in time."""
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"{self.what} did not exit within {timeout}s of signal"
                    f" {signal.Signals(sig).name}; killed it:\n{self.output()}"
                ) from None
        self._join_readers()
        assert code == 0, f"{self.what} exited with code {code}:\n{self.output()}"
        return code

    def kill(self) -> None:
        """SIGKILL and reap; for cleaning up after a failure."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._join_readers()

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)


def _shoal_command(args: list[str], what: str, token: str | None,
                   env: dict[str, str] | None) -> ShoalProcess:  # fmt: skip
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.pop("SHOAL_TOKEN", None)  # only an explicit token counts
    if token is not None:
        args = [*args, "--token", token]
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)  # fmt: skip
    return ShoalProcess(proc, what)


@contextmanager
def _running(process: ShoalProcess, pattern: str, start_timeout: float) -> Iterator[ShoalProcess]:
    try:
        process.address = process.wait_for_line(pattern, start_timeout).group(1)
    except BaseException:
        process.kill()
        raise
    try:
        yield process
    except BaseException:
        if process.proc.poll() is None:
            process.proc.terminate()
            try:
                process.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        raise
    process.stop()


@contextmanager
def spawn_scheduler(port: int = 0, host: str = "127.0.0.1", token: str | None = None,
                    start_timeout: float = 30.0, extra_args: list[str] | None = None,
                    env: dict[str, str] | None = None) -> Iterator[ShoalProcess]:  # fmt: skip
    """Run ``shoal scheduler`` in a subprocess; yields it once it prints its address.

    On the way out it gets SIGTERM and must exit with code 0 (unless the test already
    stopped it with `ShoalProcess.stop`).
    """
    args = ["scheduler", "--host", host, "--port", str(port), *(extra_args or [])]
    process = _shoal_command(args, "shoal scheduler", token, env)
    with _running(process, r"listening at (\S+)", start_timeout) as running:
        yield running


@contextmanager
def spawn_worker(scheduler_address: str, nthreads: int = 1, name: str | None = None,
                 token: str | None = None, start_timeout: float = 30.0,
                 extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> Iterator[ShoalProcess]:  # fmt: skip
    """Run ``shoal worker SCHEDULER_ADDRESS`` in a subprocess; yields it once it prints its
    address (it has joined the scheduler by then). Stopped like `spawn_scheduler`."""
    args = ["worker", scheduler_address, "--nthreads", str(nthreads), *(extra_args or [])]
    if name is not None:
        args += ["--name", name]
    process = _shoal_command(args, f"shoal worker {name or ''}".rstrip(), token, env)
    with _running(process, r"listening at (\S+)", start_timeout) as running:
        yield running
