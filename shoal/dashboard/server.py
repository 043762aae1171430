"""The scheduler's and the worker's HTTP servers, as the servers hold them.

Importing this module imports neither aiohttp nor prometheus_client: `HttpServer` loads
them on a thread when it starts (see `shoal.dashboard.http`).

Both take their credentials from the server they belong to: its ``token``, its
``security`` (TLS: then they serve HTTPS with its certificates) and ``insecure`` (told to
run open). Whether a login is required, and the refusal of an open dashboard beyond
loopback, are decided when they are made (`shoal.dashboard.auth.check_exposure`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .auth import DashboardAuth, check_exposure
from .http import HttpServer
from .jobs import JobsView
from .tls import certificate_check, dashboard_ssl_context

if TYPE_CHECKING:
    from aiohttp import web

    from ..scheduler import Scheduler
    from ..worker.server import Worker

__all__ = ["SchedulerDashboard", "WorkerDashboard"]


class _Guarded:
    """What the two dashboards share: an `HttpServer` behind a login when one is needed."""

    server: HttpServer
    auth: DashboardAuth

    def _guard(self, owner: Any, address: str | int, default_host: str, what: str,
               preload: tuple[str, ...]) -> None:  # fmt: skip
        security = getattr(owner, "security", None)
        self.token: str | None = getattr(owner, "token", None) or None
        self.server = HttpServer(address, self._build, default_host, what, preload=preload)
        #: whether every request but /health must authenticate (raises DashboardRefused)
        self.login_required = check_exposure(
            self.server.host, self.server.requested_port, self.token, security is not None,
            insecure=bool(getattr(owner, "insecure", False)), what=what)  # fmt: skip
        self.server.ssl_context = dashboard_ssl_context(security)
        self.certificate_check = certificate_check(security)
        # Until bound the port (and so the cookie's name) is not known: replaced in start.
        self.auth = DashboardAuth(self.token, self.login_required,
                                  secure=self.server.ssl_context is not None)  # fmt: skip

    async def _start_guarded(self) -> None:
        await self.server.start()
        self.auth = DashboardAuth(self.token, self.login_required, port=self.server.port,
                                  secure=self.server.ssl_context is not None)  # fmt: skip

    def _build(self) -> web.Application:
        raise NotImplementedError


class SchedulerDashboard(_Guarded):
    """The dashboard page, its JSON API, the event stream and ``/metrics`` of a scheduler."""

    def __init__(self, scheduler: Scheduler, address: str | int, jobs: Any = None,
                 default_host: str = "127.0.0.1") -> None:  # fmt: skip
        self.scheduler = scheduler
        self._guard(scheduler, address, default_host, "dashboard",
                    ("aiohttp.web", "shoal.dashboard.app"))
        self.jobs = JobsView(jobs)
        #: snapshot parts shared by every open page, and when they were made
        self._shared: dict[str, Any] | None = None
        self._shared_at = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> SchedulerDashboard:
        await self._start_guarded()
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


class WorkerDashboard(_Guarded):
    """A worker's small HTTP server: ``/metrics``, ``/health``, ``/api/info``, ``/api/logs``."""

    def __init__(self, worker: Worker, address: str | int,
                 default_host: str = "127.0.0.1") -> None:  # fmt: skip
        self.worker = worker
        self._guard(worker, address, default_host, "worker metrics",
                    ("aiohttp.web", "shoal.dashboard.worker_app"))

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> WorkerDashboard:
        await self._start_guarded()
        return self

    async def close(self) -> None:
        await self.server.close()

    def _build(self) -> web.Application:
        from .worker_app import make_worker_app

        return make_worker_app(self.worker, self.auth, self.certificate_check)
