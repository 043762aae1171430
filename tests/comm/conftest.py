"""Fixtures for transport tests: run a coroutine on a fresh loop and fail on leaks.

``run(coro, loop="asyncio" | "uvloop", timeout=...)`` runs one test body. The test fails
if the body leaves tasks running, or (after the loop is closed) threads or file
descriptors behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]


def _warm_up_uvloop() -> None:
    """libuv opens a pipe once per process, with its first loop: not a leak of any test."""
    import uvloop

    uvloop.new_event_loop().close()


_warm_up_uvloop()


def _open_fds() -> set[int]:
    return (
        {int(fd) for fd in os.listdir("/proc/self/fd")} if os.path.isdir("/proc/self/fd") else set()
    )


Runner = Callable[..., Any]


@pytest.fixture
def run() -> Iterator[Runner]:
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()

    def run(coro: Coroutine[Any, Any, T], *, loop: str = "asyncio", timeout: float = 5.0) -> T:
        async def main() -> T:
            try:
                result = await asyncio.wait_for(coro, timeout)
            finally:
                await asyncio.sleep(0)  # let connection_lost callbacks run
                leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in leftover:
                    task.cancel()
            assert not leftover, f"tasks left running: {leftover}"
            return result

        if loop == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main())
        return asyncio.run(main())

    yield run

    # Threads (the default executor's) are joined when the loop closes; give them a moment.
    deadline = time.monotonic() + 2.0
    while True:
        extra_threads = set(threading.enumerate()) - threads_before
        leaked_fds = _open_fds() - fds_before
        if not extra_threads and not leaked_fds or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra_threads, f"threads left running: {extra_threads}"
    assert not leaked_fds, f"file descriptors left open: {sorted(leaked_fds)}"


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)
