"""No stall on the event loop (issue #14): a worker serving a 1 GB spilled value still answers
other fetches and sends its heartbeats on time, and the asynchronous client unpickles big
values off its loop. Checked by order and by the loops' watchdogs (`shoal.utils.loop_monitor`),
not by how long the big transfer takes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest

import shoal
from shoal.comm.rpc import next_rid
from shoal.protocol.messages import DataReply, GetData, Heartbeat
from shoal.testing import gen_cluster, no_leaks, wait_until
from shoal.worker.memory import MemoryFractions

# Worker processes cannot import this module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GB = 10**9
#: the workers' heartbeat interval (`shoal.cluster.worker_process`'s default)
HEARTBEAT_S = 0.5


def make_big() -> Any:
    return np.ones(GB // 8)


def make_small() -> Any:
    return np.arange(10)


def loop_lag_since(since: float) -> tuple[float, float]:
    """On a worker: its loop's longest lag since ``since`` (`time.monotonic`, the same clock
    in every process of this machine), and since it started."""
    from shoal.worker.context import get_worker

    monitor = get_worker().loop_monitor
    assert monitor is not None
    return monitor.max_lag_since(since), monitor.max_lag


@pytest.mark.slow
def test_a_worker_serving_a_spilled_gigabyte_answers_a_small_fetch_and_heartbeats_first() -> None:
    # given a worker process whose store keeps 50 MB in memory at most (and that never pauses
    # or is restarted for its memory), holding a small value and a 1 GB one, spilled
    fractions = MemoryFractions(target=0.05, spill=None, pause=None, terminate=None)
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="1GB",
                     memory_fractions=fractions, timeout=300) as client:  # fmt: skip
        big = client.submit(make_big, key="big-1")
        small = client.submit(make_small, key="small-1")
        assert small.result(timeout=120)[-1] == 9
        shoal.wait([big], timeout=120)  # (its value is fetched below, by hand)
        [address] = client.scheduler_info()["workers"]
        wait_until(lambda: client.scheduler_info()["workers"][address]["spilled_bytes"] >= GB,
                   timeout=120, interval=0.2, message="the 1 GB value spilled")  # fmt: skip
        scheduler = client.cluster.scheduler
        assert scheduler is not None
        peers = client._peers
        assert peers is not None
        worker = psutil.Process(client.submit(os.getpid, pure=False).result(60))

        async def fetch_both() -> dict[str, Any]:
            # Heartbeats as the scheduler receives them (it runs on this loop).
            arrivals: list[tuple[float, Heartbeat]] = []
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    beat = scheduler.heartbeats.get(address)
                    if beat is not None and (not arrivals or arrivals[-1][1] is not beat):
                        arrivals.append((time.monotonic(), beat))
                    await asyncio.sleep(0.01)

            watcher = asyncio.ensure_future(watch())
            try:
                while len(arrivals) < 2:  # (within gen_cluster's time limit)
                    await asyncio.sleep(0.05)
                # when the 1 GB key is asked for, then, once the worker is reading it back
                # (its memory grows), the small one, on the same connection
                order: list[str] = []
                baseline = worker.memory_info().rss
                started = time.monotonic()
                big_reply = await peers.start_request(address, GetData(next_rid(), [big.key]))
                while worker.memory_info().rss < baseline + GB // 4:  # (gen_cluster's limit)
                    await asyncio.sleep(0.002)
                small_reply = await peers.start_request(address, GetData(next_rid(), [small.key]))
                big_reply.add_done_callback(lambda _: order.append("big"))
                small_reply.add_done_callback(lambda _: order.append("small"))
                replies = await asyncio.wait_for(asyncio.gather(big_reply, small_reply), 240)
                transfer = time.monotonic() - started
                # (two more heartbeats: the last gap is measured too)
                seen = len(arrivals)
                while len(arrivals) < seen + 2:
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await watcher
            times = [t for t, _ in arrivals]
            gaps = [b - a for a, b in zip(times, times[1:]) if b >= started]
            return {"order": order, "replies": replies, "started": started,
                    "transfer": transfer, "max_gap": max(gaps),
                    "beats": [b for t, b in arrivals if t >= started]}  # fmt: skip

        got = client._sync(fetch_both())
        big_reply, small_reply = got["replies"]
        facts = f"transfer {got['transfer']:.2f}s, largest heartbeat gap {got['max_gap']:.2f}s"

        # then both came whole, and the small one first: the read from disk did not hold it
        # up (on the event loop, the read went first, and its reply before the small one's)
        assert isinstance(big_reply, DataReply) and isinstance(small_reply, DataReply)
        assert big_reply.data[big.key].nbytes >= GB and small.key in small_reply.data
        assert got["order"] == ["small", "big"], facts
        # and the scheduler heard from the worker all along
        assert got["max_gap"] < 3 * HEARTBEAT_S, facts
        # and the worker's loop was never blocked for long while it read and sent the GB
        lag, lag_ever = client.submit(loop_lag_since, got["started"], pure=False).result(60)
        reported = max(beat.loop_lag for beat in got["beats"])
        assert client.loop_monitor is not None
        facts += (f", worker loop lag {lag:.2f}s (ever {lag_ever:.2f}s, as heartbeats said"
                  f" {reported:.2f}s), client loop lag"
                  f" {client.loop_monitor.max_lag_since(got['started']):.2f}s")  # fmt: skip
        print(facts)
        assert lag < 0.5 and lag < got["transfer"] / 3, facts
        assert reported < 0.5, facts


class Probe:
    """A value that notes which thread unpickled it."""

    def __init__(self, nbytes: int) -> None:
        self.payload = bytes(nbytes)
        self.thread = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"payload": self.payload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.payload = state["payload"]
        self.thread = threading.current_thread().name


def test_the_async_client_unpickles_big_values_off_its_loop_and_small_ones_on_it() -> None:
    async def main() -> None:
        # given an asynchronous client, and a value of 2 MiB and one of 10 bytes
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            loop_thread = threading.current_thread().name
            big, small = client.submit(Probe, 2 * 2**20), client.submit(Probe, 10)
            # when they are gathered
            [got_big] = await client.gather([big])
            [got_small] = await client.gather([small])
            # and when they are awaited one by one
            awaited_big, awaited_small = await big, await small
        # then the big one was unpickled on another thread, the small one on the loop
        assert len(got_big.payload) == 2 * 2**20 and got_big.thread != loop_thread
        assert got_small.thread == loop_thread
        assert len(awaited_big.payload) == 2 * 2**20 and awaited_big.thread != loop_thread
        assert awaited_small.thread == loop_thread

    with no_leaks(timeout=10):
        asyncio.run(main())
