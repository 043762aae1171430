"""Pure policy: retry backoff, time limits, leases and schedule slots (no broker)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from shoal.jobs.policy.leases import check_lease, renew_interval
from shoal.jobs.policy.retries import backoff_delay, next_attempt_at
from shoal.jobs.policy.time_limit import deadline, overrun, remaining
from shoal.jobs.schedules import Schedule, plan, slot_key
from shoal.jobs.testing import message


def test_backoff_doubles_caps_and_jitters() -> None:
    assert [backoff_delay(a, 1.0, 10.0, rand=0.5) for a in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert backoff_delay(1, 1.0, 10.0, rand=0.0) == 0.75
    assert backoff_delay(1, 1.0, 10.0, rand=0.999) == pytest.approx(1.25, abs=1e-3)
    assert backoff_delay(3, 0.0, 10.0) == 0.0


def test_next_attempt_respects_attempts_and_retryable() -> None:
    msg = message(max_attempts=3, backoff=2.0)
    assert next_attempt_at(msg, 1, now=100.0, retryable=True) == 102.0
    assert next_attempt_at(msg, 2, now=100.0, retryable=True) == 104.0
    assert next_attempt_at(msg, 3, now=100.0, retryable=True) is None
    assert next_attempt_at(msg, 1, now=100.0, retryable=False) is None


def test_time_limit_and_lease_arithmetic() -> None:
    assert deadline(10.0, None) is None and deadline(10.0, 5.0) == 15.0
    assert remaining(15.0, 12.0) == 3.0 and remaining(15.0, 20.0) == 0.0
    assert "5s" in str(overrun(5.0))
    assert renew_interval(30.0) == 10.0
    with pytest.raises(ValueError):
        check_lease(0)


def _ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_interval_slots_are_aligned() -> None:
    s = Schedule(name="s", job="j", every=300.0)
    assert s.latest_slot(1000.0) == 900.0 and s.next_slot(1000.0) == 1200.0
    assert s.latest_slot(900.0) == 900.0


def test_cron_slots_in_a_time_zone() -> None:
    s = Schedule(name="s", job="j", cron="0 9 * * *", tz="Europe/Paris")
    now = _ts("2024-07-01 12:00:00", "Europe/Paris")
    assert s.latest_slot(now) == _ts("2024-07-01 09:00:00", "Europe/Paris")
    assert s.next_slot(now) == _ts("2024-07-02 09:00:00", "Europe/Paris")
    every5 = Schedule(name="f", job="j", cron="*/5 * * * *")
    exact = _ts("2024-07-01 12:05:00")
    assert every5.latest_slot(exact) == exact
    assert every5.next_slot(exact) == exact + 300


def test_plan_fires_due_slot_once() -> None:
    s = Schedule(name="s", job="j", every=60.0)
    assert plan(s, None, 1205.0) == (1200.0, 1200.0)  # first sight, on time
    assert plan(s, 1200.0, 1230.0) == (None, None)  # fired already
    assert plan(s, 1200.0, 1261.0) == (1260.0, 1260.0)


def test_plan_catch_up_skip_or_once() -> None:
    skip = Schedule(name="s", job="j", every=60.0, catch_up="skip")
    once = Schedule(name="s", job="j", every=60.0, catch_up="once")
    # Down from 1200 to 1545: slots 1260..1500 were missed; 1500 is 45 s late (> 30 s grace).
    assert plan(skip, 1200.0, 1545.0) == (None, 1500.0)
    assert plan(once, 1200.0, 1545.0) == (1500.0, 1500.0)
    # On time again: both fire.
    assert plan(skip, 1500.0, 1561.0) == (1560.0, 1560.0)
    # First sight long after a slot: nothing fires, the slot is recorded.
    assert plan(once, None, 1545.0) == (None, 1500.0)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        Schedule(name="s", job="j")
    with pytest.raises(ValueError):
        Schedule(name="s", job="j", cron="not cron")
    with pytest.raises(ValueError):
        Schedule(name="s", job="j", every=1.0, catch_up="all")  # type: ignore[arg-type]
    assert slot_key("s", 60.0) == "periodic:s:60.000"
    assert Schedule(name="s", job="j", every=timedelta(minutes=1).total_seconds()).every == 60.0
    _ = timezone.utc
