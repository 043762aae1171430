"""A worker's supervisor: it starts the worker process and starts a new one when it dies.

A `Nanny` (asyncio) owns one `subprocess.Popen` running `shoal.cluster.worker_process`,
with a lifeline on its stdin (the worker exits when the nanny goes, even killed) and a pipe
on which the worker writes its address once it has joined the scheduler. Every
``poll_interval`` it looks at the process:

- exit code 0: the worker closed on purpose (the scheduler closed it, it lost the scheduler,
  or it was told to stop): the nanny is done too;
- ``RESTART_EXIT_CODE`` (of `shoal.cluster.worker_process`): the scheduler asked for a
  restart: a new worker starts at once;
- any other end (a signal, an exit code) is a death: the nanny notes why (a `WorkerDeath`)
  and starts a new worker after a short backoff, passing the death on
  (``--previous-death``) so that the new worker tells the scheduler, which keeps a list
  (`Client.worker_deaths`). After ``max_deaths`` deaths within ``death_window`` seconds
  it gives up (``status`` "failed");
- its RSS above the terminate fraction of the memory limit: the nanny kills it, and the
  death's reason is "memory: RSS x of limit y".

The nanny also owns the worker's spill directory, so that files a killed worker leaves are
removed before the next one starts, and the directory when the nanny closes.

``shoal worker`` runs one nanny in its process; `LocalCluster` runs one per worker process,
all on the cluster's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Literal

import psutil

from ..security.credentials import Security
from ..worker.memory import MemoryFractions, format_bytes
from ..protocol.messages import WorkerDeath

logger = logging.getLogger("shoal.nanny")

#: ``MALLOC_TRIM_THRESHOLD_`` for worker processes (unless set already), as dask's nanny does.
MALLOC_TRIM_THRESHOLD = 65536

NannyStatus = Literal["created", "starting", "running", "restarting", "closing", "closed",
                      "failed"]  # fmt: skip


class WorkerStartError(RuntimeError):
    """The worker process ended, or stayed silent, before it joined the scheduler."""


def _restart_exit_code() -> int:
    # Imported late: `python -m shoal.cluster.worker_process` must find it not yet imported.
    from .worker_process import RESTART_EXIT_CODE

    return RESTART_EXIT_CODE


def death_reason(returncode: int) -> str:
    """``-9`` -> "signal SIGKILL", ``3`` -> "exit code 3"."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Nanny:
    """Runs one worker process and keeps it running (see the module's docstring).

    ``await start()`` returns once the first worker joined the scheduler (or raises
    `WorkerStartError`); ``address`` is then the current worker's. `finished` waits until
    the nanny stops supervising; `close` stops the worker and the nanny.
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        name: str,
        nthreads: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        memory_limit: int = 0,
        memory_fractions: MemoryFractions | None = None,
        resources: dict[str, float] | None = None,
        worker_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        max_deaths: int = 10,
        death_window: float = 60.0,
        poll_interval: float = 0.1,
        on_start: Callable[[Nanny], None] | None = None,
        security: Security | None = None,
        insecure: bool = False,
    ) -> None:
        self.scheduler_address = scheduler_address
        #: the worker's TLS credentials, handed to each worker process as file paths
        self.security = security
        self.insecure = insecure
        self.name = name
        self.nthreads = nthreads
        self.host = host
        self.port = port
        self.token = token
        self.memory_limit = memory_limit
        self.memory_fractions = memory_fractions or MemoryFractions()
        self.resources = dict(resources or {})
        #: more arguments for `shoal.cluster.worker_process`
        self.worker_args = list(worker_args)
        self.env = env
        self.start_timeout = start_timeout
        self.max_deaths = max_deaths
        self.death_window = death_window
        self.poll_interval = poll_interval
        #: called each time a worker has started (the first one, and each new one)
        self.on_start = on_start
        #: the current worker's address
        self.address = ""
        self.proc: subprocess.Popen[bytes] | None = None
        #: every death seen, oldest first
        self.deaths: list[WorkerDeath] = []
        #: workers started after the first
        self.restarts = 0
        self.status: NannyStatus = "created"
        #: why the nanny gave up (status "failed")
        self.error = ""
        self.spill_directory = ""
        self._kill_reason: str | None = None
        self._restarting = True
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<Nanny {self.name} {self.status} worker={self.address or None} pid={pid}>"

    @property
    def pid(self) -> int | None:
        """The current worker process's id."""
        return self.proc.pid if self.proc is not None else None

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> Nanny:
        self.status = "starting"
        self.spill_directory = tempfile.mkdtemp(prefix=f"shoal-{self.name}-")
        try:
            await self._launch(None)
        except BaseException:
            await self.close()
            raise
        self.status = "running"
        self._supervisor = asyncio.ensure_future(self._supervise())
        return self

    async def finished(self) -> None:
        """Wait until the nanny stops: closed, its worker closed on purpose, or gave up."""
        await self._done.wait()

    def stop_restarting(self) -> None:
        """From now on, a worker that ends is not replaced (its cluster is closing)."""
        self._restarting = False

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (EOF on its lifeline, then SIGTERM, then SIGKILL) and the nanny."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        self._restarting = False
        if self.status not in ("failed", "closed"):
            self.status = "closing"
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        proc = self.proc
        if proc is not None:
            await _stop_process(proc, timeout)
        self._remove_spill_directory()
        if self.status != "failed":
            self.status = "closed"
        self._done.set()

    # --------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        try:
            while True:
                code = await self._watch()
                if self._closing or not self._restarting:
                    break
                if code == 0:
                    logger.info("worker %s (%s) closed; its nanny stops too", self.address,
                                self.name)  # fmt: skip
                    break
                if code == _restart_exit_code():
                    logger.info("worker %s (%s) exited to be restarted", self.address, self.name)
                    death = None
                else:
                    death = self._note_death(self._kill_reason or death_reason(code))
                if not await self._restart(death):
                    break
        except Exception:  # never leave a worker unsupervised without saying so
            logger.exception("nanny of %s failed", self.name)
            self.status, self.error = "failed", "nanny failed (see the log)"
        finally:
            if not self._closing:
                if self.status != "failed":
                    self.status = "closed"
                self._remove_spill_directory()
                self._done.set()

    async def _watch(self) -> int:
        """Wait for the worker process to end (killing it if it uses too much memory)."""
        proc = self.proc
        assert proc is not None
        try:
            ps: psutil.Process | None = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None
        terminate = self.memory_fractions.terminate
        while True:
            code = proc.poll()
            if code is not None:
                _close_lifeline(proc)
                return code
            if ps is not None and self.memory_limit and terminate is not None:
                try:
                    rss = ps.memory_info().rss
                except psutil.Error:
                    rss = 0
                if rss > terminate * self.memory_limit and self._kill_reason is None:
                    self._kill_reason = (f"memory: RSS {format_bytes(rss)} of limit"
                                         f" {format_bytes(self.memory_limit)}")  # fmt: skip
                    logger.warning("worker %s (%s) uses %s, above %d%% of its memory limit %s:"
                                   " restarting it", self.address, self.name, format_bytes(rss),
                                   terminate * 100, format_bytes(self.memory_limit))  # fmt: skip
                    proc.kill()
                    continue
            await asyncio.sleep(self.poll_interval)

    def _note_death(self, reason: str, address: str | None = None) -> WorkerDeath:
        death = WorkerDeath(self.address if address is None else address, self.name, reason,
                            time.time())  # fmt: skip
        self.deaths.append(death)
        del self.deaths[:-100]
        logger.warning("worker %s (%s) died: %s", death.address or "(not started)", self.name,
                       reason)  # fmt: skip
        return death

    async def _restart(self, death: WorkerDeath | None) -> bool:
        """Start a new worker (after a backoff if the last one died); False on giving up."""
        self.status = "restarting"
        while True:
            if death is not None:
                recent = [d for d in self.deaths if d.time > time.time() - self.death_window]
                if len(recent) >= self.max_deaths:
                    self.status = "failed"
                    self.error = (f"worker {self.name} died {len(recent)} times within"
                                  f" {self.death_window:.0f}s (last: {death.reason}); not"
                                  " restarting it")  # fmt: skip
                    logger.error("%s", self.error)
                    return False
                await asyncio.sleep(min(5.0, 0.1 * 2 ** (len(recent) - 1)))
            if self._closing or not self._restarting:
                return False
            self._remove_spill_directory()
            try:
                await self._launch(death)
            except WorkerStartError as exc:
                death = self._note_death(str(exc), address="")
                continue
            self.restarts += 1
            self.status = "running"
            return True

    async def _launch(self, previous: WorkerDeath | None) -> None:
        """Start a worker process; return once it joined the scheduler."""
        self._kill_reason = None
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "shoal.cluster.worker_process", self.scheduler_address,
               "--nthreads", str(self.nthreads), "--name", self.name, "--host", self.host,
               "--port", str(self.port), "--memory-limit", str(self.memory_limit),
               "--memory-fractions", str(self.memory_fractions),
               "--spill-directory", self.spill_directory, "--lifeline",
               "--ready-fd", str(write_fd)]  # fmt: skip
        if self.resources:
            cmd += ["--resources", ",".join(f"{k}={v!r}" for k, v in self.resources.items())]
        if previous is not None:
            cmd += ["--previous-death", json.dumps({"address": previous.address,
                    "name": previous.name, "reason": previous.reason, "time": previous.time})]  # fmt: skip
        if self.security is not None:
            cmd += self.security.cli_args()
        if self.insecure:
            cmd.append("--insecure")
        cmd += self.worker_args
        env = dict(os.environ if self.env is None else self.env)
        if self.token:  # the configuration's own name: it wins over an inherited alias
            env["SHOAL_SECURITY__TOKEN"] = self.token
        # glibc keeps freed memory (e.g. a spilled array's) unless told to hand it back; and
        # setting this also stops it raising its mmap threshold to the size of our arrays.
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(MALLOC_TRIM_THRESHOLD))
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            address = await self._read_address(read_fd)
        finally:
            os.close(read_fd)
        self.address = address
        if self.on_start is not None:
            self.on_start(self)

    async def _read_address(self, fd: int) -> str:
        proc = self.proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        chunks: list[bytes] = []

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            chunks.append(data)
            if (not data or b"\n" in data) and not done.done():
                done.set_result(None)

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(done, self.start_timeout)
        except asyncio.TimeoutError:
            await _stop_process(proc, 0)
            raise WorkerStartError(f"worker process {proc.pid} did not join the scheduler within"
                                   f" {self.start_timeout}s") from None  # fmt: skip
        finally:
            loop.remove_reader(fd)
        address = b"".join(chunks).decode(errors="replace").strip()
        if address:
            return address
        # The pipe closed without an address: the process is ending.
        code = await _wait_exit(proc, 10.0)
        if code is None:
            await _stop_process(proc, 0)
            code = proc.returncode
        raise WorkerStartError(f"worker process exited ({death_reason(code)}) before it joined"
                               f" the scheduler")  # fmt: skip

    # ------------------------------------------------------------- spill files

    def _remove_spill_directory(self) -> None:
        """Remove the spill directory and what a dead worker left there (a worker makes it
        again when it first spills, and removes it when it closes)."""
        if self.spill_directory:
            shutil.rmtree(self.spill_directory, ignore_errors=True)


def _close_lifeline(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code, once the process has exited within ``timeout`` seconds; else None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.002
    while True:
        code = proc.poll()
        if code is not None or loop.time() >= deadline:
            return code
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.05)


async def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Ask the worker to stop (EOF on its lifeline), then SIGTERM, then SIGKILL; reap it."""
    _close_lifeline(proc)
    if await _wait_exit(proc, timeout) is None:
        if timeout:
            logger.warning("worker process %d did not exit within %ss; terminating it",
                           proc.pid, timeout)  # fmt: skip
        proc.terminate()
        if await _wait_exit(proc, 3.0) is None:
            proc.kill()
            await _wait_exit(proc, 10.0)
    if proc.poll() is None:  # pragma: no cover - SIGKILL not done after 10 s
        proc.wait()
