"""Tasks that launch tasks: `shoal.get_client()` inside a task, and seceding while waiting.

A task waiting on its subtasks gives its thread slot back (secedes), so even one worker
with one thread runs a recursive computation to the end instead of deadlocking.
"""

from __future__ import annotations

import threading
import uuid

import pytest

import shoal
from shoal.testing import gen_cluster
from shoal.worker.context import get_worker


def fib(n: int) -> int:
    """Recursive Fibonacci, one task per call (pure keys: each fib(k) runs once)."""
    if n < 2:
        return n
    client = shoal.get_client()
    a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
    return int(a.result()) + int(b.result())


def fib_tree(n: int) -> int:
    """Like `fib`, but every call is its own task (no shared keys): a full call tree."""
    if n < 2:
        return n
    client = shoal.get_client()
    a = client.submit(fib_tree, n - 1, pure=False)
    b = client.submit(fib_tree, n - 2, pure=False)
    return int(a.result()) + int(b.result())


def child(i: int, j: int) -> int:
    return i * 10 + j


def parent(i: int) -> int:
    client = shoal.get_client()
    futures = [client.submit(child, i, j) for j in range(3)]
    if i % 3 == 0:
        return sum(client.gather(futures))
    if i % 3 == 1:
        shoal.wait(futures)
        return sum(f.result() for f in futures)
    return sum(f.result() for f in shoal.as_completed(futures))


def test_recursive_fib_on_one_worker_with_one_thread() -> None:
    # given one in-process worker with a single thread
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as client:
        # when a task computes fib recursively with get_client().submit(...).result()
        # then each waiting task gives its slot back, and the recursion finishes
        assert client.submit(fib, 15).result(timeout=20) == 610
        # and so does a full call tree (177 tasks, most of them waiting at some point)
        assert client.submit(fib_tree, 10, pure=False).result(timeout=20) == 55


def test_recursive_fib_in_a_worker_process_with_one_thread() -> None:
    # given one worker process with a single thread (the function travels by value)
    def fib_here(n: int) -> int:
        if n < 2:
            return n
        client = shoal.get_client()
        return int(client.submit(fib_here, n - 1).result()) + int(
            client.submit(fib_here, n - 2).result())

    with gen_cluster(n_workers=1, threads_per_worker=1, processes=True) as client:
        # when it computes fib recursively, then it finishes
        assert client.submit(fib_here, 9).result(timeout=20) == 34


def test_many_tasks_each_launching_subtasks_finish(client: shoal.Client) -> None:
    # given 2 workers with 1 thread each, and more parents than threads, each waiting on
    # subtasks (with gather, wait and as_completed)
    futures = client.map(parent, range(24))
    # then every parent finishes
    assert client.gather(futures) == [sum(i * 10 + j for j in range(3)) for i in range(24)]


def test_inside_a_task_default_client_is_the_workers_client(client: shoal.Client) -> None:
    def which() -> tuple[str, str, bool]:
        mine = shoal.get_client()
        return mine.name, get_worker().name, shoal.default_client() is mine

    # when tasks ask for their client
    name, worker, same = client.submit(which).result(timeout=10)
    # then it is one their worker made (not the test's), and default_client agrees
    assert name == f"{worker}-tasks" and name != client.name
    assert same
    # and outside tasks get_client is the default client
    assert shoal.get_client() is client is shoal.default_client()


_EVENTS: dict[str, threading.Event] = {}


def wait_seceded(name: str) -> bool:
    shoal.secede()
    try:
        return _EVENTS[name].wait(10)
    finally:
        shoal.rejoin()


def set_event(name: str) -> str:
    _EVENTS[name].set()
    return get_worker().address


def test_explicit_secede_lets_the_next_task_run() -> None:
    # given one worker with one thread, and a task that waits for a second one
    name = uuid.uuid4().hex
    _EVENTS[name] = threading.Event()
    try:
        with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as client:
            waiting = client.submit(wait_seceded, name, priority=10)
            setter = client.submit(set_event, name)
            # when the first secedes, then the second runs on the freed slot
            assert setter.result(timeout=10)
            # and the first, rejoining, sees it did
            assert waiting.result(timeout=10) is True
    finally:
        _EVENTS.pop(name).set()


def test_secede_and_rejoin_outside_tasks_do_nothing() -> None:
    shoal.secede()
    shoal.rejoin()
    with pytest.raises(ValueError, match="inside a task"):
        get_worker()
