"""Fixtures for shoal.jobs: every backend runs the same tests.

``backend`` is parametrised over ``memory``, ``sqlite`` and ``redis``; ``broker_url`` and
``app`` build on it. Redis is the server at ``$SHOAL_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``); if none answers there and ``redis-server`` is installed, one is
started for the session in a temporary directory. Without either, Redis cases skip, except
under CI (``$CI`` set), where they fail. Each test gets its own key prefix, deleted after.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.jobs import JobQueue
from shoal.jobs.brokers import open_broker
from shoal.jobs.testing import FakeClock
from shoal.jobs.broker import Broker

BACKENDS = ["memory", "sqlite", "redis"]


def _ping(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process of our own (append-only file on) in a temporary directory."""

    def __init__(self, port: int | None = None, directory: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = directory or tempfile.mkdtemp(prefix="shoal-redis-")
        self._own_dir = directory is None
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--dir", self.dir, "--save", "", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: the append-only file is flushed)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    url = os.environ.get("SHOAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _ping(url):
        yield url
        return
    if shutil.which("redis-server"):
        server = RedisServer().start()
        try:
            yield server.url
        finally:
            server.close()
        return
    if os.environ.get("CI"):
        pytest.fail(f"no Redis server at {url} and no redis-server to start (CI must have one)")
    pytest.skip(f"no Redis server at {url} and no redis-server installed")


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
