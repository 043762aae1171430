"""Many lightweight workers in a few processes: a thousand workers on one machine.

Each worker is a real `shoal.worker.server.Worker` (its own listener, its own batched
connection to the scheduler, the real protocol over TCP) with one task thread; what makes
it light is what it does without: no dashboard, no memory monitor (no limit), and no
process of its own. All the workers of one host share one event loop::

    from shoal.testing.many_workers import ManyWorkers

    with ManyWorkers("tcp://127.0.0.1:8786", n=1000, processes=2) as mw:
        print(len(mw.addresses))        # 1000, every one registered with the scheduler
        print(mw.stats())               # threads, heartbeats sent, CPU of each host

``processes=0`` hosts them all in this process, on one event loop thread (tests can reach
the `Worker` objects through `ManyWorkers.workers`); ``processes=k`` spreads them over k
child processes (``python -m shoal.testing.many_workers``), each with one event loop.

Threads: by default every worker keeps its own pool, so it runs tasks on a thread of its
own (started on its first task, kept). ``shared_threads=k`` gives all the workers of a host
one pool of k threads instead; a task that secedes (waits on other tasks) keeps a thread
of that pool while it waits, so use it only for tasks that do not launch tasks.

A child process watches its stdin: when this process goes away (even killed), the pipe
closes and the child closes its workers and exits, so nothing outlives the helper.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import IO, Any

from ..utils.loop import LoopThread, run
from ..worker.server import Worker

__all__ = ["ManyWorkers", "WorkerHost", "host_stats"]

#: Workers of one host registering at once: enough to fill the scheduler's accept queue,
#: few enough that none waits out a connect timeout behind the others.
START_CONCURRENCY = 64


class WorkerHost:
    """``n`` workers on the running event loop; `start` them, `close` them."""

    def __init__(self, scheduler_address: str, n: int, *, name_prefix: str = "many",
                 token: str | None = None, heartbeat_interval: float = 0.5,
                 connect_timeout: float = 30.0, shared_threads: int = 0) -> None:  # fmt: skip
        if n < 1:
            raise ValueError(f"a WorkerHost needs at least one worker, not n={n}")
        if shared_threads < 0:
            raise ValueError(f"shared_threads must be 0 (a thread per worker) or more,"
                             f" not {shared_threads}")  # fmt: skip
        self.scheduler_address = scheduler_address
        self.n = n
        self.name_prefix = name_prefix
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        #: the pool all workers here share (None: each has its own)
        self.executor = (ThreadPoolExecutor(shared_threads, thread_name_prefix=
                                            f"shoal-{name_prefix}-shared")
                         if shared_threads else None)  # fmt: skip
        self.workers: list[Worker] = []

    async def start(self) -> list[str]:
        """Start every worker (a few at a time); returns their addresses. If one cannot
        join (or this is cancelled), the rest are stopped, all are closed, and the error
        raised."""
        gate = asyncio.Semaphore(START_CONCURRENCY)
        created: list[Worker] = []

        async def one(i: int) -> Worker:
            async with gate:
                worker = Worker(self.scheduler_address, nthreads=1,
                                name=f"{self.name_prefix}-{i}", token=self.token,
                                memory_limit=0, in_process=True,
                                heartbeat_interval=self.heartbeat_interval,
                                connect_timeout=self.connect_timeout,
                                executor=self.executor)  # fmt: skip
                created.append(worker)
                await worker.start()
            return worker

        tasks = [asyncio.ensure_future(one(i)) for i in range(self.n)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            error = failed[0].exception() if failed else None
            if error is not None:
                raise error
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.workers = created
            await self.close()
            raise
        self.workers = [t.result() for t in tasks]
        return [w.address for w in self.workers]

    async def close(self) -> None:
        await asyncio.gather(*(w.close("ManyWorkers closing") for w in self.workers),
                             return_exceptions=True)  # fmt: skip
        if self.executor is not None:
            # Like a worker's own pool: queued tasks are dropped, idle threads leave now,
            # and a thread still in a task leaves when it returns (nothing waits for it).
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def all_closed(self) -> None:
        """Wait until every worker has closed (the scheduler told them to, or `close`)."""
        await asyncio.gather(*(w.finished() for w in self.workers))

    def stats(self) -> dict[str, Any]:
        return host_stats(self.workers)


def host_stats(workers: list[Worker]) -> dict[str, Any]:
    """What one host's workers cost and sent: for benchmarks and scale tests."""
    import psutil

    proc = psutil.Process()
    cpu = proc.cpu_times()
    sent = [w.scheduler_traffic() for w in workers]
    return {
        "pid": os.getpid(),
        "workers": len(workers),
        "running": sum(w.status == "running" for w in workers),
        "threads": threading.active_count(),
        "cpu_seconds": cpu.user + cpu.system,
        "rss": proc.memory_info().rss,
        "heartbeats_sent": sum(s["heartbeats"] for s in sent),
        "messages_sent": sum(s["messages"] for s in sent),
        "batches_sent": sum(s["batches"] for s in sent),
    }


# ------------------------------------------------------------- a child process


async def _serve_child(args: argparse.Namespace) -> int:
    host = WorkerHost(args.scheduler, args.n, name_prefix=args.name_prefix,
                      token=os.environ.get("SHOAL_TOKEN") or None,
                      heartbeat_interval=args.heartbeat_interval,
                      connect_timeout=args.connect_timeout,
                      shared_threads=args.shared_threads)  # fmt: skip
    try:
        addresses = await host.start()
    except (OSError, asyncio.TimeoutError) as exc:
        _say("error", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _say("ready", {"addresses": addresses})
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    pending = b""

    def on_stdin() -> None:
        # Raw reads: a buffered readline could keep a second command where no wake-up sees it.
        nonlocal pending
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            commands.put_nowait("eof")
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            commands.put_nowait(line.decode().strip())

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    done = asyncio.ensure_future(host.all_closed())
    try:
        while not done.done():
            command = asyncio.ensure_future(commands.get())
            await asyncio.wait([command, done], return_when=asyncio.FIRST_COMPLETED)
            if not command.done():
                command.cancel()
                break
            if command.result() == "stats":
                _say("stats", host.stats())
            elif command.result() in ("eof", "close"):
                break
    finally:
        loop.remove_reader(sys.stdin.fileno())  # (False if it was removed at EOF)
        done.cancel()
        await host.close()
    return 0


def _say(kind: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.testing.many_workers",
                                     description="Host N lightweight shoal workers on one"
                                     " event loop; close them when stdin closes.")  # fmt: skip
    parser.add_argument("scheduler")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--name-prefix", default=f"many-{os.getpid()}")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--shared-threads", type=int, default=0)
    sys.exit(run(_serve_child(parser.parse_args(argv))))


# ----------------------------------------------------------------- the helper


class _Child:
    """A child process hosting workers, and the lines it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._drain, args=(proc.stdout, self.lines.put),
                             name=f"shoal-many-workers-out-{proc.pid}", daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, self._keep_stderr),
                             name=f"shoal-many-workers-err-{proc.pid}", daemon=True),
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    def _keep_stderr(self, line: str) -> None:
        self.stderr.append(line)
        del self.stderr[:-200]  # the latest lines are what explain a failure

    @staticmethod
    def _drain(stream: IO[str], put: Callable[[str], None]) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        stream.close()

    def expect(self, kind: str, deadline: float) -> dict[str, Any]:
        """The payload of the next line of ``kind``; raises if the child fails first."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker host {self.proc.pid} printed no {kind!r} line in"
                                   f" time (its workers did not all join):\n{self.tail()}")  # fmt: skip
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and not self._readers[0].is_alive():
                    raise RuntimeError(f"worker host {self.proc.pid} exited with code"
                                       f" {self.proc.returncode}:\n{self.tail()}") from None  # fmt: skip
                continue
            found, _, payload = line.partition(" ")
            if found == "error":
                raise ConnectionError(f"worker host {self.proc.pid}: "
                                      f"{json.loads(payload)['error']}")  # fmt: skip
            if found == kind:
                result: dict[str, Any] = json.loads(payload)
                return result

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        return "\n".join(self.stderr[-30:])

    def hang_up(self) -> None:
        """Close its stdin: it closes its workers and exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:  # it is gone already
                pass

    def stop(self, timeout: float) -> None:
        """`hang_up`, wait for the exit, and kill it after ``timeout``."""
        self.hang_up()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)


class ManyWorkers:
    """``n`` real workers joined to ``scheduler_address``, hosted ``n / processes`` per
    process on one event loop each (``processes=0``: in this process, on one loop thread).

    A context manager: entering starts them all and returns once each has registered with
    the scheduler (or raises after ``start_timeout`` seconds); leaving closes them.
    """

    def __init__(self, scheduler_address: str, n: int, *, processes: int = 0,
                 token: str | None = None, heartbeat_interval: float = 0.5,
                 start_timeout: float = 60.0, shared_threads: int = 0,
                 name_prefix: str = "many") -> None:  # fmt: skip
        if n < 1:
            raise ValueError(f"ManyWorkers needs at least one worker, not n={n}")
        if not 0 <= processes <= n:
            raise ValueError(f"processes must be 0 (this process) to n={n}, not {processes}")
        self.scheduler_address = scheduler_address
        self.n = n
        self.processes = processes
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.start_timeout = start_timeout
        self.shared_threads = shared_threads
        self.name_prefix = name_prefix
        #: every worker's address, once started
        self.addresses: list[str] = []
        #: seconds from the first start to the last worker registered
        self.start_seconds = 0.0
        self._loop: LoopThread | None = None
        self._host: WorkerHost | None = None
        self._children: list[_Child] = []

    @property
    def workers(self) -> list[Worker]:
        """The `Worker` objects (``processes=0`` only; use them from the loop's thread)."""
        if self._host is None:
            raise RuntimeError("the workers live in child processes (processes > 0)")
        return self._host.workers

    def run_on_loop(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Call ``fn()`` on the workers' event loop (``processes=0``), and return its result."""
        if self._loop is None:
            raise RuntimeError("the workers live in child processes (processes > 0)")

        async def call() -> Any:
            return fn()

        return self._loop.run(call(), timeout)

    def start(self) -> ManyWorkers:
        begin = time.monotonic()
        try:
            if self.processes == 0:
                self._start_here()
            else:
                # The workers' own connect timeout comes first, naming the scheduler.
                self._start_children(begin + self.start_timeout + 10)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - begin
        return self

    def _start_here(self) -> None:
        self._loop = LoopThread(name=f"shoal-{self.name_prefix}-loop")
        self._host = WorkerHost(self.scheduler_address, self.n, name_prefix=self.name_prefix,
                                token=self.token, heartbeat_interval=self.heartbeat_interval,
                                connect_timeout=self.start_timeout,
                                shared_threads=self.shared_threads)  # fmt: skip
        try:
            # The workers' own connect timeout comes first, naming the scheduler.
            self.addresses = self._loop.run(self._host.start(), self.start_timeout + 10)
        except TimeoutError:
            raise TimeoutError(f"{self.n} workers did not all join {self.scheduler_address}"
                               f" within {self.start_timeout + 10}s") from None  # fmt: skip

    def _start_children(self, deadline: float) -> None:
        env = dict(os.environ)
        env.pop("SHOAL_TOKEN", None)
        if self.token is not None:
            env["SHOAL_TOKEN"] = self.token  # not on the command line, where ps shows it
        shares = [self.n // self.processes + (i < self.n % self.processes)
                  for i in range(self.processes)]  # fmt: skip
        for i, share in enumerate(shares):
            args = [sys.executable, "-m", "shoal.testing.many_workers", self.scheduler_address,
                    "--n", str(share), "--name-prefix", f"{self.name_prefix}{i}",
                    "--heartbeat-interval", str(self.heartbeat_interval),
                    "--connect-timeout", str(self.start_timeout),
                    "--shared-threads", str(self.shared_threads)]  # fmt: skip
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
            self._children.append(_Child(proc))
        for child in self._children:
            self.addresses.extend(child.expect("ready", deadline)["addresses"])

    def stats(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each host's figures: its workers, threads, CPU seconds, RSS, heartbeats sent."""
        if self._loop is not None:
            return [self.run_on_loop(lambda: host_stats(self.workers), timeout)]
        deadline = time.monotonic() + timeout
        for child in self._children:
            child.tell("stats")
        return [child.expect("stats", deadline) for child in self._children]

    def close(self, timeout: float = 60.0) -> None:
        """Close every worker (each host's at once); child processes get ``timeout``
        seconds to exit before they are killed."""
        if self._loop is not None:
            try:
                if self._host is not None:
                    self._loop.run(self._host.close(), timeout)
            finally:
                self._loop.stop()
                self._loop = None
        children, self._children = self._children, []
        for child in children:
            child.hang_up()  # all at once: each closes its workers while the others do
        deadline = time.monotonic() + timeout
        for child in children:
            child.stop(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> ManyWorkers:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


if __name__ == "__main__":
    main()
