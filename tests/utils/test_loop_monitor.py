"""The event-loop watchdog (`shoal.utils.loop_monitor`): a blocked loop is measured and
reported once, the tick is shared by the owners of one loop and stops with the last."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shoal.utils.loop_monitor import LoopMonitor, watch_loop
from shoal.utils import loop_monitor


def test_a_loop_blocked_for_1_5_s_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> LoopMonitor:
        monitor = watch_loop("worker test-blocker")
        try:
            # given a running tick
            await _ticks(monitor, 2)
            before = time.monotonic()
            # when a callback blocks the loop for 1.5 s
            done = asyncio.get_running_loop().create_future()

            def block() -> None:
                time.sleep(1.5)
                done.set_result(None)

            asyncio.get_running_loop().call_soon(block)
            await done
            # (then the tick comes late once, and on time again after)
            await _ticks(monitor, 3)
            assert monitor.max_lag_since(before) >= 1.0
            return monitor
        finally:
            monitor.release("worker test-blocker")

    with caplog.at_level(logging.WARNING, logger="shoal.loop"):
        monitor = asyncio.run(main())

    # then it was measured, and reported once, naming what runs on that loop
    assert monitor.max_lag >= 1.0 and monitor.warnings == 1
    reports = [r.getMessage() for r in caplog.records if r.name == "shoal.loop"]
    assert len(reports) == 1, reports
    assert "unresponsive" in reports[0] and "worker test-blocker" in reports[0]
    # and the tick stopped with its owner
    assert monitor._task is None and not loop_monitor._monitors


def test_a_loop_is_watched_once_for_all_its_owners_until_the_last_leaves() -> None:
    async def main() -> None:
        first = watch_loop("scheduler")
        second = watch_loop("worker a")
        assert first is second and first.describe() == "scheduler, worker a"
        task = first._task
        assert task is not None
        first.release("scheduler")
        assert not task.cancelled() and first._task is task
        second.release("worker a")
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        # a new owner then gets a fresh tick
        third = watch_loop("client")
        assert third is not first
        third.release("client")

    asyncio.run(main())


def test_warnings_are_rate_limited_and_count_what_they_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (no loop: ticks fed by hand, at chosen times)
    monitor = LoopMonitor(warn_after=1.0, warn_every=10.0)
    monitor.owners["worker w"] = 1
    with caplog.at_level(logging.WARNING, logger="shoal.loop"):
        monitor.note(2.0, now=100.0)
        monitor.note(3.0, now=105.0)  # within 10 s of the last warning: counted only
        monitor.note(0.5, now=106.0)  # not over the threshold: kept, never warned
        monitor.note(1.5, now=111.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "shoal.loop"]
    assert len(messages) == 2 and monitor.warnings == 2
    assert "1 more stalls" in messages[1]
    assert monitor.max_lag == 3.0 and monitor.last_lag == 1.5
    assert monitor.max_lag_since(104.0) == 3.0 and monitor.max_lag_since(106.0) == 1.5
    assert monitor.max_lag_since(200.0) == 0.0


async def _ticks(monitor: LoopMonitor, n: int, timeout: float = 10.0) -> None:
    """Wait until ``n`` more ticks ran (a deadline: never a hang)."""
    target = monitor.ticks + n
    deadline = time.monotonic() + timeout
    while monitor.ticks < target:
        assert time.monotonic() < deadline, f"fewer than {n} ticks in {timeout}s"
        await asyncio.sleep(monitor.interval / 2)
