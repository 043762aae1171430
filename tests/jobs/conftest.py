"""Fixtures for shoal.jobs: every backend runs the same tests.

``backend`` is parametrised over ``memory``, ``sqlite`` and ``redis``; ``broker_url`` and
``app`` build on it. Redis is the server at ``$SHOAL_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``); if none answers there and ``redis-server`` is installed, one is
started for the session in a temporary directory. Without either, Redis cases skip, except
under CI (``$CI`` set), where they fail (the ``require`` fixture, tests/conftest.py). Each
test gets its own key prefix, deleted after.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from shoal.jobs import JobQueue
from shoal.jobs.broker import Broker
from shoal.jobs.brokers import open_broker
from shoal.jobs.testing import FakeClock, RedisServer, redis_ping
from shoal.testing import wait_until

BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(scope="session")
def redis_url(require: Callable[[object, str], None]) -> Iterator[str]:
    require(importlib.util.find_spec("redis"), "the redis package is not installed")
    url = os.environ.get("SHOAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_ping(url):
        yield url
        return
    require(shutil.which("redis-server"), f"no Redis server at {url} and no redis-server installed")
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty queue URL on ``backend``, cleaned up after the test."""
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        base = request.getfixturevalue("redis_url")
        url = f"{base}?prefix=test-{uuid.uuid4().hex[:12]}"
        yield url
        broker = open_broker(url)
        try:
            broker.flush()  # type: ignore[attr-defined]
        finally:
            broker.close()


@pytest.fixture
def make_broker(broker_url: str) -> Iterator[object]:
    """``make_broker(clock)``: a broker on this test's queue with a fake clock (memory:
    one shared broker per test)."""
    made: list[Broker] = []

    def make(clock: FakeClock) -> Broker:
        broker = open_broker(broker_url, clock=clock)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def app(broker_url: str) -> Iterator[JobQueue]:
    """A JobQueue on a fresh queue of ``backend`` (lease 2 s so that lapses are quick)."""
    queue = JobQueue(broker_url, lease=2.0)
    yield queue
    queue.close()
    # Nothing left behind: every worker thread and child process has ended.
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("shoal-jobs-")],
               timeout=10, message="job worker threads ended")
    wait_until(lambda: not [c for c in psutil.Process().children(recursive=True)
                            if "shoal.jobs.child" in " ".join(_cmdline(c))],
               timeout=10, message="job child processes ended")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []
