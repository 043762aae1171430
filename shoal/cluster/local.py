"""A cluster on this machine: the scheduler on the caller's event loop, workers beside it.

Workers are separate processes by default (one per core), or in-process `Worker` objects
with ``processes=False``. Every worker process holds a pipe from us on its stdin and exits
when it closes, so none is left behind even if this process is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from typing import Any

import psutil

from ..scheduler import Scheduler
from ..worker import Worker

logger = logging.getLogger("shoal.cluster")


class LocalCluster:
    """Scheduler + workers on this machine. Used by `Client()`; usable on its own (async)."""

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        token: str | None = None,
        memory_limit: int | None = None,
        validate: bool = False,
        worker_start_timeout: float = 60.0,
        resources: dict[str, float] | None = None,
        worker_ttl: float = 30.0,
    ) -> None:
        cores = os.cpu_count() or 1
        if n_workers is None:
            n_workers = cores if processes else 1
            threads_per_worker = threads_per_worker or (1 if processes else cores)
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker or max(1, cores // max(1, n_workers))
        self.processes = processes
        self.host = host
        self.scheduler_port = scheduler_port
        self.token = token
        total = psutil.virtual_memory().total
        self.memory_limit = memory_limit if memory_limit is not None else total // max(1, n_workers)
        self.validate = validate
        #: what each worker offers to tasks that ask for resources
        self.resources = dict(resources or {})
        self.worker_ttl = worker_ttl
        self.worker_start_timeout = worker_start_timeout
        self.scheduler: Scheduler | None = None
        self.workers: list[Worker] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler_address = ""

    async def _start(self) -> LocalCluster:
        self.scheduler = Scheduler(self.host, self.scheduler_port, token=self.token,
                                   validate=self.validate, worker_ttl=self.worker_ttl)  # fmt: skip
        await self.scheduler.start()
        self.scheduler_address = self.scheduler.address
        try:
            if self.processes:
                self._spawn_processes()
            else:
                for i in range(self.n_workers):
                    w = Worker(self.scheduler_address, nthreads=self.threads_per_worker,
                               name=f"local-{i}", host=self.host, token=self.token,
                               memory_limit=self.memory_limit, in_process=True,
                               resources=self.resources,
                               validate=self.validate)  # fmt: skip
                    self.workers.append(w)
                await asyncio.gather(*(w.start() for w in self.workers))
            await self._wait_for_workers()
        except BaseException:
            await self._close()
            raise
        return self

    def _spawn_processes(self) -> None:
        env = dict(os.environ)
        if self.token:
            env["SHOAL_TOKEN"] = self.token
        for i in range(self.n_workers):
            cmd = [sys.executable, "-m", "shoal.cluster.worker_process", self.scheduler_address,
                   "--nthreads", str(self.threads_per_worker), "--name", f"local-{i}",
                   "--host", self.host, "--memory-limit", str(self.memory_limit), "--lifeline",
                   "--resources", ",".join(f"{k}={v!r}" for k, v in self.resources.items())]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env))

    async def _wait_for_workers(self) -> None:
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.worker_start_timeout
        delay = 0.002
        while len(self.scheduler.state.workers) < self.n_workers:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker process exited with code {dead[0].returncode}"
                                   " while starting (see its output above)")  # fmt: skip
            if loop.time() > deadline:
                raise TimeoutError(f"{len(self.scheduler.state.workers)} of {self.n_workers}"
                                   f" workers started within {self.worker_start_timeout}s")  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    async def _close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close(close_workers=True)
        for w in self.workers:
            await w.close("cluster closing")
        for p in self.procs:
            if p.stdin is not None:
                try:
                    p.stdin.close()  # the lifeline: the worker exits on EOF
                except OSError:
                    pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while any(p.poll() is None for p in self.procs) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for p in self.procs:
            if p.poll() is None:
                logger.warning("worker process %d did not exit; killing it", p.pid)
                p.kill()
                p.wait()
        self.procs.clear()
        self.workers.clear()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.scheduler_address} workers={self.n_workers}>"

    async def __aenter__(self) -> LocalCluster:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()
