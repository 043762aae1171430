"""`client.get_executor()`: a concurrent.futures.Executor with the standard semantics."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import threading
import weakref
from typing import Any, ClassVar

import pytest

import shoal
from shoal.integrations.executor import ShoalExecutor, ShoalFuture
from shoal.testing import Gate, wait_until
from shoal.worker.context import get_worker


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def double(x: int) -> int:
    return 2 * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


class Box:
    """A result type that can be weakly referenced."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_box(x: int) -> Box:
    return Box(x)


def where_am_i(_: Any = None) -> str:
    return get_worker().address


def test_submit_returns_real_futures_and_passes_every_keyword(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        assert isinstance(ex, cf.Executor) and isinstance(ex, ShoalExecutor)
        fut = ex.submit(echo, 1, 2, fn="f", self="s", key="k", pure="p", priority="q")
        assert isinstance(fut, cf.Future) and isinstance(fut, ShoalFuture)
        assert fut.result(timeout=10) == ((1, 2), {"fn": "f", "self": "s", "key": "k",
                                                    "pure": "p", "priority": "q"})  # fmt: skip
        assert fut.done() and not fut.cancelled() and fut.exception() is None


def test_every_call_runs_even_with_equal_arguments(client: shoal.Client, tally: Any) -> None:
    with client.get_executor() as ex:
        futures = [ex.submit(tally.record, "same") for _ in range(3)]
        assert [f.result(timeout=10) for f in futures] == ["same"] * 3
    assert tally.count("same") == 3


def test_exceptions_keep_their_type(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        fut = ex.submit(fail_on, 3, bad=3)
        with pytest.raises(ValueError, match="bad value 3"):
            fut.result(timeout=10)
        error = fut.exception(timeout=10)
        assert isinstance(error, ValueError)
        assert isinstance(error.__cause__, shoal.RemoteTraceback)


def test_map_yields_results_in_order(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        assert list(ex.map(double, range(20))) == [2 * i for i in range(20)]
        assert list(ex.map(pow, [2, 3, 4], [3, 2, 1])) == [8, 9, 4]
        assert list(ex.map(double, range(10), chunksize=3)) == [2 * i for i in range(10)]
        assert list(ex.map(double, [])) == []
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(double, range(3), chunksize=0)


def test_map_raises_a_calls_exception_from_the_iterator(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        results = ex.map(fail_on, range(5), [2] * 5)
        assert next(results) == 0
        assert next(results) == 1
        with pytest.raises(ValueError, match="bad value 2"):
            next(results)


def test_map_keeps_no_reference_to_yielded_results(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        results = ex.map(make_box, range(4))
        first = next(results)
        assert first.value == 0
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None, "the iterator still refers to a result it yielded"
        assert [b.value for b in results] == [1, 2, 3]


def test_map_timeout_raises_from_the_iterator_and_cancels_the_rest(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    with client.get_executor() as ex:
        results = ex.map(gate, range(4), timeout=0.3)  # submitted now, lazily read
        with pytest.raises(cf.TimeoutError):
            next(results)
        shoal_keys = list(client._states)
        gate.open()
        # Every call was cancelled: the cluster forgets them, nothing is left pending here.
        wait_until(lambda: not ex._pending, timeout=10, message="the map's futures settle")
        del results
        wait_until(lambda: not (set(client._states) & set(shoal_keys)) , timeout=10,
                   message="the cancelled calls are released")  # fmt: skip


def test_wait_and_as_completed_from_the_standard_library(client: shoal.Client, gate: Gate) -> None:
    with client.get_executor() as ex:
        blocked = ex.submit(gate, "late")
        quick = [ex.submit(double, i) for i in range(5)]
        done, not_done = cf.wait(quick + [blocked], timeout=10, return_when=cf.FIRST_COMPLETED)
        assert done and blocked in not_done
        done, not_done = cf.wait(quick, timeout=10)
        assert done == set(quick) and not not_done
        assert sorted(f.result() for f in cf.as_completed(quick, timeout=10)) == [0, 2, 4, 6, 8]
        with pytest.raises(cf.TimeoutError):
            list(cf.as_completed([blocked], timeout=0.2))
        gate.open()
        assert [f.result() for f in cf.as_completed([blocked], timeout=10)] == ["late"]


def test_done_callbacks_run_with_the_future(client: shoal.Client) -> None:
    seen: list[Any] = []
    called = threading.Event()
    with client.get_executor() as ex:
        fut = ex.submit(double, 21)

        def callback(f: cf.Future[Any]) -> None:
            seen.append(f.result())
            called.set()

        fut.add_done_callback(callback)
        assert called.wait(10)
    assert seen == [42]


def test_cancel_a_pending_call(client: shoal.Client, gate: Gate) -> None:
    with client.get_executor() as ex:
        fut = ex.submit(gate, 1)
        key = fut.key
        assert key is not None and fut.cancel()
        assert fut.cancelled() and fut.done()
        with pytest.raises(cf.CancelledError):
            fut.result()
        wait_until(lambda: key not in client._states, timeout=10, message="the key is released")
        gate.open()


def test_shutdown_cancel_futures_and_submit_after_shutdown(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    ex = client.get_executor()
    running = [ex.submit(gate, i) for i in range(4)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in running)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(double, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(double, [1])
    gate.open()
    # The client is still usable: shutdown stops only the executor.
    assert client.submit(double, 4).result(timeout=10) == 8


def test_shutdown_wait_waits_for_every_call(client: shoal.Client, gate: Gate) -> None:
    ex = client.get_executor()
    futures = [ex.submit(gate, i) for i in range(3)]
    threading.Timer(0.2, gate.open).start()
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2]


def test_context_manager_waits_on_exit(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        futures = [ex.submit(double, i) for i in range(10)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [2 * i for i in range(10)]


def test_submit_options_apply_to_every_call(client: shoal.Client) -> None:
    workers = sorted(client.nthreads())
    with client.get_executor(workers=[workers[0]]) as ex:
        futures = [ex.submit(where_am_i, i) for i in range(6)]
        assert {f.result(timeout=10) for f in futures} == {workers[0]}
    assert all(f.key is None for f in futures)  # the task is let go once the result is here
    with pytest.raises(TypeError, match="unknown task option"):
        client.get_executor(colour="red")


def test_results_are_released_on_the_cluster_once_here(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        futures = [ex.submit(double, i) for i in range(5)]
        cf.wait(futures, timeout=10)
    wait_until(lambda: not client.who_has(), timeout=10, message="the cluster holds nothing")


def test_wrap_future_for_asyncio(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        async def main() -> int:
            value: int = await asyncio.wrap_future(ex.submit(double, 5))
            return value

        assert asyncio.run(main()) == 10


def test_a_call_cancelled_through_the_client_is_cancelled_here(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    with client.get_executor() as ex:
        fut = ex.submit(gate, 1)
        shoal_future = fut._shoal
        assert shoal_future is not None
        client.cancel([shoal_future])
        done, _ = cf.wait([fut], timeout=10)
        assert fut in done and fut.cancelled()
        gate.open()


# ------------------------------------------- done callbacks never hold up result delivery


class Unpickled:
    """A result that notes, when unpickled on the client, whether it was on an event loop."""

    #: (payload size, whether it was unpickled on a running event loop), for each unpickling
    unpickled: ClassVar[list[tuple[int, bool]]] = []

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unpickled, (self.payload,))


def _rebuild_unpickled(payload: bytes) -> Unpickled:
    try:
        asyncio.get_running_loop()
        on_a_loop = True
    except RuntimeError:
        on_a_loop = False
    Unpickled.unpickled.append((len(payload), on_a_loop))
    return Unpickled(payload)


def make_unpickled(nbytes: int) -> Unpickled:
    return Unpickled(b"x" * nbytes)


def _two_executors(client: shoal.Client) -> tuple[ShoalExecutor, ShoalExecutor]:
    """One executor per worker, so a gated call never queues a quick one behind it."""
    first, second = sorted(client.nthreads())
    return client.get_executor(workers=[first]), client.get_executor(workers=[second])


def _call_from_a_callback(future: cf.Future[Any], fn: Any) -> tuple[threading.Event, list[Any]]:
    """Add a done callback to ``future`` that calls ``fn()``; the event is set once it has
    returned (or raised), and the list holds what it returned or raised."""
    outcome: list[Any] = []
    returned = threading.Event()

    def callback(_: cf.Future[Any]) -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)
        finally:
            returned.set()

    future.add_done_callback(callback)
    return returned, outcome


def test_a_done_callback_may_wait_for_the_result_of_a_pending_future(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    quick_ex, gated_ex = _two_executors(client)
    with quick_ex, gated_ex:
        pending = gated_ex.submit(gate, "late")
        quick = quick_ex.submit(double, 1)

        def wait_for_pending() -> Any:
            assert not pending.done()  # the gate is still shut: it is pending for real
            gate.open()
            return pending.result(timeout=10)

        returned, outcome = _call_from_a_callback(quick, wait_for_pending)
        assert returned.wait(30), "the callback never returned"
        assert outcome == ["late"]


def test_a_done_callback_may_call_concurrent_futures_wait(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    quick_ex, gated_ex = _two_executors(client)
    with quick_ex, gated_ex:
        pending = [gated_ex.submit(gate, i) for i in range(3)]
        quick = quick_ex.submit(double, 1)

        def wait_for_pending() -> Any:
            gate.open()
            done, not_done = cf.wait(pending, timeout=10)
            return len(done), len(not_done)

        returned, outcome = _call_from_a_callback(quick, wait_for_pending)
        assert returned.wait(30), "the callback never returned"
        assert outcome == [(3, 0)]


def test_a_done_callback_may_shut_the_executor_down_and_wait(
        client: shoal.Client, gate: Gate) -> None:  # fmt: skip
    quick_ex, gated_ex = _two_executors(client)
    pending = [gated_ex.submit(gate, i) for i in range(3)]
    quick = quick_ex.submit(double, 1)

    def shut_down() -> Any:
        gate.open()
        gated_ex.shutdown(wait=True)
        return [f.done() for f in pending]

    returned, outcome = _call_from_a_callback(quick, shut_down)
    try:
        assert returned.wait(30), "the callback never returned"
        assert outcome == [[True, True, True]]
        assert [f.result(timeout=0) for f in pending] == [0, 1, 2]
    finally:
        for f in pending:
            f.cancel()  # unblocks a stuck shutdown, should there be one
        quick_ex.shutdown()


def test_a_slow_done_callback_does_not_hold_up_other_results(client: shoal.Client) -> None:
    release = threading.Event()
    with client.get_executor() as ex:
        first = ex.submit(double, 1)
        returned, _ = _call_from_a_callback(first, lambda: release.wait(60))
        try:
            wait_until(first.done, timeout=10, message="the first call is done")
            others = [ex.submit(double, i) for i in range(5)]
            wait_until(lambda: all(f.done() for f in others), timeout=10,
                       message="the other calls finish while a callback is busy")  # fmt: skip
            assert [f.result() for f in others] == [0, 2, 4, 6, 8]
            assert not returned.is_set()  # the slow callback is still running
        finally:
            release.set()
        assert returned.wait(30)


def test_done_callbacks_run_off_the_event_loop_in_order(client: shoal.Client) -> None:
    with client.get_executor() as ex:
        done_already = ex.submit(double, 1)
        done_already.result(timeout=10)
        calls: list[tuple[int, Any, bool]] = []
        finished = threading.Event()

        def note(i: int) -> Any:
            def callback(f: cf.Future[Any]) -> None:
                try:
                    asyncio.get_running_loop()
                    on_loop = True
                except RuntimeError:
                    on_loop = False
                calls.append((i, f.result(), on_loop))
                if len(calls) == 4:
                    finished.set()
            return callback

        late = ex.submit(double, 10)
        for i in range(3):
            late.add_done_callback(note(i))
        done_already.add_done_callback(note(3))  # done already: runs now, here, as cf does
        assert finished.wait(30)
    assert (3, 2, False) in calls
    assert [c for c in calls if c[0] != 3] == [(0, 20, False), (1, 20, False), (2, 20, False)]


def test_large_results_are_not_unpickled_on_the_event_loop(client: shoal.Client) -> None:
    Unpickled.unpickled.clear()
    with client.get_executor() as ex:
        big = ex.submit(make_unpickled, 3_000_000)
        small = ex.submit(make_unpickled, 10)
        assert len(big.result(timeout=30).payload) == 3_000_000
        assert len(small.result(timeout=30).payload) == 10
    # The 3 MB result was unpickled off the loop (small ones may be unpickled on it).
    assert (3_000_000, False) in Unpickled.unpickled and len(Unpickled.unpickled) == 2
