"""The asynchronous client inside `asyncio.run`: await futures, gather, scatter."""

from __future__ import annotations

import asyncio
import time

import pytest

import shoal
from shoal.testing import no_leaks


def inc(x: int) -> int:
    return x + 1


def fail() -> None:
    raise KeyError("missing-thing")


def slow_fail(delay: float) -> None:
    time.sleep(delay)
    raise KeyError("late")


def test_async_client_submit_gather_and_scatter() -> None:
    async def main() -> None:
        # given an asynchronous client on an embedded in-process cluster
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            # when futures are awaited and gathered, then results come back
            assert await client.submit(inc, 1) == 2
            futures = client.map(inc, range(5))
            assert await client.gather(futures) == [1, 2, 3, 4, 5]
            assert await client.gather({"a": futures[0], "b": [futures[1]]}) == {"a": 1, "b": [2]}
            x = await client.scatter(10)
            assert await client.submit(inc, x) == 11
            assert await client.submit(inc, x).result(timeout=10) == 11
        assert client.status == "closed"

    with no_leaks(timeout=10):
        asyncio.run(main())


def test_async_client_raises_task_errors() -> None:
    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            with pytest.raises(KeyError, match="missing-thing"):
                await client.submit(fail)
            with pytest.raises(KeyError, match="missing-thing"):
                await client.gather([client.submit(fail)])

    with no_leaks(timeout=10):
        asyncio.run(main())


def test_await_client_then_close() -> None:
    async def main() -> None:
        client = await shoal.Client(asynchronous=True, processes=False, n_workers=1)
        try:
            assert await client.submit(inc, 41) == 42
        finally:
            await client.close()

    with no_leaks(timeout=10):
        asyncio.run(main())


def test_async_future_exception_is_awaitable() -> None:
    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            # given a task that fails a little later, so that exception() must wait for it
            future = client.submit(slow_fail, 0.2)
            # when its exception is awaited, then the loop was free to receive it
            error = await asyncio.wait_for(future.exception(timeout=10), 10)
            assert isinstance(error, KeyError)
            assert "slow_fail" in await future.traceback()
            assert await client.submit(inc, 1).exception() is None

    with no_leaks(timeout=10):
        asyncio.run(main())
