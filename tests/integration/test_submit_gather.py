"""submit, map, gather, futures as arguments, scatter and the cluster queries, end to end
on an in-process cluster."""

from __future__ import annotations

import operator
import os

import shoal


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int = 0) -> int:
    return x + y


def total(values: object) -> int:
    """Sums the numbers anywhere inside nested lists, tuples and dict values."""
    if isinstance(values, dict):
        return sum(total(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return sum(total(v) for v in values)
    assert isinstance(values, int)
    return values


def test_submit_returns_the_result(client: shoal.Client) -> None:
    # given a cluster, when a call is submitted
    future = client.submit(inc, 1)
    # then its result comes back
    assert future.result(timeout=10) == 2


def test_submit_passes_keyword_arguments(client: shoal.Client) -> None:
    future = client.submit(add, 1, y=10)
    assert future.result(timeout=10) == 11


def test_map_then_gather_keeps_order(client: shoal.Client) -> None:
    # when a function is mapped over a range
    futures = client.map(inc, range(20))
    # then gather returns every result in order
    assert client.gather(futures) == list(range(1, 21))


def test_map_zips_several_iterables(client: shoal.Client) -> None:
    futures = client.map(operator.mul, [1, 2, 3], [10, 20, 30])
    assert client.gather(futures) == [10, 40, 90]


def test_gather_keeps_nested_structure(client: shoal.Client) -> None:
    # given futures inside a list, a tuple and a dict, beside plain values
    a, b, c = client.submit(inc, 1), client.submit(inc, 2), client.submit(inc, 3)
    nested = {"list": [a, (b, "plain")], "tuple": (c,), "value": 7}
    # when the whole structure is gathered
    result = client.gather(nested)
    # then futures become results and the shape and other values are kept
    assert result == {"list": [2, (3, "plain")], "tuple": (4,), "value": 7}
    assert isinstance(result["list"][1], tuple)


def test_future_as_argument_chains_tasks(client: shoal.Client) -> None:
    # given a chain of tasks, each taking the previous future
    future = client.submit(inc, 0)
    for _ in range(9):
        future = client.submit(inc, future)
    # then the last result saw every step
    assert future.result(timeout=10) == 10


def test_many_futures_fan_in_to_one_task(client: shoal.Client) -> None:
    parts = client.map(inc, range(50))
    assert client.submit(sum, parts).result(timeout=10) == sum(range(1, 51))


def test_futures_nested_in_list_and_dict_arguments_become_values(client: shoal.Client) -> None:
    # given futures deep inside a list and a dict passed as arguments
    a, b, c = client.submit(inc, 0), client.submit(inc, 1), client.submit(inc, 2)
    # when a task takes them
    future = client.submit(total, [a, {"b": b, "more": [c, 100]}])
    # then it saw their values in place
    assert future.result(timeout=10) == 1 + 2 + 3 + 100


def test_future_as_keyword_argument(client: shoal.Client) -> None:
    x = client.submit(inc, 1)
    assert client.submit(add, 1, y=x).result(timeout=10) == 3


def test_scatter_one_value(client: shoal.Client) -> None:
    # when one object is scattered
    future = client.scatter(41)
    # then it is a finished future usable as an argument
    assert isinstance(future, shoal.Future)
    assert future.result(timeout=10) == 41
    assert client.submit(inc, future).result(timeout=10) == 42


def test_scatter_a_list_gives_a_list_of_futures(client: shoal.Client) -> None:
    futures = client.scatter([1, 2, 3])
    assert isinstance(futures, list) and len(futures) == 3
    assert client.gather(futures) == [1, 2, 3]


def test_scatter_a_dict_uses_its_keys(client: shoal.Client) -> None:
    futures = client.scatter({"x": 1, "y": 2})
    assert set(futures) == {"x", "y"}
    assert futures["x"].key == "x"
    assert client.submit(add, futures["x"], futures["y"]).result(timeout=10) == 3


def test_scatter_broadcast_puts_data_on_every_worker(client: shoal.Client) -> None:
    # when data is scattered with broadcast=True
    future = client.scatter([10, 20], broadcast=True)
    # then who_has lists every worker for each key
    workers = sorted(client.nthreads())
    who_has = client.who_has(future)
    assert {k: sorted(v) for k, v in who_has.items()} == {f.key: workers for f in future}


def test_run_calls_the_function_on_every_worker(client: shoal.Client) -> None:
    # when os.getpid runs on every (in-process) worker
    pids = client.run(os.getpid)
    # then there is an answer from each worker, all from this process
    assert set(pids) == set(client.nthreads())
    assert set(pids.values()) == {os.getpid()}


def test_who_has_and_nthreads_describe_the_cluster(client: shoal.Client) -> None:
    # given two single-threaded workers and a finished task
    future = client.submit(inc, 1)
    future.result(timeout=10)
    # then nthreads names both and who_has puts the result on one of them
    nthreads = client.nthreads()
    assert len(nthreads) == 2 and set(nthreads.values()) == {1}
    holders = client.who_has()[future.key]
    assert len(holders) == 1 and holders[0] in nthreads
    assert client.who_has([future]) == {future.key: holders}
