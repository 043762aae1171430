"""Periodic jobs: cron expressions (croniter, in a time zone) and fixed intervals.

Each schedule's slots are the same instants on every machine (cron matches; intervals are
multiples of ``every`` since ``anchor``), and a slot is enqueued under the idempotency key
``periodic:<name>:<slot>``, so it fires once however many schedulers run. The broker keeps
the last slot fired per schedule; `plan` (pure) decides from it what is due:

- the latest slot at or before now that is later than the last one fired is due;
- if it is no more than ``grace`` late it fires (older missed slots are subsumed by it);
- if it is later than that (every scheduler was down), ``catch_up`` decides:
  ``"skip"`` fires nothing and waits for the next slot, ``"once"`` fires it once.
- A schedule seen for the first time fires only a slot that is within ``grace`` of now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

CatchUp = Literal["skip", "once"]

#: how late a slot may fire and still count as on time (capped at half the period)
DEFAULT_GRACE = 60.0


@dataclass(frozen=True)
class Schedule:
    """When to enqueue job ``job`` with ``args``/``kwargs``."""

    name: str
    job: str
    cron: str | None = None
    every: float | None = None  #: seconds
    tz: str = "UTC"
    catch_up: CatchUp = "skip"
    anchor: float = 0.0  #: interval slots are ``anchor + k * every``
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give a cron expression or every=, not both")
        if self.every is not None and not self.every > 0:
            raise ValueError(f"schedule {self.name!r}: every must be positive")
        if self.catch_up not in ("skip", "once"):
            raise ValueError(f"schedule {self.name!r}: catch_up must be 'skip' or 'once'")
        ZoneInfo(self.tz)  # raises for an unknown zone
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ValueError(f"schedule {self.name!r}: invalid cron expression {self.cron!r}")

    def latest_slot(self, now: float) -> float:
        """The latest slot at or before ``now``."""
        if self.every is not None:
            return self.anchor + math.floor((now - self.anchor) / self.every) * self.every
        it = self._cron(now + 1.0)
        slot = float(it.get_prev(float))
        while slot > now:
            slot = float(it.get_prev(float))
        return slot

    def next_slot(self, now: float) -> float:
        """The first slot strictly after ``now``."""
        if self.every is not None:
            return self.latest_slot(now) + self.every
        return float(self._cron(now).get_next(float))

    def period_after(self, slot: float) -> float:
        return self.next_slot(slot) - slot

    def _cron(self, at: float) -> Any:
        from croniter import croniter

        assert self.cron is not None
        return croniter(self.cron, datetime.fromtimestamp(at, ZoneInfo(self.tz)))


def every_seconds(every: timedelta | float) -> float:
    return every.total_seconds() if isinstance(every, timedelta) else float(every)


def slot_key(schedule: str, slot: float) -> str:
    return f"periodic:{schedule}:{slot:.3f}"


def plan(schedule: Schedule, last: float | None, now: float,
         grace: float = DEFAULT_GRACE) -> tuple[float | None, float | None]:
    """``(slot to fire or None, slot to record as the last one or None)`` at ``now``."""
    slot = schedule.latest_slot(now)
    if last is not None and slot <= last:
        return None, None
    grace = min(grace, schedule.period_after(slot) / 2.0)
    on_time = now - slot <= grace
    if on_time:
        return slot, slot
    if last is None or schedule.catch_up == "skip":
        return None, slot
    return slot, slot
