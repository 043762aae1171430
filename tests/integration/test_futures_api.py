"""The `Future` API and the ways to wait on many: done, status, key, exception, cancel,
callbacks, `shoal.wait` and `shoal.as_completed`."""

from __future__ import annotations

import threading

import pytest

import shoal
from shoal.testing import Gate, wait_until


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


def test_key_status_and_done_follow_the_task(client: shoal.Client, gate: Gate) -> None:
    # given a task held at the gate
    future = client.submit(gate, 1)
    # then it is pending and named after its function
    assert future.key.startswith("gate-")
    assert future.status == "pending" and not future.done()
    # when the gate opens, then it finishes
    gate.open()
    assert future.result(timeout=10) == 1
    assert future.status == "finished" and future.done()


def test_exception_is_none_for_a_success_and_the_error_for_a_failure(client: shoal.Client) -> None:
    good, bad = client.submit(inc, 1), client.submit(fail, 1)
    assert good.exception(timeout=10) is None
    error = bad.exception(timeout=10)
    assert isinstance(error, ValueError) and str(error) == "bad input 1"
    assert bad.status == "error"


def test_cancel_a_pending_future(client: shoal.Client, gate: Gate) -> None:
    # given a task that cannot finish yet
    future = client.submit(gate, 2)
    # when it is cancelled
    assert future.cancel() is True
    # then it is done, cancelled, and result() raises CancelledError
    wait_until(future.done, timeout=5, message="future done after cancel")
    assert future.cancelled() and future.status == "cancelled"
    with pytest.raises(shoal.CancelledError):
        future.result(timeout=5)


def test_cancel_a_finished_future_does_nothing(client: shoal.Client) -> None:
    future = client.submit(inc, 1)
    assert future.result(timeout=10) == 2
    assert future.cancel() is False
    assert future.status == "finished"


def test_done_callback_gets_the_future(client: shoal.Client, gate: Gate) -> None:
    # given a callback registered before the task finishes
    seen: list[shoal.Future] = []
    called = threading.Event()

    def callback(f: shoal.Future) -> None:
        seen.append(f)
        called.set()

    future = client.submit(gate, 3)
    future.add_done_callback(callback)
    assert not called.is_set()
    # when the task finishes, then the callback runs once with the future
    gate.open()
    assert called.wait(10)
    assert seen == [future] and seen[0].result(timeout=5) == 3


def test_done_callback_on_a_finished_future_runs_at_once(client: shoal.Client) -> None:
    future = client.submit(inc, 1)
    future.result(timeout=10)
    called = threading.Event()
    future.add_done_callback(lambda f: called.set())
    assert called.wait(10)


def test_wait_all_completed(client: shoal.Client) -> None:
    futures = client.map(inc, range(5))
    done, not_done = shoal.wait(futures, timeout=10)
    assert done == set(futures) and not not_done


def test_wait_first_completed_returns_when_one_is_done(client: shoal.Client, gate: Gate) -> None:
    # given one quick task and one held at the gate
    quick, held = client.submit(inc, 1), client.submit(gate, 1)
    # when waiting for the first
    done, not_done = shoal.wait([quick, held], timeout=10, return_when="FIRST_COMPLETED")
    # then the quick one is done and the held one is not
    assert done == {quick} and not_done == {held}


def test_wait_returns_at_its_timeout_with_what_is_not_done(client: shoal.Client,
                                                           gate: Gate) -> None:  # fmt: skip
    held = client.submit(gate, 1)
    done, not_done = shoal.wait([held], timeout=0.2)
    assert not done and not_done == {held}


def test_wait_rejects_an_unknown_mode(client: shoal.Client) -> None:
    with pytest.raises(ValueError, match="return_when"):
        shoal.wait([client.submit(inc, 1)], return_when="SOMETIMES")


def test_as_completed_yields_each_future_once(client: shoal.Client) -> None:
    futures = client.map(inc, range(10))
    seen = list(shoal.as_completed(futures))
    assert sorted(f.key for f in seen) == sorted(f.key for f in futures)


def test_as_completed_yields_in_completion_order(client: shoal.Client, gate: Gate) -> None:
    # given a held task submitted before a quick one
    held, quick = client.submit(gate, "held"), client.submit(inc, 1)
    iterator = shoal.as_completed([held, quick])
    # then the quick one comes first, the held one after the gate opens
    assert next(iterator) == quick
    gate.open()
    assert next(iterator) == held
    with pytest.raises(StopIteration):
        next(iterator)


def test_as_completed_with_results(client: shoal.Client) -> None:
    futures = client.map(inc, range(5))
    pairs = list(shoal.as_completed(futures, with_results=True))
    assert sorted(result for _, result in pairs) == [1, 2, 3, 4, 5]
    assert all(f.result(timeout=5) == r for f, r in pairs)


def test_as_completed_with_results_reports_errors_when_asked(client: shoal.Client) -> None:
    good, bad = client.submit(inc, 1), client.submit(fail, 2)
    pairs = dict(shoal.as_completed([good, bad], with_results=True, raise_errors=False))
    assert pairs[good] == 2
    assert isinstance(pairs[bad], ValueError)


def test_as_completed_with_results_raises_errors_by_default(client: shoal.Client) -> None:
    with pytest.raises(ValueError, match="bad input 3"):
        list(shoal.as_completed([client.submit(fail, 3)], with_results=True))


def test_resubmitting_a_cancelled_call_runs_it_again(client: shoal.Client, gate: Gate) -> None:
    # given a cancelled task whose future is still held
    first = client.submit(gate, "again")
    first.cancel()
    client.who_has()  # a round trip: the scheduler has handled the cancel and answered
    assert first.cancelled()
    # when the same call is submitted again
    gate.open()
    second = client.submit(gate, "again")
    # then it runs, and the old handle stays cancelled
    assert second.result(timeout=10) == "again"
    assert first.cancelled()


def test_cancel_then_resubmit_at_once_runs_it_again(client: shoal.Client, gate: Gate) -> None:
    # given a call cancelled and submitted again straight away, with no round trip between
    first = client.submit(gate, "quick")
    first.cancel()
    second = client.submit(gate, "quick")
    # then the new submission is not caught by the old cancel
    gate.open()
    assert second.result(timeout=10) == "quick"
    assert first.cancelled()
