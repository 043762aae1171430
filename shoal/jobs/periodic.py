"""The loop that enqueues periodic jobs; job workers run one each (see `schedules`)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .schedules import DEFAULT_GRACE, plan, slot_key

if TYPE_CHECKING:
    from .app import JobQueue

log = logging.getLogger("shoal.jobs.periodic")


class PeriodicScheduler:
    """Checks every schedule of ``app`` at each slot (and at least every ``tick`` seconds)."""

    def __init__(self, app: JobQueue, stopping: threading.Event, tick: float = 1.0,
                 grace: float = DEFAULT_GRACE) -> None:
        self.app = app
        self.stopping = stopping
        self.tick = tick
        self.grace = grace

    def run_once(self) -> float:
        """Fire what is due now; return seconds until the next check."""
        broker = self.app.broker
        now = broker.clock()
        wait = self.tick
        for schedule in self.app.schedules.values():
            slot, record = plan(schedule, broker.schedule_last(schedule.name), now, self.grace)
            if slot is not None:
                job = self.app.jobs[schedule.job]
                handle = job.enqueue(args=schedule.args, kwargs=schedule.kwargs,
                                     key=slot_key(schedule.name, slot))
                if handle.created:
                    log.info("periodic %s: enqueued job %s for slot %s", schedule.name, handle.id, slot)
            if record is not None:
                broker.schedule_advance(schedule.name, record)
            wait = min(wait, max(0.0, schedule.next_slot(now) - now) + 0.001)
        return wait

    def run(self) -> None:
        wait = 0.0
        while not self.stopping.wait(wait):
            try:
                wait = self.run_once()
            except Exception:
                log.exception("periodic scheduler: could not check schedules")
                wait = self.tick
