"""``@shoal.remote`` on functions: ``f.remote()`` submits, ``f()`` runs here, ``options``."""

from __future__ import annotations

import pytest

import shoal
from shoal.client.remote_function import ActorClass, RemoteFunction
from shoal.testing import Tally
from shoal.worker.context import get_worker


@shoal.remote
def square(x: int) -> int:
    return x * x


@shoal.remote
def sum_of_squares(n: int) -> int:
    # a remote function calling remote functions, from inside a task
    return sum(shoal.get_client().gather([square.remote(i) for i in range(n)]))


@shoal.remote
def where() -> str:
    return get_worker().address


def test_remote_submits_and_a_plain_call_runs_here(client: shoal.Client) -> None:
    # when a remote function is called with .remote, then it returns a future
    future = square.remote(7)
    assert isinstance(future, shoal.Future)
    assert future.result(timeout=10) == 49
    # and called plainly, it runs here, like the function it wraps
    assert square(8) == 64
    assert isinstance(square, RemoteFunction) and square.__name__ == "square"
    # and it works from inside tasks too
    assert sum_of_squares.remote(5).result(timeout=10) == 0 + 1 + 4 + 9 + 16


def test_each_remote_call_runs(client: shoal.Client, tally: Tally) -> None:
    # given a remote function with a side effect
    record = shoal.remote(tally.record)
    # when it is called twice with the same argument, then it runs twice (like Ray)
    a, b = record.remote("x"), record.remote("x")
    assert a.key != b.key
    assert client.gather([a, b]) == ["x", "x"]
    assert tally.count("x") == 2


def test_options_return_a_copy_with_those_options(client: shoal.Client, tally: Tally) -> None:
    # given a remote function that fails on its first run
    def flaky(path: str) -> int:
        with open(path, "a") as f:
            f.write("run\n")
        with open(path) as f:
            runs = len(f.readlines())
        if runs < 2:
            raise RuntimeError("first run fails")
        return runs

    remote_flaky = shoal.remote(flaky)
    # when a copy retries, then it succeeds; the original is unchanged
    retried = remote_flaky.options(retries=2, retry_delay=0.0, priority=5)
    assert retried is not remote_flaky
    assert retried._options == {"retries": 2, "retry_delay": 0.0, "priority": 5}
    assert remote_flaky._options == {}
    assert retried.remote(str(tally.path)).result(timeout=10) == 2

    # when a copy names a worker, then its calls run there
    w1, w2 = sorted(client.nthreads())
    assert where.options(workers=[w2]).remote().result(timeout=10) == w2
    assert where.options(workers=w1).remote().result(timeout=10) == w1

    # options stack, and the decorator takes them too
    stacked = where.options(priority=1).options(resources={"GPU": 1.0})
    assert stacked._options == {"priority": 1, "resources": {"GPU": 1.0}}
    decorated = shoal.remote(priority=3, retries=1)(lambda: 1)
    assert isinstance(decorated, RemoteFunction) and decorated._options["retries"] == 1


def test_bad_options_are_refused_at_once() -> None:
    with pytest.raises(TypeError, match="unknown task option 'colour'"):
        square.options(colour="red")
    with pytest.raises(TypeError, match="priority"):
        square.options(priority="high")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        square.options(retries=-1)
    with pytest.raises(ValueError, match="resources"):
        shoal.remote(resources={"GPU": -1})
    with pytest.raises(TypeError, match="a function or a class"):
        shoal.remote(42)


def test_remote_on_a_class_makes_an_actor_class() -> None:
    @shoal.remote
    class Box:
        def __init__(self, value: int) -> None:
            self.value = value

    assert isinstance(Box, ActorClass)
    # called plainly, it makes a local instance
    box = Box(3)
    assert box.value == 3 and type(box).__name__ == "Box"
    with pytest.raises(TypeError, match="resources"):
        Box.options(resources="GPU")
