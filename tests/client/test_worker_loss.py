"""A client whose workers stop or die: fetches fail over, lost keys are waited for again."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

import shoal
from shoal.comm.core import CommClosedError
from shoal.protocol.messages import UpdateData
from shoal.testing import gen_cluster, wait_until

# Worker processes get this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_inc(x: int) -> int:
    time.sleep(1.0)  # long enough that result() is called while it is recomputed
    return x + 1


@pytest.fixture
def short_ttl_client() -> Iterator[shoal.Client]:
    """2 worker processes under nannies; a worker silent for 2 s is removed."""
    with gen_cluster(n_workers=2, threads_per_worker=1, processes=True, worker_ttl=2.0,
                     timeout=90) as c:  # fmt: skip
        yield c


def worker_pids(client: shoal.Client) -> dict[str, int]:
    return {address: int(pid) for address, pid in client.run(os.getpid).items()}


def test_gather_goes_to_another_holder_when_one_is_stopped(
        short_ttl_client: shoal.Client) -> None:  # fmt: skip
    client = short_ttl_client
    client.wait_for_workers(2, timeout=30)
    # given values held by both workers
    futures = client.scatter(list(range(40)), broadcast=True)
    assert all(len(holders) == 2 for holders in client.who_has(futures).values())
    pids = worker_pids(client)
    stopped_address, stopped_pid = sorted(pids.items())[0]
    # when one worker stops without closing its connections (no TCP reset)
    os.kill(stopped_pid, signal.SIGSTOP)
    try:
        # then gathering still finishes: requests to the stopped worker fail over once the
        # scheduler removes it (half of the keys would be asked of it first)
        assert client.gather(futures) == list(range(40))
        assert stopped_address not in client.scheduler_info()["workers"]
    finally:
        os.kill(stopped_pid, signal.SIGCONT)


def test_a_key_lost_with_its_worker_is_waited_for_again(short_ttl_client: shoal.Client) -> None:
    client = short_ttl_client
    client.wait_for_workers(2, timeout=30)
    future = client.submit(slow_inc, 41)
    assert future.result(timeout=30) == 42
    [holder] = client.who_has([future])[future.key]
    pid = worker_pids(client)[holder]
    # when its only holder dies
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: holder not in client.scheduler_info()["workers"], timeout=30,
               message="the scheduler removes the dead worker")  # fmt: skip
    # then the future is recomputed, and result() waits for it instead of failing
    assert future.result(timeout=30) == 42
    assert future.status == "finished"


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


def test_an_actor_call_to_a_stopped_worker_fails_once_the_worker_is_removed(
        short_ttl_client: shoal.Client) -> None:  # fmt: skip
    client = short_ttl_client
    client.wait_for_workers(2, timeout=30)
    counter = client.submit(Counter, actor=True).result(timeout=30)
    assert counter.incr().result(timeout=10) == 1
    pid = worker_pids(client)[counter._address]
    os.kill(pid, signal.SIGSTOP)
    try:
        call = counter.incr()  # sent to a worker that cannot answer
        with pytest.raises(shoal.ActorLostError):
            call.result(timeout=60)  # fails when the scheduler removes it, well before this
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_scatter_to_a_worker_that_fails_goes_to_another(client: shoal.Client) -> None:
    """A worker that dies while values are put on it: they go to the others instead."""
    peers = client._peers
    assert peers is not None
    real_request = peers.request
    failed: list[str] = []

    async def first_target_fails(address: str, msg: Any, timeout: float | None = None) -> Any:
        if isinstance(msg, UpdateData) and not failed:
            failed.append(address)
            raise CommClosedError(f"connection to {address} closed (the worker died)")
        return await real_request(address, msg, timeout)

    peers.request = first_target_fails  # type: ignore[method-assign]
    try:
        futures = client.scatter(list(range(10)), hash=False)
    finally:
        peers.request = real_request  # type: ignore[method-assign]
    assert failed
    assert client.gather(futures) == list(range(10))
    # every value has a holder that really took it (the failed send is not counted as one)
    who_has = client.who_has(futures)
    assert all(who_has[f.key] for f in futures)
