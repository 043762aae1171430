"""Events, queues and variables: values and futures, between clients and tasks, timeouts."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension
from shoal.testing import wait_until


def inc(x: int) -> int:
    return x + 1


# ------------------------------------------------------------------ events


def test_event_wait_times_out_then_wakes_on_set(
    client: shoal.Client, connect: Callable[[], shoal.Client], coordination: CoordinationExtension
) -> None:
    event = shoal.Event("go")
    assert event.is_set() is False
    # when nobody sets it, then wait returns False after about its timeout
    start = time.monotonic()
    assert event.wait(timeout=0.2) is False
    assert 0.2 <= time.monotonic() - start < 0.2 + 10  # waited its timeout, did not hang
    # when another client sets it, then a waiter wakes
    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(event.wait(timeout=10)))
    thread.start()
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the wait is registered")
    shoal.Event("go", client=connect()).set()
    thread.join(10)
    assert woke == [True] and event.is_set()
    assert event.wait(timeout=0) is True
    event.clear()
    assert event.is_set() is False


def _wait_for(name: str) -> bool:
    return bool(shoal.Event(name).wait(timeout=10))


def test_tasks_wait_for_an_event(client: shoal.Client, coordination: CoordinationExtension) -> None:
    futures = [client.submit(_wait_for, "start", pure=False) for _ in range(2)]
    wait_until(lambda: len(coordination.state.waiting) == 2, message="both tasks wait")
    assert not any(f.done() for f in futures)
    shoal.Event("start").set()
    assert client.gather(futures) == [True, True]


# ------------------------------------------------------------------ queues


def test_queue_carries_values_and_futures_in_order(client: shoal.Client) -> None:
    q = shoal.Queue("q")
    future = client.submit(inc, 1)
    q.put(future)
    q.put({"plain": [1, 2]})
    q.put(None)
    assert q.qsize() == 3
    got = q.get(timeout=5)
    assert isinstance(got, shoal.Future) and got.key == future.key
    assert got.result(timeout=10) == 2
    assert q.get(timeout=5) == {"plain": [1, 2]}
    assert q.get(timeout=5) is None
    assert q.qsize() == 0


def test_queue_keeps_a_future_alive_until_it_is_taken(
    client: shoal.Client, connect: Callable[[], shoal.Client]
) -> None:
    # given a future put in a queue by a client that then drops it and closes
    other = connect()
    future = other.submit(inc, 41, key="kept-alive")
    future.result(timeout=10)
    shoal.Queue("q", client=other).put(future)
    del future
    gc.collect()
    other.close()
    state = client.cluster.scheduler.state
    wait_until(lambda: state.tasks["kept-alive"].who_wants.keys() == {"queue:q"},
               message="only the queue holds the key")  # fmt: skip
    # when another client takes it, then it still has its value
    got = shoal.Queue("q").get(timeout=5)
    assert got.result(timeout=10) == 42
    # and once that client drops it too, then the scheduler forgets the key
    del got
    gc.collect()
    wait_until(lambda: "kept-alive" not in state.tasks, message="the key is forgotten")


def test_queue_get_times_out_and_batches(client: shoal.Client) -> None:
    q = shoal.Queue()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="stayed empty"):
        q.get(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 0.2 + 10  # waited its timeout, did not hang
    assert q.get(batch=True) == []
    for i in range(5):
        q.put(i)
    assert q.get(batch=2) == [0, 1]
    assert q.get(batch=True) == [2, 3, 4]
    with pytest.raises(ValueError, match="batch"):
        q.get(batch=0)


def test_bounded_queue_put_waits_for_room(
    client: shoal.Client, connect: Callable[[], shoal.Client], coordination: CoordinationExtension
) -> None:
    q = shoal.Queue("bounded", maxsize=1)
    q.put("a")
    with pytest.raises(TimeoutError, match="stayed full"):
        q.put("b", timeout=0.1)
    # when a put waits and another client takes, then the put goes in
    thread = threading.Thread(target=lambda: q.put("c", timeout=10))
    thread.start()
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the put waits")
    assert shoal.Queue("bounded", client=connect()).get(timeout=5) == "a"
    thread.join(10)
    assert q.get(timeout=5) == "c"


def _produce(n: int) -> int:
    q = shoal.Queue("work")
    for i in range(n):
        q.put(i)
    return n


def test_tasks_feed_a_queue_a_client_drains(client: shoal.Client) -> None:
    client.submit(_produce, 5).result(timeout=10)
    q = shoal.Queue("work")
    assert [q.get(timeout=5) for _ in range(5)] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------- variables


def test_variable_get_times_out_until_set(client: shoal.Client) -> None:
    var = shoal.Variable("x")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not set"):
        var.get(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 0.3 + 10  # waited its timeout, did not hang
    var.set(3)
    assert var.get(timeout=1) == 3
    var.delete()
    with pytest.raises(TimeoutError):
        var.get(timeout=0.05)


def test_variable_set_wakes_a_waiting_get_in_a_task(
    client: shoal.Client, coordination: CoordinationExtension
) -> None:
    future = client.submit(lambda: shoal.Variable("v").get(timeout=10), pure=False)
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the task waits")
    shoal.Variable("v").set("hello")
    assert future.result(timeout=10) == "hello"


def test_variable_holds_a_future_until_overwritten(client: shoal.Client) -> None:
    var = shoal.Variable("v")
    future = client.submit(inc, 1, key="held-by-variable")
    var.set(future)
    del future
    gc.collect()
    got = var.get(timeout=5)
    assert isinstance(got, shoal.Future) and got.result(timeout=10) == 2
    del got
    gc.collect()
    state = client.cluster.scheduler.state
    wait_until(lambda: state.tasks["held-by-variable"].who_wants.keys() == {"variable:v"},
               message="only the variable holds the key")  # fmt: skip
    var.set("something else")
    wait_until(lambda: "held-by-variable" not in state.tasks, message="the key is released")
