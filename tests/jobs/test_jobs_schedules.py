"""Periodic jobs on a broker: each slot fires once however many schedulers run."""

from __future__ import annotations

import threading
from datetime import timedelta

from shoal.jobs import JobQueue
from shoal.jobs.brokers import open_broker
from shoal.jobs.periodic import PeriodicScheduler
from shoal.jobs.testing import FakeClock


def test_each_slot_fires_once_with_several_schedulers(broker_url: str) -> None:
    clock = FakeClock(1_700_000_000.0 - 1_700_000_000.0 % 60 + 1)
    shared = open_broker(broker_url, clock=clock)
    apps = []
    for _ in range(3):  # three schedulers (as in three job workers), one broker
        broker = shared if broker_url.startswith("memory") else open_broker(broker_url, clock=clock)
        app = JobQueue(broker=broker)

        @app.periodic(every=timedelta(minutes=1), name="tick")
        def tick() -> None: ...

        @app.periodic("*/5 * * * *", tz="Europe/Paris", name="five")
        def five() -> None: ...

        apps.append(app)
    stop = threading.Event()
    schedulers = [PeriodicScheduler(a, stop) for a in apps]
    for _ in range(12):  # 12 minutes, every scheduler checking 4 times a minute
        for _ in range(4):
            for s in schedulers:
                s.run_once()
            clock.advance(15)
    assert shared.counts() == {"default": {"queued": 12 + 2}}
    names = sorted(r.name for r in shared.list(limit=100))
    assert names.count("tick") == 12 and names.count("five") == 2
    for a in apps:
        if a.broker is not shared:
            a.close()
    shared.close()


def test_missed_slots_skip_or_once(broker_url: str) -> None:
    clock = FakeClock(1_700_000_000.0 - 1_700_000_000.0 % 60 + 1)
    broker = open_broker(broker_url, clock=clock)
    app = JobQueue(broker=broker)

    @app.periodic(every=60, name="skipper", catch_up="skip")
    def skipper() -> None: ...

    @app.periodic(every=60, name="catcher", catch_up="once")
    def catcher() -> None: ...

    scheduler = PeriodicScheduler(app, threading.Event())
    scheduler.run_once()
    clock.advance(10 * 60 + 40)  # every scheduler was down for ten slots
    scheduler.run_once()
    names = sorted(r.name for r in broker.list(limit=100))
    assert names == ["catcher", "catcher", "skipper"]
    broker.close()


def test_worker_runs_periodic_jobs(app: JobQueue) -> None:
    ran = threading.Event()

    @app.periodic(every=0.2, name="beat")
    def beat() -> None:
        ran.set()

    with app.worker():
        assert ran.wait(10)
