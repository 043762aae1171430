"""What users see when things go wrong: task errors with their remote traceback, warnings,
unpicklable arguments, a wrong address or token, a result that takes too long."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import warnings

import pytest

import shoal
from shoal.testing import Gate, gen_cluster, no_leaks, spawn_scheduler, spawn_worker, wait_until


class CustomError(Exception):
    pass


def explode_on_purpose(x: int) -> int:
    raise CustomError(f"exploded with {x}")


def inc(x: int) -> int:
    return x + 1


def warn_and_return(x: int) -> int:
    warnings.warn(f"careful with {x}", UserWarning, stacklevel=1)
    return x


def test_a_task_error_keeps_its_type_message_and_remote_traceback(client: shoal.Client) -> None:
    # when a task raises
    future = client.submit(explode_on_purpose, 7)
    # then result() raises the same type and message
    with pytest.raises(CustomError, match="exploded with 7") as info:
        future.result(timeout=10)
    # with the worker's traceback, naming the function, as its cause
    cause = info.value.__cause__
    assert isinstance(cause, shoal.RemoteTraceback)
    assert "explode_on_purpose" in cause.tb and "explode_on_purpose" in str(cause)
    assert future.status == "error"
    assert "explode_on_purpose" in (future.traceback(timeout=5) or "")


def test_gather_raises_the_task_error(client: shoal.Client) -> None:
    futures = [client.submit(inc, 1), client.submit(explode_on_purpose, 2)]
    with pytest.raises(CustomError, match="exploded with 2"):
        client.gather(futures)
    assert client.gather(futures, errors="skip")[0] == 2


def test_dependents_of_a_failed_task_raise_the_same_error(client: shoal.Client) -> None:
    # given a chain whose first task fails
    root = client.submit(explode_on_purpose, 3)
    child = client.submit(inc, root)
    grandchild = client.submit(inc, child)
    # then every task downstream raises the root's error
    for future in (child, grandchild):
        with pytest.raises(CustomError, match="exploded with 3"):
            future.result(timeout=10)


def test_warnings_in_a_task_are_reemitted_in_the_client(client: shoal.Client) -> None:
    # when a task warns, then reading its result re-emits the warning here
    with pytest.warns(UserWarning, match="careful with 5"):
        assert client.submit(warn_and_return, 5).result(timeout=10) == 5


def test_warnings_of_a_gathered_task_are_reemitted(client: shoal.Client) -> None:
    with pytest.warns(UserWarning, match="careful with 6"):
        assert client.gather([client.submit(warn_and_return, 6)]) == [6]


def test_an_unpicklable_argument_fails_at_submit(client: shoal.Client) -> None:
    # when an argument cannot be pickled, then submit raises at once, naming its type
    with pytest.raises(shoal.SerializationError, match=r"_thread\.lock"):
        client.submit(inc, threading.Lock())
    # and the client still works
    assert client.submit(inc, 1).result(timeout=10) == 2


def test_a_dead_scheduler_address_fails_within_the_timeout() -> None:
    # when connecting to a port nobody listens on
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="tcp://127.0.0.1:1"):
        shoal.Client("tcp://127.0.0.1:1", timeout=2)
    # then it fails within about the timeout, not later
    assert time.monotonic() - start < 5


def test_a_wrong_token_is_rejected_with_a_clear_error() -> None:
    # given a cluster that requires a token
    with gen_cluster(n_workers=1, token="right-token") as client:
        assert client.submit(inc, 1).result(timeout=10) == 2
        # when a client presents another token (or none), then it is refused, saying why
        for token in ("wrong-token", ""):
            with pytest.raises(PermissionError, match="invalid authentication token"):
                shoal.Client(client.scheduler_address, token=token, timeout=5,
                             set_as_default=False)  # fmt: skip
        # and the cluster keeps serving its own client
        assert client.submit(inc, 2).result(timeout=10) == 3


def test_result_with_a_timeout_raises_timeout_error(client: shoal.Client, gate: Gate) -> None:
    future = client.submit(gate, 1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    assert time.monotonic() - start < 2
    gate.open()
    assert future.result(timeout=10) == 1


def test_submit_rejects_a_non_callable(client: shoal.Client) -> None:
    with pytest.raises(TypeError, match="callable"):
        client.submit(42)  # type: ignore[arg-type]


def test_a_closed_client_refuses_work() -> None:
    with gen_cluster(n_workers=1) as client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(inc, 1)


def test_a_server_that_never_answers_the_handshake_fails_within_the_timeout() -> None:
    # given a port that accepts connections but never speaks
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        # when a client connects with a 1 s timeout, then it fails in about that time
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=re.escape(address) + ".*within 1"):
            shoal.Client(address, timeout=1, set_as_default=False)
        assert time.monotonic() - start < 4


def test_losing_the_scheduler_fails_pending_futures_and_new_work() -> None:
    # given a client with a task pending on a scheduler process
    with no_leaks(timeout=15), spawn_scheduler() as scheduler, \
            spawn_worker(scheduler.address) as worker:  # fmt: skip
        with shoal.Client(scheduler.address, timeout=5, set_as_default=False) as client:
            pending = client.submit(time.sleep, 0.5)
            # when the scheduler stops
            scheduler.stop(signal.SIGTERM)
            # then the pending future fails with SchedulerGoneError, without hanging
            with pytest.raises(shoal.SchedulerGoneError):
                pending.result(timeout=10)
            # and new work is refused at once rather than left pending forever
            with pytest.raises(shoal.SchedulerGoneError):
                client.submit(inc, 1)
            with pytest.raises(shoal.SchedulerGoneError):
                client.map(inc, [1, 2])
        wait_until(lambda: worker.proc.poll() is not None, timeout=15,
                   message="the worker exits after its scheduler")  # fmt: skip


def test_task_errors_and_warnings_cross_process_boundaries(process_client: shoal.Client) -> None:
    # given worker processes, when tasks raise and warn there
    def divide(x: int) -> float:
        return 1 / x

    def warn_there(x: int) -> int:
        warnings.warn(f"from a worker process {x}", UserWarning, stacklevel=1)
        return x

    # then the error arrives with its type, message and traceback
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        process_client.submit(divide, 0).result(timeout=30)
    assert isinstance(info.value.__cause__, shoal.RemoteTraceback)
    assert "divide" in info.value.__cause__.tb
    # and each run's warning is re-emitted here
    for i in range(2):
        with pytest.warns(UserWarning, match=f"from a worker process {i}"):
            assert process_client.submit(warn_there, i).result(timeout=30) == i
