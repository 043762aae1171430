"""A task or actor method that raises a `BaseException` (KeyboardInterrupt, SystemExit,
GeneratorExit, a custom subclass) fails like any error: the caller re-raises the exception
with its type (as dask does), the worker's thread slot comes back, and the worker goes on
serving."""

from __future__ import annotations

import sys
from typing import Any

import cloudpickle
import pytest

import shoal
from shoal.testing import gen_cluster

# Worker processes cannot import this module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Custom(BaseException):
    """A user's own BaseException, not an Exception."""


def throw(kind: type[BaseException]) -> None:
    raise kind("from the task")


def inc(x: int) -> int:
    return x + 1


class Pet:
    def __init__(self) -> None:
        self.n = 0

    def interrupt(self) -> None:
        raise KeyboardInterrupt("from the actor")

    def incr(self) -> int:
        self.n += 1
        return self.n


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, GeneratorExit, Custom])
def test_a_task_raising_a_base_exception_fails_and_the_thread_serves_on(
    kind: type[BaseException],
) -> None:
    # given one worker with one thread
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as client:
        # when a task raises a BaseException
        future = client.submit(throw, kind, pure=False)

        # then the client re-raises it, with its type and message
        with pytest.raises(kind, match="from the task"):
            future.result(timeout=10)
        assert future.status == "error"

        # and the worker's only thread runs the next tasks
        assert client.submit(inc, 1, pure=False).result(timeout=10) == 2
        assert client.gather(client.map(inc, range(5), pure=False)) == [1, 2, 3, 4, 5]
        [worker] = client.cluster.workers
        assert worker.state is not None and not worker.state.executing


def test_keyboard_interrupt_in_a_worker_process_fails_the_task_only() -> None:
    # given one worker process with one thread
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=True) as client:
        # when a task raises KeyboardInterrupt, then it fails like any error
        with pytest.raises(KeyboardInterrupt, match="from the task"):
            client.submit(throw, KeyboardInterrupt, pure=False).result(timeout=20)
        with pytest.raises(SystemExit):
            client.submit(throw, SystemExit, pure=False).result(timeout=20)
        # and the process, still the same one, keeps serving on its only thread
        assert client.submit(inc, 41, pure=False).result(timeout=20) == 42
        assert client.worker_deaths() == []


def test_an_actor_method_raising_keyboard_interrupt_answers_with_it() -> None:
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as client:
        # given an actor
        pet: Any = client.submit(Pet, actor=True).result(timeout=10)

        # when one of its methods raises KeyboardInterrupt, then the caller gets it
        with pytest.raises(KeyboardInterrupt, match="from the actor"):
            pet.interrupt().result(timeout=10)

        # and the actor's thread serves the next calls, its state intact
        assert pet.incr().result(timeout=10) == 1
        assert pet.incr().result(timeout=10) == 2
        assert isinstance(pet, shoal.Actor)


def interrupt() -> None:
    raise KeyboardInterrupt("from run")


def test_client_run_raising_keyboard_interrupt_answers_and_the_worker_serves_on() -> None:
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=True) as client:
        # when a function run on the workers raises KeyboardInterrupt, then the call fails
        with pytest.raises(BaseException, match="from run"):
            client.run(interrupt)
        # and the worker process, still the same one, serves on
        assert client.submit(inc, 1, pure=False).result(timeout=20) == 2
        assert client.worker_deaths() == []
