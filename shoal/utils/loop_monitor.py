"""A watchdog for event loops: how late a periodic tick runs is how long the loop was blocked.

A server whose loop is blocked (a big read from disk, unpickling a large value on it) answers
no heartbeat and no fetch meanwhile; peers then take it for dead. `watch_loop` starts one
cheap tick per event loop (an asyncio task, no thread): every ``interval`` it sleeps and
measures how much later than asked it woke. A lag over ``warn_after`` is logged as a warning
naming the process and what runs on that loop (at most once per ``warn_every`` seconds; the
rest are counted). The owners (a worker, the scheduler, a client; many workers may share one
loop, as in `shoal.testing.many_workers`) read ``max_lag``, ``last_lag`` and
`LoopMonitor.max_lag_since`; the tick stops when the last owner calls `LoopMonitor.release`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time

logger = logging.getLogger("shoal.loop")

__all__ = ["LoopMonitor", "watch_loop"]

#: Seconds between ticks. A lag is measured to within this; 10 wake-ups a second cost
#: about a millisecond of CPU per second.
TICK_INTERVAL = 0.1
#: Lags above this are logged as a warning.
WARN_AFTER = 1.0
#: At most one warning per this many seconds (per loop).
WARN_EVERY = 10.0
#: Lags at least this long are kept (with when they were seen) for `max_lag_since`.
STALL_FLOOR = 0.02

_lock = threading.Lock()
#: the monitor of each event loop that has owners (removed with its last owner)
_monitors: dict[asyncio.AbstractEventLoop, LoopMonitor] = {}


class LoopMonitor:
    """The lag of one event loop, measured by a periodic tick (see the module docstring).

    ``last_lag``/``max_lag``: seconds the latest tick and the latest one since the start
    came late. ``stalls``: the latest lags of at least `STALL_FLOOR` as ``(time.monotonic()
    when seen, seconds)``, oldest first. ``warnings``: stall warnings logged so far.
    """

    def __init__(self, interval: float = TICK_INTERVAL, warn_after: float = WARN_AFTER,
                 warn_every: float = WARN_EVERY, history: int = 256) -> None:  # fmt: skip
        self.interval = interval
        self.warn_after = warn_after
        self.warn_every = warn_every
        self.last_lag = 0.0
        self.max_lag = 0.0
        self.ticks = 0
        self.stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=history)
        self.warnings = 0
        #: what runs on the loop, named in warnings (owner -> how many times it attached)
        self.owners: dict[str, int] = {}
        self._last_warning = -float("inf")
        self._unreported = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------- reading

    def max_lag_since(self, since: float) -> float:
        """The longest lag seen after ``since`` (a `time.monotonic()` reading), 0.0 if none
        reached `STALL_FLOOR`. Costs the number of stalls since then."""
        worst = 0.0
        for when, lag in reversed(self.stalls):
            if when < since:
                break
            worst = max(worst, lag)
        return worst

    # ---------------------------------------------------------------- the tick

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._run(), name="shoal-loop-monitor")

    async def _run(self) -> None:
        # time.monotonic, not loop.time(): uvloop's loop time is cached per iteration.
        while True:
            asked = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.note(max(0.0, now - asked), now)

    def note(self, lag: float, now: float) -> None:
        """Record one tick that came ``lag`` seconds late (seen at ``now``)."""
        self.ticks += 1
        self.last_lag = lag
        if lag > self.max_lag:
            self.max_lag = lag
        if lag < STALL_FLOOR:
            return
        self.stalls.append((now, lag))
        if lag <= self.warn_after:
            return
        if now - self._last_warning < self.warn_every:
            self._unreported += 1
            return
        self._last_warning = now
        self.warnings += 1
        more = f" ({self._unreported} more stalls over {self.warn_after:g}s since the last" \
               f" warning)" if self._unreported else ""  # fmt: skip
        self._unreported = 0
        logger.warning("event loop unresponsive for %.2fs in %s (pid %d): something blocked it%s",
                       lag, self.describe(), os.getpid(), more)  # fmt: skip

    def describe(self) -> str:
        names = list(self.owners)
        if len(names) > 3:
            return f"{', '.join(names[:3])} and {len(names) - 3} more"
        return ", ".join(names) or "nothing"

    def release(self, owner: str) -> None:
        """``owner`` (given to `watch_loop`) no longer runs here; the tick stops with the last
        one. Call it on the loop."""
        with _lock:
            count = self.owners.get(owner, 0) - 1
            if count > 0:
                self.owners[owner] = count
            else:
                self.owners.pop(owner, None)
            if self.owners:
                return
            loop = self._loop
            if loop is not None and _monitors.get(loop) is self:
                del _monitors[loop]
        if self._task is not None:
            self._task.cancel()  # nothing to wait for: a sleeping task, ended next iteration
            self._task = None


def watch_loop(owner: str, loop: asyncio.AbstractEventLoop | None = None) -> LoopMonitor:
    """The monitor of ``loop`` (the running one by default), started on first use, with
    ``owner`` (e.g. ``"worker tcp://..."``) among what its warnings name. Each call is
    paired with one `LoopMonitor.release` of the same owner."""
    loop = loop or asyncio.get_running_loop()
    with _lock:
        monitor = _monitors.get(loop)
        if monitor is None:
            monitor = _monitors[loop] = LoopMonitor()
            monitor.start(loop)
        monitor.owners[owner] = monitor.owners.get(owner, 0) + 1
    return monitor
