"""Holds on keys, their release and their generations: the client-side defects of issue #10.

Each test here failed (hung, or gave a wrong answer) before the fix it names.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
import pytest

import shoal
from shoal.protocol.messages import KeyCancelled, KeyErred, KeyInMemory
from shoal.testing import Gate, wait_until

# Worker processes get this module's functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def run_with_deadline(body: Callable[[], Any], seconds: float, what: str) -> None:
    """Run ``body`` on a thread; fail (rather than hang the suite) if it does not end."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"deadline-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} hung for {seconds}s"
    if errors:
        raise errors[0]


# -------------------------------------------------- 1. the GC inside the client's lock


def test_a_future_collected_while_the_client_lock_is_held_does_not_deadlock(
        client: shoal.Client) -> None:  # fmt: skip
    # given a finished future that only a reference cycle keeps alive
    future = client.submit(inc, 1)
    assert future.result(timeout=10) == 2
    cycle: list[Any] = [future]
    cycle.append(cycle)
    key = future.key
    del future, cycle

    # when the cyclic GC runs on a thread that holds the client's lock (as it may inside
    # any allocation the client makes there)
    def collect_inside_the_lock() -> None:
        with client._lock:
            gc.collect()

    # then the finalizer neither takes the lock nor waits, and the key is released after
    run_with_deadline(collect_inside_the_lock, 10, "gc.collect() inside Client._lock")
    wait_until(lambda: key not in client._states, timeout=10, message="the key is released")


def test_failed_futures_in_cycles_under_frequent_gc_do_not_hang_the_client(
        client: shoal.Client) -> None:  # fmt: skip
    """The user's program from the issue: errors caught and ignored, gathers in between."""
    old = gc.get_threshold()
    gc.set_threshold(20, 2, 2)  # the cyclic GC runs inside the client's allocations

    def program() -> None:
        for i in range(150):
            try:
                client.submit(boom, i).result(timeout=10)
            except ValueError:
                pass  # the traceback -> frame -> future cycle is left for the GC
            assert client.gather(client.map(inc, range(20)), ) == list(range(1, 21))

    try:
        run_with_deadline(program, 120, "the submit/fail/gather loop")
    finally:
        gc.set_threshold(*old)


# ------------------------------------------------ 3. futures that arrive pickled


def test_a_future_arriving_through_a_queue_completes_in_another_client(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    future = client.submit(gate, 42, pure=False)
    shoal.Queue("handoff", client=client).put([future])  # in a list: pickled, not a key
    with shoal.Client(client.scheduler_address, set_as_default=False) as other:
        arrived = _get_in(other, "handoff")
        gate.open()
        assert arrived.result(timeout=10) == 42
        # the other client holds the key on its own: it stays in memory for it
        del future
        assert arrived.result(timeout=10) == 42
        del arrived


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


def test_an_actor_handle_in_a_result_belongs_to_the_client_that_fetched_it(client: shoal.Client) -> None:
    # given a newer client, which is now the process's default
    newer = shoal.Client(client.scheduler_address)
    try:
        # when the first client fetches an actor handle
        counter = client.submit(Counter, actor=True).result(timeout=10)
    finally:
        newer.close()
    # then it is held through the client that fetched it, which is still open
    assert counter.incr().result(timeout=10) == 1


def test_closing_a_newer_client_makes_the_older_one_the_default_again(
    client: shoal.Client,
) -> None:
    # given a newer client, the process's default while it is open
    newer = shoal.Client(client.scheduler_address)
    assert shoal.get_client() is newer
    # when it closes (a job that opened its own client, say), the older one is the default
    # again: it used to leave no default at all, and get_client() failed in other threads
    newer.close()
    assert shoal.get_client() is client


def _get_in(other: shoal.Client, name: str) -> shoal.Future:
    """Unpickle a queued future with ``other`` as the default client."""
    from shoal.client import client as client_module

    ref = weakref.ref(other)
    with client_module._defaults_lock:
        client_module._defaults.append(ref)  # the newest default
    try:
        [arrived] = shoal.Queue(name, client=other).get(timeout=10)
    finally:
        with client_module._defaults_lock:
            client_module._defaults.remove(ref)
    assert arrived.client is other
    return arrived


# ---------------------------------------- 7. late reports for an earlier hold of a key


def test_a_report_for_an_earlier_hold_does_not_finish_the_new_one(client: shoal.Client,
                                                                  gate: Gate) -> None:  # fmt: skip
    first = client.submit(lambda: 1, key="reused")
    assert first.result(timeout=10) == 1
    old_generation = first._state.generation
    first.release()
    wait_until(lambda: "reused" not in client._states, timeout=10, message="release counted")

    second = client.submit(gate, 2, key="reused", pure=False)
    assert second._state.generation > old_generation
    # a report about the first hold, late, lands now
    client._call_soon(client._on_message, KeyInMemory("reused", ["nowhere"], 8, "int",
                                                      None, old_generation))
    client._call_soon(client._on_message, KeyErred("reused", "lost", "late", generation=old_generation))
    client._call_soon(client._on_message, KeyCancelled("reused", "late", old_generation))
    client.who_has()  # a round trip on the loop: the late messages were handled before it
    assert second.status == "pending"
    gate.open()
    assert second.result(timeout=10) == 2


def test_release_then_resubmit_of_the_same_call_always_gives_its_result(
        client: shoal.Client) -> None:  # fmt: skip
    for i in range(200):
        future = client.submit(inc, i % 7)
        assert future.result(timeout=10) == i % 7 + 1
        del future  # released while a report may still be on its way
        again = client.submit(inc, i % 7)
        assert again.result(timeout=10) == i % 7 + 1
        del again


def test_cancel_then_resubmit_of_the_same_key_runs_anew(client: shoal.Client) -> None:
    for i in range(50):
        gate = Gate()
        try:
            first = client.submit(gate, "old", key=f"k-{i % 3}", pure=False)
            first.cancel()
            second = client.submit(str, "new", key=f"k-{i % 3}", pure=False)
        finally:
            gate.close()
        assert second.result(timeout=10) == "new"
        assert first.cancelled()
        with pytest.raises(shoal.CancelledError):
            first.result(timeout=1)


# ------------------------------------------------------------ 10. released handles


def test_a_released_future_says_so_instead_of_hanging(client: shoal.Client) -> None:
    a = client.submit(inc, 1)
    b = client.submit(inc, 2)
    a.release()
    b.release()
    with pytest.raises(shoal.FutureLostError, match="released"):
        a.result(timeout=5)
    # a late cancel of one released handle touches no other
    assert a.cancel() is False
    with pytest.raises(shoal.FutureLostError, match="released"):
        b.result(timeout=5)
    assert b.done() and not b.cancelled()


# ---------------------------------------------- 11. nothing keeps user objects alive


class Model:
    def __init__(self) -> None:
        self.weights = bytearray(10_000_000)

    def predict(self, x: int) -> int:
        return x + len(self.weights) // 10_000_000


def test_a_submitted_bound_method_does_not_keep_its_object_alive(
        process_client: shoal.Client) -> None:  # fmt: skip
    model = Model()
    alive = weakref.ref(model)
    futures = process_client.map(model.predict, range(5))
    assert process_client.gather(futures) == [1, 2, 3, 4, 5]
    single = process_client.submit(model.predict, 10)
    assert single.result(timeout=10) == 11
    del model, futures, single
    gc.collect()
    assert alive() is None, gc.get_referrers(alive())


def test_a_submitted_closure_does_not_outlive_its_futures(process_client: shoal.Client) -> None:
    def make() -> Callable[[], int]:
        big = Model()
        return lambda: len(big.weights)

    fn = make()
    alive = weakref.ref(fn)
    assert process_client.submit(fn).result(timeout=10) == 10_000_000
    del fn
    gc.collect()
    assert alive() is None


# ------------------------------ 7. threads scattering equal values (one content key)


def total(values: list[int]) -> int:
    return sum(values)


@pytest.mark.parametrize("cluster", ["client", "process_client"])
def test_threads_scattering_equal_values_never_lose_each_others_data(
        cluster: str, request: pytest.FixtureRequest) -> None:  # fmt: skip
    client: shoal.Client = request.getfixturevalue(cluster)
    errors: list[BaseException] = []

    def user(seed: int) -> None:
        try:
            for i in range(60):
                data = client.scatter(list(range(i % 4 + 10)))  # equal across threads
                assert client.submit(total, data, pure=False).result(timeout=10) == sum(
                    range(i % 4 + 10))
                del data  # dropped at once, while other threads scatter the same value
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a scattering thread hung"
    assert not errors, errors[:3]
