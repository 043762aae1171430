"""A cluster on this machine: the scheduler on the caller's event loop, workers beside it.

Workers are separate processes by default (one per core), or in-process `Worker` objects
with ``processes=False``. Every worker process holds a pipe from us on its stdin and exits
when it closes, so none is left behind even if this process is killed. Each runs under a
`Nanny` on our event loop, which starts a new one when it dies (or outgrows its memory).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ..security.credentials import Security
from ..worker.memory import MemoryFractions, parse_memory_limit
from ..scheduler import Scheduler
from ..worker.server import Worker
from .nanny import Nanny

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
        memory_limit: int | str | None = None,
        validate: bool = False,
        worker_start_timeout: float = 60.0,
        resources: dict[str, float] | None = None,
        worker_ttl: float | None = None,
        memory_fractions: MemoryFractions | None = None,
        dashboard_address: str | int | None = ":0",
        worker_dashboard_address: str | int | None = None,
        jobs: Any = None,
        security: Security | bool | None = None,
        insecure: bool = False,
    ) -> None:
        """``worker_ttl``, ``memory_fractions`` and ``resources`` default to
        ``scheduler.worker_ttl``, ``worker.memory_fractions`` and ``worker.resources`` of
        `shoal.config`. ``security=True`` makes a temporary CA and a certificate per role
        (`Security.temporary`); a `Security` that holds several roles' certificates (from
        `Security.from_directory`) gives each part its own. Everything then speaks TLS."""
        cores = os.cpu_count() or 1
        #: the cluster's TLS credentials (None: plain TCP); clients take its client role
        self.security: Security | None = Security.temporary() if security is True else (
            security or None)  # fmt: skip
        #: listen beyond loopback with neither TLS nor a token (see `Scheduler`)
        self.insecure = insecure
        if n_workers is None:
            n_workers = cores if processes else 1
            threads_per_worker = threads_per_worker or (1 if processes else cores)
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker or max(1, cores // max(1, n_workers))
        self.processes = processes
        self.host = host
        self.scheduler_port = scheduler_port
        self.token = token
        #: bytes per worker (0: none); by default this machine's memory shared by the workers
        self.memory_limit = parse_memory_limit(memory_limit, n_workers)
        #: when workers spill, pause and are restarted (fractions of ``memory_limit``)
        self.memory_fractions = memory_fractions or _configured_fractions()
        self.validate = validate
        #: what each worker offers to tasks that ask for resources
        self.resources = dict(resources if resources is not None else _configured_resources())
        self.worker_ttl = worker_ttl
        self.worker_start_timeout = worker_start_timeout
        #: the scheduler's dashboard: ":0" a free port on ``host``, None none
        self.dashboard_address = dashboard_address
        #: each worker's /metrics server (None: none; the scheduler's /metrics covers them)
        self.worker_dashboard_address = worker_dashboard_address
        #: a `shoal.jobs` queue for the dashboard to show (see `Scheduler.attach_jobs`)
        self.jobs = jobs
        self.scheduler: Scheduler | None = None
        self.workers: list[Worker] = []
        #: the supervisors of the worker processes
        self.nannies: list[Nanny] = []
        self.scheduler_address = ""
        #: workers started by `scale`/`adapt` that have not joined yet
        self._starting: dict[asyncio.Future[Any], str] = {}
        self._next_index = n_workers
        #: `scale`/`adapt` (shoal.deploy.local_scaling), made on first use
        self._scaler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _start(self) -> LocalCluster:
        self._loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(self.host, self.scheduler_port, token=self.token,
                                   validate=self.validate, worker_ttl=self.worker_ttl,
                                   dashboard_address=self.dashboard_address,
                                   jobs=self.jobs, security=self._role("scheduler"),
                                   insecure=self.insecure)  # fmt: skip
        await self.scheduler.start()
        self.scheduler_address = self.scheduler.address
        try:
            if self.processes:
                await self._start_nannies()
            else:
                self.workers = [self._new_worker(f"local-{i}") for i in range(self.n_workers)]
                await asyncio.gather(*(w.start() for w in self.workers))
            await self._wait_for_workers()
        except BaseException:
            await self._close()
            raise
        return self

    def _new_nanny(self, name: str) -> Nanny:
        return Nanny(self.scheduler_address, name=name, nthreads=self.threads_per_worker,
                     host=self.host, token=self.token, memory_limit=self.memory_limit,
                     memory_fractions=self.memory_fractions, resources=self.resources,
                     start_timeout=self.worker_start_timeout,
                     security=self._role("worker"), insecure=self.insecure,
                     worker_args=[] if self.worker_dashboard_address is None else
                     ["--dashboard-address", str(self.worker_dashboard_address)])  # fmt: skip

    def _new_worker(self, name: str) -> Worker:
        return Worker(self.scheduler_address, nthreads=self.threads_per_worker,
                      name=name, host=self.host, token=self.token,
                      memory_limit=self.memory_limit, in_process=True,
                      memory_fractions=self.memory_fractions,
                      resources=self.resources,
                      dashboard_address=self.worker_dashboard_address,
                      validate=self.validate, security=self._role("worker"),
                      insecure=self.insecure)  # fmt: skip

    async def _start_nannies(self) -> None:
        self.nannies = [self._new_nanny(f"local-{i}") for i in range(self.n_workers)]
        started = await asyncio.gather(*(n.start() for n in self.nannies), return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome

    def _role(self, role: str) -> Security | None:
        return None if self.security is None else self.security.for_role(role)

    async def _wait_for_workers(self) -> None:
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.worker_start_timeout
        delay = 0.002
        while len(self.scheduler.state.workers) < self.n_workers:
            gone = [n for n in self.nannies if n.status in ("closed", "failed")]
            if gone:
                raise RuntimeError(f"worker {gone[0].name} stopped while starting"
                                   " (see its output above)")  # fmt: skip
            if loop.time() > deadline:
                raise TimeoutError(f"{len(self.scheduler.state.workers)} of {self.n_workers}"
                                   f" workers started within {self.worker_start_timeout}s")  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    async def _close(self) -> None:
        if self._scaler is not None:  # stop adapting first; it blocks on this loop
            await asyncio.to_thread(self._scaler.close)
            self._scaler = None
        for task in list(self._starting):
            task.cancel()
        for n in self.nannies:
            n.stop_restarting()  # workers the scheduler closes stay closed
        if self.scheduler is not None:
            await self.scheduler.close(close_workers=True)
        for w in self.workers:
            await w.close("cluster closing")
        # EOF on each lifeline, then SIGTERM and SIGKILL for a worker that lingers.
        await asyncio.gather(*(n.close(timeout=5) for n in self.nannies))
        self.nannies.clear()
        self.workers.clear()

    # ------------------------------------------------ scale and adapt (shoal.deploy)

    def scale(self, n: int) -> None:
        """Have ``n`` workers: start more, or retire the extra ones (their results move to
        the others first). Blocking: call it from another thread than the cluster's loop."""
        self._get_scaler().scale(n)

    def adapt(self, minimum: int = 0, maximum: int | None = None,
              target_duration: float = 5.0, wait_count: int = 3, interval: float = 1.0,
              max_pending: int | None = None) -> Any:  # fmt: skip
        """Scale with the queued work between ``minimum`` and ``maximum`` (default: one
        worker per core) workers; see `shoal.deploy.adaptive`. Returns the `Adaptive`."""
        from ..deploy.adaptive import AdaptivePolicy

        maximum = maximum if maximum is not None else (os.cpu_count() or 1)
        policy = AdaptivePolicy(minimum, maximum, target_duration, wait_count,
                                max_pending if max_pending is not None else max(1, maximum))  # fmt: skip
        return self._get_scaler().adapt(policy, interval)

    def get_logs(self, n: int = 1000) -> dict[str, str]:
        """The scheduler's and each worker's newest ``n`` log records: name -> text."""
        logs: dict[str, str] = self._get_scaler().get_logs(n)
        return logs

    def _get_scaler(self) -> Any:
        if self._loop is None or self.scheduler is None:
            raise RuntimeError("the local cluster is not running")
        if self._scaler is None:
            from ..deploy.local_scaling import LocalScaler

            self._scaler = LocalScaler(self, self._loop, timeout=self.worker_start_timeout)
        return self._scaler

    def worker_count(self) -> int:
        """Workers running or restarting (started by this cluster, not closed)."""
        if self.processes:
            return sum(n.status not in ("closed", "failed") for n in self.nannies)
        return sum(w.status not in ("closing", "closed") for w in self.workers)

    def starting_names(self) -> set[str]:
        """Names of the workers `scale` started whose start has not finished yet."""
        return set(self._starting.values())

    async def _add_workers(self, count: int) -> None:
        """Start ``count`` more workers; they join in the background (``starting_count``)."""
        for _ in range(count):
            name = f"local-{self._next_index}"
            self._next_index += 1
            if self.processes:
                nanny = self._new_nanny(name)
                self.nannies.append(nanny)
                started: asyncio.Future[Any] = asyncio.ensure_future(nanny.start())
            else:
                worker = self._new_worker(name)
                self.workers.append(worker)
                started = asyncio.ensure_future(worker.start())
            self._starting[started] = name
            started.add_done_callback(self._worker_started)

    def _worker_started(self, started: asyncio.Future[Any]) -> None:
        self._starting.pop(started, None)
        if not started.cancelled() and started.exception() is not None:
            logger.warning("a worker started by scale did not join: %s", started.exception())

    async def _prune_workers(self) -> None:
        """Forget workers that closed (retired) and nannies that are done."""
        for nanny in [n for n in self.nannies if n.status in ("closed", "failed")]:
            await nanny.close(timeout=5)
            self.nannies.remove(nanny)
        self.workers = [w for w in self.workers if w.status != "closed"]
        self.n_workers = self.worker_count()

    @property
    def dashboard_link(self) -> str:
        """The scheduler's dashboard URL ("" when it has none)."""
        return self.scheduler.dashboard_link if self.scheduler is not None else ""

    def __repr__(self) -> str:
        return f"<LocalCluster {self.scheduler_address} workers={self.n_workers}>"

    async def __aenter__(self) -> LocalCluster:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()


def _configured_fractions() -> MemoryFractions:
    """``worker.memory_fractions`` of shoal.config; a bad one names its key and source."""
    from ..config import ConfigError, load_config

    config = load_config()
    try:
        return MemoryFractions.parse(config.worker.memory_fractions)
    except ValueError as exc:
        raise ConfigError(f"worker.memory_fractions = {config.worker.memory_fractions!r} from"
                          f" {config.source('worker.memory_fractions')}: {exc}") from None


def _configured_resources() -> dict[str, float]:
    """``worker.resources`` of shoal.config (checked when it was read)."""
    from ..config import load_config, parse_resources

    return parse_resources(load_config().worker.resources)
