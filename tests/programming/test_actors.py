"""Actors: an instance lives on one worker; its handle calls it directly, in order."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

import shoal
from shoal.testing import gen_cluster, no_leaks, wait_until
from shoal.worker.context import get_worker


class Counter:
    def __init__(self, n: int = 0) -> None:
        self.n = n

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def where(self) -> str:
        return get_worker().address

    def fail(self, text: str) -> None:
        raise KeyError(text)

    def square_on_cluster(self, x: int) -> int:
        # an actor method may launch tasks too
        return int(shoal.get_client().submit(pow, x, 2).result())

    @property
    def doubled(self) -> int:
        return 2 * self.n


class Broken:
    def __init__(self) -> None:
        raise ValueError("cannot build this")


def bump(counter: shoal.Actor, by: int) -> int:
    return int(counter.incr(by).result())


def hosted_actors(client: shoal.Client) -> int:
    return sum(len(w.actors) for w in client.cluster.workers)


def test_actor_calls_run_in_order_on_one_worker(client: shoal.Client) -> None:
    # given an actor made by a task
    future = client.submit(Counter, actor=True)
    counter = future.result(timeout=10)
    assert isinstance(counter, shoal.Actor)
    # it lives on exactly one worker: the one holding its key
    (address,) = client.who_has([future])[future.key]
    assert counter.where().result(timeout=10) == address

    # when 100 increments are sent without waiting
    calls = [counter.incr(1) for _ in range(100)]
    assert all(isinstance(c, shoal.ActorFuture) for c in calls)
    # then they ran one after the other, in the order sent
    assert [c.result(timeout=10) for c in calls] == list(range(1, 101))
    # and attributes (properties too) read the actor's state
    assert counter.n == 100
    assert counter.doubled == 200


def test_actor_method_errors_keep_their_type(client: shoal.Client) -> None:
    counter = client.submit(Counter, 5, actor=True).result(timeout=10)
    # when a method raises, then its exception arrives with its type and message
    with pytest.raises(KeyError, match="no-such-thing") as info:
        counter.fail("no-such-thing").result(timeout=10)
    assert isinstance(info.value.__cause__, shoal.RemoteTraceback)
    assert "in fail" in info.value.__cause__.tb
    # and the actor carries on
    assert counter.incr(1).result(timeout=10) == 6
    with pytest.raises(AttributeError):
        _ = counter.no_such_attribute


def test_remote_class_returns_a_handle_at_once(client: shoal.Client) -> None:
    # given an actor class
    RemoteCounter = shoal.remote(Counter)
    # when it is created with .remote, then a handle comes back (the actor is made meanwhile)
    counter = RemoteCounter.remote(10)
    assert isinstance(counter, shoal.Actor)
    # and calls sent before it exists still run in the order sent
    calls = [counter.incr(2) for _ in range(50)]
    assert [c.result(timeout=10) for c in calls] == list(range(12, 111, 2))
    assert counter.n == 110
    # and each .remote() makes its own instance
    other = RemoteCounter.remote(10)
    assert other.key != counter.key and other.incr(1).result(timeout=10) == 11
    # and options pick where it lives
    _, w2 = sorted(client.nthreads())
    placed = RemoteCounter.options(workers=[w2]).remote()
    assert placed.where().result(timeout=10) == w2


def test_failed_creation_raises_the_constructors_error(client: shoal.Client) -> None:
    with pytest.raises(ValueError, match="cannot build this"):
        client.submit(Broken, actor=True).result(timeout=10)
    broken = shoal.remote(Broken).remote()
    with pytest.raises(ValueError, match="cannot build this"):
        broken.anything().result(timeout=10)


def test_handles_work_inside_tasks_and_actors_launch_tasks(client: shoal.Client) -> None:
    counter = client.submit(Counter, actor=True).result(timeout=10)
    # when tasks get the handle as an argument, then they call the same actor
    counts = client.gather(client.map(bump, [counter] * 4, [1, 2, 3, 4]))
    assert len(set(counts)) == 4 and max(counts) == 10
    assert counter.n == 10
    # and a method may submit tasks and wait for them
    assert counter.square_on_cluster(7).result(timeout=10) == 49


def test_actor_lives_while_a_handle_does(client: shoal.Client) -> None:
    # given an actor whose only holder is its handle
    counter = shoal.remote(Counter).remote()
    assert counter.incr().result(timeout=10) == 1
    assert hosted_actors(client) == 1
    # when the handle is dropped, then the worker lets the instance go
    del counter
    wait_until(lambda: hosted_actors(client) == 0, timeout=10, message="the actor is released")


def test_actor_with_an_asynchronous_client() -> None:
    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            counter = await client.submit(Counter, actor=True)
            calls = [counter.incr(i) for i in range(1, 4)]
            assert [await c for c in calls] == [1, 3, 6]
            assert await counter.n == 6
            assert await counter.incr(1).result(timeout=10) == 7
            with pytest.raises(KeyError, match="async-failure"):
                await counter.fail("async-failure")
            handle: Any = shoal.remote(Counter).remote(3)
            assert await handle.incr(1) == 4

    with no_leaks(timeout=10):
        asyncio.run(main())


def test_losing_the_actors_worker_fails_later_calls() -> None:
    # given an actor on one of two worker processes (the class travels by value)
    class Tracker:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def add(self, x: int) -> int:
            self.seen.append(x)
            return len(self.seen)

    with gen_cluster(n_workers=2, threads_per_worker=1, processes=True) as client:
        future = client.submit(Tracker, actor=True)
        tracker = future.result(timeout=20)
        assert tracker.add(1).result(timeout=10) == 1
        (address,) = client.who_has([future])[future.key]
        # (a task in the other worker process calls it too, through its worker's client)
        (other,) = set(client.nthreads()) - {address}
        remote_add = client.submit(lambda t: t.add(10).result(timeout=10), tracker,
                                   workers=[other], pure=False)  # fmt: skip
        assert remote_add.result(timeout=10) == 2

        # when its worker process is killed
        pids = client.run(os.getpid)
        os.kill(pids[address], signal.SIGKILL)
        wait_until(lambda: address not in client.nthreads(), timeout=15,
                   message="the scheduler notices the worker is gone")  # fmt: skip

        # then the next call fails, soon, naming the actor and the worker
        with pytest.raises(shoal.ActorLostError) as info:
            tracker.add(2).result(timeout=10)
        assert "Tracker" in str(info.value) and address in str(info.value)
        # and so does every call after it
        with pytest.raises(shoal.ActorLostError):
            tracker.add(3).result(timeout=10)
