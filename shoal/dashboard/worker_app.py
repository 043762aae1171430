"""A worker's aiohttp application: ``/metrics``, ``/health``, ``/api/info``, ``/api/logs``,
behind the same login as the scheduler's dashboard (`shoal.dashboard.login`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..diagnostics.logs import log_ring
from .auth import DashboardAuth
from .login import CertificateCheck, LoginGuard
from .metrics import CONTENT_TYPE, render, worker_registry

if TYPE_CHECKING:
    from ..worker.server import Worker

__all__ = ["make_worker_app"]

_encoder = msgspec.json.Encoder()

#: what ``GET /`` lists
WORKER_ROUTES = {
    "/health": "200 ok",
    "/metrics": "Prometheus metrics of this worker",
    "/api/info": "this worker at a glance",
    "/api/logs": "this worker's newest log records (?n=)",
    "/api/session": "whether a login is required, and how this request authenticated",
    "/login": "the login form; POST /logout ends the session",
}


def _json(data: Any) -> web.Response:
    return web.Response(body=_encoder.encode(data), content_type="application/json")


def worker_info(w: Worker) -> dict[str, Any]:
    st = w.state
    data: Any = w.data
    return {
        "address": w.address,
        "name": w.name,
        "scheduler": w.scheduler_address,
        "status": w.status,
        "nthreads": w.nthreads,
        "memory_limit": w.memory_limit,
        "executing": len(st.executing) if st is not None else 0,
        "ready": len(st.ready) if st is not None else 0,
        "keys": len(data),
        "managed_bytes": getattr(data, "memory_bytes", 0),
        "spilled_bytes": getattr(data, "spilled_bytes", 0),
        "bytes_in": getattr(w, "bytes_in", 0),
        "bytes_out": getattr(w, "bytes_out", 0),
        "time": time.time(),
    }


def make_worker_app(w: Worker, auth: DashboardAuth,
                    certificate: CertificateCheck | None = None) -> web.Application:  # fmt: skip
    registry = worker_registry(w)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(registry),
                            headers={"Content-Type": f"{CONTENT_TYPE}; charset=utf-8"})

    async def info(request: web.Request) -> web.Response:
        return _json(worker_info(w))

    async def logs(request: web.Request) -> web.Response:
        try:
            n = int(request.query.get("n", "200"))
        except ValueError:
            return web.json_response({"error": "n must be an integer"}, status=400)
        return _json({"rows": log_ring().rows(n)})

    async def routes(request: web.Request) -> web.Response:
        return _json(WORKER_ROUTES)

    guard = LoginGuard(auth, certificate)
    app = web.Application(middlewares=[guard.middleware])
    guard.add_routes(app)
    app.router.add_get("/", routes)  # where a browser lands after logging in
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/logs", logs)
    return app
