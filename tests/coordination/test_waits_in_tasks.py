"""A task waiting on a coordination primitive gives its thread slot back, as `Future.result`
does: on one worker with one thread, the task queued behind the waiter runs, and may be the
one that ends the wait.

Each test starts the waiting task first, waits until the scheduler has registered its wait
(so the waiter really holds the only slot), then submits the task that must run meanwhile.
A test that fails leaves the waiter unblocked from the test's client, so the cluster closes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension
from shoal.testing import gen_cluster, wait_until


@pytest.fixture
def one_slot() -> Iterator[shoal.Client]:
    """A client on one in-process worker with one thread."""
    with gen_cluster(n_workers=1, threads_per_worker=1) as c:
        yield c


def _coordination(client: shoal.Client) -> CoordinationExtension:
    return next(e for e in client.cluster.scheduler.extensions
                if isinstance(e, CoordinationExtension))  # fmt: skip


def _waits_for(client: shoal.Client, kind: str, name: object) -> None:
    """Wait until the scheduler holds a waiter of ``kind`` on ``name`` (its real wait, not
    the first try that does not wait)."""
    waiting = _coordination(client).state.waiting
    wait_until(lambda: (kind, name) in list(waiting.values()),
               message=f"a {kind} wait on {name!r}")  # fmt: skip


def _behind(client: shoal.Client, task: Callable[[], object],
            unblock: Callable[[], object]) -> object:  # fmt: skip
    """Submit ``task`` (queued behind the waiting one) and return its result. If it does not
    finish, ``unblock`` ends the wait from the client, so that the cluster can close."""
    future = client.submit(task, pure=False)
    try:
        return future.result(timeout=15)
    except BaseException:
        unblock()
        raise


def test_queue_get_in_a_task_lets_the_producer_behind_it_run(one_slot: shoal.Client) -> None:
    # given a task waiting on an empty queue, holding the only thread
    waiter = one_slot.submit(lambda: shoal.Queue("q").get(), pure=False)
    _waits_for(one_slot, "queue-get", "q")
    # when a task that puts into that queue is submitted
    _behind(one_slot, lambda: shoal.Queue("q").put(1), lambda: shoal.Queue("q").put("unblocked"))
    # then the producer ran, and the waiter got its item
    assert waiter.result(timeout=15) == 1


def test_bounded_queue_put_in_a_task_lets_the_consumer_behind_it_run(
    one_slot: shoal.Client,
) -> None:
    # given a full bounded queue, and a task waiting to put into it
    shoal.Queue("b", maxsize=1).put("first")
    waiter = one_slot.submit(lambda: shoal.Queue("b", maxsize=1).put("second"), pure=False)
    _waits_for(one_slot, "queue-put", "b")

    # when a task that takes from it is submitted, then it runs and the put goes in
    def take() -> object:
        return shoal.Queue("b").get()

    assert _behind(one_slot, take, take) == "first"
    waiter.result(timeout=15)
    assert shoal.Queue("b").get(timeout=5) == "second"


def test_event_wait_in_a_task_lets_the_setter_behind_it_run(one_slot: shoal.Client) -> None:
    waiter = one_slot.submit(lambda: shoal.Event("e").wait(), pure=False)
    _waits_for(one_slot, "event", "e")
    _behind(one_slot, lambda: shoal.Event("e").set(), lambda: shoal.Event("e").set())
    assert waiter.result(timeout=15) is True


def test_variable_get_in_a_task_lets_the_setter_behind_it_run(one_slot: shoal.Client) -> None:
    waiter = one_slot.submit(lambda: shoal.Variable("v").get(), pure=False)
    _waits_for(one_slot, "variable", "v")
    _behind(one_slot, lambda: shoal.Variable("v").set("value"),
            lambda: shoal.Variable("v").set("unblocked"))  # fmt: skip
    assert waiter.result(timeout=15) == "value"


def test_sub_get_in_a_task_lets_the_publisher_behind_it_run(one_slot: shoal.Client) -> None:
    def receive() -> object:
        with shoal.Sub("t") as sub:
            return sub.get()

    waiter = one_slot.submit(receive, pure=False)
    # the task holds the only thread from subscribing until it waits in get
    wait_until(lambda: "t" in _coordination(one_slot).state.topics, message="subscribed")
    _behind(one_slot, lambda: shoal.Pub("t").put("news"), lambda: shoal.Pub("t").put("unblocked"))
    assert waiter.result(timeout=15) == "news"


@pytest.mark.parametrize("make", [lambda: shoal.Lock("l"), lambda: shoal.Semaphore(name="l")],
                         ids=["lock", "semaphore"])  # fmt: skip
def test_lease_acquire_in_a_task_lets_the_task_behind_it_run(
    one_slot: shoal.Client, make: Callable[[], shoal.Lock | shoal.Semaphore]
) -> None:
    # given a lease held by the client, and a task waiting for it
    held = make()
    assert held.acquire()

    def acquire_and_release() -> bool:
        lease = make()
        granted = bool(lease.acquire())
        lease.release()
        return granted

    waiter = one_slot.submit(acquire_and_release, pure=False)
    kind = "lock" if isinstance(held, shoal.Lock) else "semaphore"
    _waits_for(one_slot, "semaphore", (kind, "l"))
    # when another task is submitted, then it runs while the first still waits
    assert _behind(one_slot, lambda: "ran", held.release) == "ran"
    assert not waiter.done()
    # and once the lease is given back, the waiter gets it
    held.release()
    assert waiter.result(timeout=15) is True


def _acquire_and_release(name: str) -> bool:
    lock = shoal.Lock(name)
    granted = bool(lock.acquire())
    lock.release()
    return granted


def test_a_task_secedes_only_when_it_must_wait(
    one_slot: shoal.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: the worker's secessions counted
    [worker] = one_slot.cluster.workers
    seceded: list[str] = []
    secede_task = worker.secede_task

    def counting_secede(key: str) -> None:
        seceded.append(key)
        secede_task(key)

    monkeypatch.setattr(worker, "secede_task", counting_secede)
    shoal.Queue("ready").put(1)
    shoal.Event("set").set()
    # when: tasks call what can answer at once, then they keep their slot
    assert one_slot.submit(lambda: shoal.Queue("ready").get(), pure=False).result(15) == 1
    assert one_slot.submit(lambda: shoal.Event("set").wait(), pure=False).result(15) is True
    assert one_slot.submit(_acquire_and_release, "free", pure=False).result(15) is True
    assert seceded == []
    # when: one must wait, then it secedes for the wait
    waiter = one_slot.submit(lambda: shoal.Queue("later").get(), pure=False)
    _waits_for(one_slot, "queue-get", "later")
    shoal.Queue("later").put(2)
    assert waiter.result(timeout=15) == 2
    assert seceded == [waiter.key]
