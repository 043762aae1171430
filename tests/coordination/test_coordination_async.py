"""Every primitive from an asynchronous client: methods return awaitables."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension
from shoal.exceptions import FutureLostError
from shoal.testing import no_leaks


def inc(x: int) -> int:
    return x + 1


def run(body: object) -> None:
    """Run ``body(client)`` with an asynchronous client on an in-process cluster."""

    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            await asyncio.wait_for(body(client), 20)  # type: ignore[operator]

    with no_leaks():
        asyncio.run(main())


def coordination(client: shoal.Client) -> CoordinationExtension:
    return next(e for e in client.cluster.scheduler.extensions
                if isinstance(e, CoordinationExtension))  # fmt: skip


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Poll ``predicate`` on the loop until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(0.01)


def test_async_locks_semaphores_events() -> None:
    async def body(client: shoal.Client) -> None:
        lock = shoal.Lock("l")
        async with lock:
            assert lock.locked()
            assert await shoal.Lock("l").acquire(timeout=0.05) is False
        assert await shoal.Lock("l").acquire(blocking=False) is True
        sem = shoal.Semaphore(2, name="s")
        assert await sem.acquire() and await sem.acquire()
        assert await sem.get_value() == 2
        assert await sem.release() is True
        event = shoal.Event("e")
        assert await event.wait(timeout=0.05) is False
        waiting = asyncio.ensure_future(event.wait())
        ext = coordination(client)
        await eventually(lambda: len(ext.state.waiting) == 1, "the wait is registered")
        await event.set()
        assert await waiting is True and await event.is_set() is True
        await event.clear()

    run(body)


def test_async_queues_variables_pubsub_datasets() -> None:
    async def body(client: shoal.Client) -> None:
        q = shoal.Queue()
        await q.put(client.submit(inc, 1))
        await q.put("plain")
        assert await q.qsize() == 2
        future = await q.get()
        assert await future == 2
        assert await q.get(timeout=1) == "plain"
        with pytest.raises(TimeoutError):
            await q.get(timeout=0.05)

        var = shoal.Variable("v")
        await var.set(client.submit(inc, 2))
        assert await (await var.get(timeout=1)) == 3
        await var.delete()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await var.get(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.2 + 10  # waited its timeout, did not hang

        sub = await shoal.Sub("t")
        pub = shoal.Pub("t")
        pub.put(1)
        await pub.put(2)  # awaiting is allowed, not needed
        received = []
        async for msg in sub:
            received.append(msg)
            if len(received) == 2:
                break
        assert received == [1, 2]
        sub.close()

        await client.publish_dataset(d=[1, 2], f=client.submit(inc, 9))
        assert await client.list_datasets() == ["d", "f"]
        assert await client.get_dataset("d") == [1, 2]
        assert await (await client.get_dataset("f")) == 10
        with pytest.raises(KeyError):
            await client.get_dataset("missing")
        await client.unpublish_dataset("d")

    run(body)


def test_cancelled_acquire_does_not_leak_a_lease() -> None:
    async def body(client: shoal.Client) -> None:
        holder = shoal.Lock("l")
        assert await holder.acquire()
        # when a waiting acquire is cancelled (here by wait_for's own timeout)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(shoal.Lock("l").acquire(), 0.1)
        # then, once the holder lets go, the lock is free for others
        await holder.release()
        assert await shoal.Lock("l").acquire(timeout=5) is True
        ext = coordination(client)
        assert not ext.state.waiting and not ext.timers

    run(body)


def test_async_waits_end_when_the_client_closes() -> None:
    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            other = await shoal.Client(client.scheduler_address, asynchronous=True,
                                       set_as_default=False)  # fmt: skip
            waits = [
                asyncio.ensure_future(shoal.Event("never", client=other).wait()),
                asyncio.ensure_future(shoal.Queue("empty", client=other).get()),
            ]
            sub = await shoal.Sub("quiet", client=other)
            waits.append(asyncio.ensure_future(sub.get()))
            ext = coordination(client)
            await eventually(lambda: len(ext.state.waiting) == 2 and bool(sub._waiters),
                             "the three waits are registered")  # fmt: skip
            await other.close()
            for wait in waits:
                with pytest.raises(FutureLostError):
                    await asyncio.wait_for(wait, 5)
            await eventually(lambda: not ext.state.waiting, "the waiters are dropped")

    with no_leaks():
        asyncio.run(main())
