"""The scheduler's and the worker's HTTP servers, as the servers hold them.

Importing this module imports neither aiohttp nor prometheus_client: `HttpServer` loads
them on a thread when it starts (see `shoal.dashboard.http`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .http import HttpServer
from .jobs import JobsView

if TYPE_CHECKING:
    from aiohttp import web

    from ..scheduler import Scheduler
    from ..worker.server import Worker

__all__ = ["SchedulerDashboard", "WorkerDashboard"]


class SchedulerDashboard:
    """The dashboard page, its JSON API, the event stream and ``/metrics`` of a scheduler."""

    def __init__(self, scheduler: Scheduler, address: str | int, jobs: Any = None,
                 default_host: str = "127.0.0.1") -> None:  # fmt: skip
        self.scheduler = scheduler
        self.jobs = JobsView(jobs)
        self.server = HttpServer(address, self._build, default_host, "dashboard",
                                 preload=("aiohttp.web", "shoal.dashboard.app"))  # fmt: skip
        #: snapshot parts shared by every open page, and when they were made
        self._shared: dict[str, Any] | None = None
        self._shared_at = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> SchedulerDashboard:
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()
        self.jobs.close()

    def _build(self) -> web.Application:
        from .app import make_scheduler_app

        return make_scheduler_app(self)

    async def shared_snapshot(self, max_age: float = 0.25) -> dict[str, Any]:
        """The parts of a snapshot every page gets (made at most every ``max_age`` s)."""
        from . import api

        now = time.monotonic()
        if self._shared is None or now - self._shared_at >= max_age:
            s = self.scheduler
            self._shared = {
                "info": api.info(s),
                "workers": api.workers(s),
                "tasks": api.task_counts(s),
                "jobs": await self.jobs.snapshot(),
            }
            self._shared_at = time.monotonic()
        return self._shared


class WorkerDashboard:
    """A worker's small HTTP server: ``/metrics``, ``/health``, ``/api/info``, ``/api/logs``."""

    def __init__(self, worker: Worker, address: str | int,
                 default_host: str = "127.0.0.1") -> None:  # fmt: skip
        self.worker = worker
        self.server = HttpServer(address, self._build, default_host, "worker metrics",
                                 preload=("aiohttp.web", "shoal.dashboard.worker_app"))  # fmt: skip

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> WorkerDashboard:
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()

    def _build(self) -> web.Application:
        from .worker_app import make_worker_app

        return make_worker_app(self.worker)
