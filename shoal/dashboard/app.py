"""The scheduler's aiohttp application: the page, the JSON API, events, ``/metrics``.

Routes (documented in docs/dashboard.md):

    GET /                     the dashboard page (static/index.html)
    GET /static/{file}        its JS and CSS
    GET /health               200 "ok" (open to anyone; everything else may need a login)
    GET/POST /login           the login form (see shoal.dashboard.login); POST /logout
    GET /api/session          whether a login is required, and how this request passed
    GET /metrics              Prometheus text format
    GET /api                  this list
    GET /api/info             the scheduler at a glance
    GET /api/workers          one row per worker
    GET /api/tasks            counts by state and group, and a page of tasks
                              (?offset=0&limit=100&state=memory&group=inc)
    GET /api/task-stream      task runs numbered ?since=N and later (?limit=); without
                              since: the last minute's
    GET /api/graph            the task graph node by node (when it has <= 500 tasks)
    GET /api/jobs             the attached shoal.jobs queue: counts per queue and status,
                              schedules and their next firing
    GET /api/story/{key}      one task's transitions and runs
    GET /api/logs             the scheduler's newest log records (?n=200)
    GET /api/snapshot         info, workers, task counts, jobs and the task stream (?since=)
    GET /api/events           the snapshot as server-sent events, every ?interval=1 s,
                              each with only the task runs that are new to this stream

All handlers run on the scheduler's loop and do bounded work (see `shoal.dashboard.api`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..diagnostics.logs import log_ring
from . import api
from .login import LoginGuard, still_authorized
from .metrics import CONTENT_TYPE, render, scheduler_registry

if TYPE_CHECKING:
    from .server import SchedulerDashboard

logger = logging.getLogger("shoal.dashboard")

__all__ = ["ROUTES", "STATIC", "make_scheduler_app"]

STATIC = Path(__file__).parent / "static"
_encoder = msgspec.json.Encoder()

#: the documented routes, as ``GET /api`` lists them
ROUTES = {
    "/": "the dashboard page",
    "/health": "200 ok",
    "/login": "the login form (POST the token as 'token'); POST /logout ends the session",
    "/api/session": "whether a login is required, and how this request authenticated",
    "/metrics": "Prometheus metrics",
    "/api/info": "the scheduler at a glance",
    "/api/workers": "one row per worker",
    "/api/tasks": "counts by state and group, and a page of tasks"
                  " (?offset=&limit=&state=&group=)",
    "/api/task-stream": "task runs numbered ?since= and later (?limit=)",
    "/api/graph": "the task graph node by node (<= 500 tasks)",
    "/api/jobs": "the attached shoal.jobs queue",
    "/api/story/{key}": "one task's transitions and runs",
    "/api/logs": "the scheduler's newest log records (?n=)",
    "/api/snapshot": "everything the page shows (?since=)",
    "/api/events": "the snapshot as server-sent events (?interval=&since=)",
}  # fmt: skip


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status,
                        content_type="application/json")  # fmt: skip


class BadRequest(Exception):
    pass


def _int(request: web.Request, name: str, default: int | None) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {text!r}") from None


def _float(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {text!r}") from None


def make_scheduler_app(dash: SchedulerDashboard) -> web.Application:
    s = dash.scheduler
    registry = scheduler_registry(s, dash.jobs)

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except BadRequest as exc:
            return _json({"error": str(exc)}, status=400)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        if dash.jobs.attached:
            await dash.jobs.snapshot()  # refresh the cached counts the collector reads
        return web.Response(body=render(registry),
                            headers={"Content-Type": f"{CONTENT_TYPE}; charset=utf-8"})

    async def routes(request: web.Request) -> web.Response:
        return _json(ROUTES)

    async def info(request: web.Request) -> web.Response:
        return _json(api.info(s))

    async def workers(request: web.Request) -> web.Response:
        return _json(api.workers(s))

    async def tasks(request: web.Request) -> web.Response:
        return _json(api.tasks_page(
            s, offset=_int(request, "offset", 0) or 0, limit=_int(request, "limit", 100) or 0,
            state=request.query.get("state") or None, group=request.query.get("group") or None))  # fmt: skip

    async def task_stream(request: web.Request) -> web.Response:
        return _json(api.task_stream(s, since=_int(request, "since", None),
                                     limit=_int(request, "limit", api.STREAM_LIMIT) or 0))  # fmt: skip

    async def graph(request: web.Request) -> web.Response:
        return _json(api.graph(s))

    async def jobs(request: web.Request) -> web.Response:
        return _json(await dash.jobs.snapshot())

    async def story(request: web.Request) -> web.Response:
        return _json(api.story(s, request.match_info["key"]))

    async def logs(request: web.Request) -> web.Response:
        n = _int(request, "n", 200)
        return _json({"rows": log_ring().rows(n)})

    async def snapshot(since: int | None) -> dict[str, Any]:
        shared = await dash.shared_snapshot()
        return {**shared, "stream": api.task_stream(s, since=since)}

    async def snapshot_route(request: web.Request) -> web.Response:
        return _json(await snapshot(_int(request, "since", None)))

    async def events(request: web.Request) -> web.StreamResponse:
        interval = min(max(_float(request, "interval", 1.0), 0.1), 60.0)
        since = _int(request, "since", None)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})  # fmt: skip
        await response.prepare(request)
        closing = dash.server.closing
        try:
            await response.write(b"retry: 2000\n\n")
            while not closing.is_set() and still_authorized(request):
                snap = await snapshot(since)
                since = snap["stream"]["next"]
                await response.write(b"data: " + _encoder.encode(snap) + b"\n\n")
                try:
                    await asyncio.wait_for(closing.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return response

    guard = LoginGuard(dash.auth, dash.certificate_check)
    app = web.Application(middlewares=[guard.middleware, errors])
    guard.add_routes(app)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api", routes)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/workers", workers)
    app.router.add_get("/api/tasks", tasks)
    app.router.add_get("/api/task-stream", task_stream)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/jobs", jobs)
    app.router.add_get("/api/story/{key:.+}", story)
    app.router.add_get("/api/logs", logs)
    app.router.add_get("/api/snapshot", snapshot_route)
    app.router.add_get("/api/events", events)
    return app
