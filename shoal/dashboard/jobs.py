"""What the dashboard shows of a `shoal.jobs` queue attached to the scheduler.

Attach one with ``Scheduler(jobs=...)``, ``scheduler.attach_jobs(...)`` or ``shoal scheduler
--jobs-url ...``: a broker URL (``sqlite:///jobs.db``, ``redis://host``), an app reference
``module:attribute``, a `JobQueue` or a `Broker`. Only an app knows its schedules (the broker
keeps when each last fired), so pass the app to see them.

Broker calls block (SQLite, Redis): they run on a thread, one refresh at a time, and the
result is kept for ``max_age`` seconds, so any number of open pages and scrapes cost one
refresh per period. A broker that fails is reported in ``error``; the view goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger("shoal.dashboard")

__all__ = ["DEAD_LIMIT", "STATUSES", "JobsView"]

#: job statuses, in the order the page shows them (``dead`` is the dead-letter list)
STATUSES = ("waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled",
            "dead")  # fmt: skip
#: dead-lettered jobs counted per refresh, at most
DEAD_LIMIT = 10_000


class JobsView:
    """Counts per queue and status, and the schedules, of one job queue (or none)."""

    def __init__(self, target: Any = None, max_age: float = 2.0) -> None:
        self.max_age = max_age
        self._target: Any = None
        self._app: Any = None
        self._broker: Any = None
        self._owned = False  # we opened the broker: we close it
        self._cached: dict[str, Any] | None = None
        self._cached_at = 0.0
        self._refreshing: asyncio.Future[dict[str, Any]] | None = None
        if target is not None:
            self.attach(target)

    @property
    def attached(self) -> bool:
        return self._target is not None

    def attach(self, target: Any) -> None:
        """Show this queue from now on (see the module docstring for what ``target`` is)."""
        from ..jobs.app import JobQueue
        from ..jobs.broker import Broker

        self.close()
        if isinstance(target, JobQueue):
            self._app = target
        elif isinstance(target, Broker):
            self._broker = target
        elif isinstance(target, str):
            if "://" not in target:
                from ..jobs.cli import load_app

                self._app = load_app(target)
            else:
                from ..jobs.brokers import open_broker

                self._broker = open_broker(target)
                self._owned = True
        else:
            raise TypeError(f"cannot show jobs from a {type(target).__name__}: give a broker"
                            " URL, 'module:app', a JobQueue or a Broker")  # fmt: skip
        self._target = target
        self._cached = None

    def url(self) -> str:
        if self._app is not None:
            return str(self._app.url)
        if self._broker is not None:
            return str(self._broker.url)
        return ""

    async def snapshot(self, wait: float = 2.0) -> dict[str, Any]:
        """The latest counts, refreshed on a thread when older than ``max_age``. A refresh
        that takes longer than ``wait`` seconds goes on in the background; meanwhile the
        previous counts are returned (marked ``stale``)."""
        if not self.attached:
            return {"attached": False, "url": "", "queues": {}, "schedules": [],
                    "statuses": list(STATUSES), "error": None}  # fmt: skip
        if self._cached is not None and time.monotonic() - self._cached_at < self.max_age:
            return self._cached
        if self._refreshing is None:
            refreshing = asyncio.get_running_loop().run_in_executor(None, self._collect)
            refreshing.add_done_callback(self._refreshed)
            self._refreshing = refreshing
        try:
            await asyncio.wait_for(asyncio.shield(self._refreshing), wait)
        except asyncio.TimeoutError:
            pass
        if self._cached is None:
            return {"attached": True, "url": self.url(), "queues": {}, "schedules": [],
                    "statuses": list(STATUSES), "error": "the broker has not answered yet",
                    "stale": True}  # fmt: skip
        if self._refreshing is not None:
            return {**self._cached, "stale": True}
        return self._cached

    def _refreshed(self, refreshing: asyncio.Future[dict[str, Any]]) -> None:
        if self._refreshing is refreshing:
            self._refreshing = None
        if not refreshing.cancelled() and refreshing.exception() is None:
            self._cached, self._cached_at = refreshing.result(), time.monotonic()

    def cached(self) -> dict[str, Any] | None:
        """The last snapshot taken, however old (None before the first)."""
        return self._cached

    def _collect(self) -> dict[str, Any]:
        """Read the broker (blocking; runs on a thread)."""
        out: dict[str, Any] = {"attached": True, "url": self.url(), "queues": {},
                               "schedules": [], "statuses": list(STATUSES), "error": None,
                               "dead_capped": False, "time": time.time()}  # fmt: skip
        try:
            broker = self._app.broker if self._app is not None else self._broker
            queues: dict[str, dict[str, int]] = {}
            for queue, per in broker.counts().items():
                queues[queue] = {s: int(per.get(s, 0)) for s in STATUSES if s != "dead"}
            dead = broker.dead(limit=DEAD_LIMIT)
            out["dead_capped"] = len(dead) >= DEAD_LIMIT
            for record in dead:
                per = queues.setdefault(record.queue, {s: 0 for s in STATUSES})
                per["dead"] = per.get("dead", 0) + 1
            for per in queues.values():
                per.setdefault("dead", 0)
            out["queues"] = dict(sorted(queues.items()))
            # Run times per queue, over the latest succeeded jobs of the retained history.
            from ..jobs.history import RECENT, run_time_summary

            out["run_times"] = run_time_summary(broker.list("succeeded", limit=RECENT))
            if self._app is not None:
                now = broker.clock()
                for schedule in self._app.schedules.values():
                    last = broker.schedule_last(schedule.name)
                    out["schedules"].append({
                        "name": schedule.name,
                        "job": schedule.job,
                        "cron": schedule.cron,
                        "every": schedule.every,
                        "tz": schedule.tz,
                        "last": last,
                        "next": schedule.next_slot(now),
                    })  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - shown on the page; the view goes on
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    def close(self) -> None:
        """Close a broker this view opened itself."""
        if self._owned and self._broker is not None:
            try:
                self._broker.close()
            except Exception:
                logger.exception("closing the jobs broker")
        self._target = self._app = self._broker = None
        self._owned = False
        self._cached = None
