"""Every broker passes the same conformance checks (shoal.jobs.testing), with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shoal.jobs.broker import Broker
from shoal.jobs.testing import CHECKS, FakeClock


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_broker_conformance(make_broker: Callable[[FakeClock], Broker], check: str) -> None:
    clock = FakeClock()
    CHECKS[check](make_broker(clock), clock)


def test_check_broker_runs_every_check() -> None:
    from shoal.jobs.brokers.memory import MemoryBroker
    from shoal.jobs.testing import check_broker

    check_broker(lambda clock: MemoryBroker(clock=clock))


def test_memory_join_waits_for_the_queue_to_drain() -> None:
    from shoal.jobs import JobQueue

    app = JobQueue("memory://")
    seen: list[int] = []

    @app.job
    def note(i: int) -> None:
        seen.append(i)

    for i in range(20):
        note.delay(i)
    with app.worker(concurrency=2):
        app.broker.join(timeout=10)  # type: ignore[attr-defined]
        assert sorted(seen) == list(range(20))
