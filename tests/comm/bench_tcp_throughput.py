"""Benchmark (not a test; belongs in bench/): a 100 MiB NumPy payload between two processes
over loopback TCP, on asyncio and uvloop, and dask.distributed's TCP comm when installed.

    .venv/bin/python tests/comm/bench_tcp_throughput.py [--reps 10] [--mib 100]

The receiver deserializes the array (zero-copy) and answers with a tiny message; the time
of one round is the payload's transfer plus that answer.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np


def run(coro: Coroutine[Any, Any, Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- shoal


async def shoal_server(queue: Any) -> None:
    from shoal.comm import Comm, CommClosedError, listen
    from shoal.protocol.messages import DataReply, Reply
    from shoal.protocol.serialize import deserialize

    done = asyncio.Event()

    async def handler(comm: Comm) -> None:
        try:
            while True:
                (msg,) = await comm.read()
                assert isinstance(msg, DataReply)
                array = deserialize(msg.data["x"])
                await comm.write([Reply(rid=msg.rid, value=int(array.nbytes))])
        except CommClosedError:
            done.set()

    listener = await listen("tcp://127.0.0.1:0", handler, name="bench")
    queue.put(listener.address)
    await done.wait()
    await listener.stop()


async def shoal_client(address: str, array: np.ndarray, reps: int) -> list[float]:
    from shoal.comm import connect
    from shoal.protocol.messages import PROTOCOL_VERSION, DataReply, Hello
    from shoal.protocol.serialize import serialize

    comm = await connect(address, Hello(PROTOCOL_VERSION, "client", "bench"))
    msg = DataReply(rid=1, data={"x": serialize(array)})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await comm.write([msg])
        await comm.read()
        times.append(time.perf_counter() - start)
    await comm.close()
    return times


# ----------------------------------------------------------------------------- dask


async def dask_server(queue: Any) -> None:
    from distributed.comm import CommClosedError, listen

    done = asyncio.Event()

    async def handler(comm: Any) -> None:
        try:
            while True:
                msg = await comm.read()
                await comm.write(int(msg["x"].nbytes))
        except CommClosedError:
            done.set()

    listener = listen("tcp://127.0.0.1:0", handler)
    await listener.start()
    queue.put(listener.contact_address)
    await done.wait()
    listener.stop()


async def dask_client(address: str, array: np.ndarray, reps: int) -> list[float]:
    from distributed.comm import connect
    from distributed.protocol import to_serialize

    comm = await connect(address)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await comm.write({"x": to_serialize(array)})
        await comm.read()
        times.append(time.perf_counter() - start)
    await comm.close()
    return times


SYSTEMS = {"shoal": (shoal_server, shoal_client), "dask": (dask_server, dask_client)}


def serve(system: str, loop: str, queue: Any) -> None:
    run(SYSTEMS[system][0](queue), loop)


def measure(system: str, loop: str, nbytes: int, reps: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(system, loop, queue))
    server.start()
    try:
        address = queue.get(timeout=120)
        array = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        return list(run(SYSTEMS[system][1](address, array, reps), loop))
    finally:
        server.join(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    nbytes = args.mib * 1024 * 1024
    cases = [("shoal", "asyncio"), ("shoal", "uvloop")]
    try:
        import distributed  # noqa: F401

        cases += [("dask", "asyncio"), ("dask", "uvloop")]
    except ImportError:
        pass
    print(f"{args.mib} MiB payload, {args.reps} rounds, loopback TCP, two processes")
    print(f"{'system':8} {'loop':8} {'median GB/s':>12} {'best GB/s':>10} {'vs dask':>8}")
    results = {}
    for system, loop in cases:
        times = measure(system, loop, nbytes, args.reps)
        results[system, loop] = nbytes / statistics.median(times) / 1e9, nbytes / min(times) / 1e9
    for (system, loop), (median, best) in results.items():
        dask = results.get(("dask", loop))
        ratio = f"{median / dask[0]:.2f}x" if dask else ""
        print(f"{system:8} {loop:8} {median:12.2f} {best:10.2f} {ratio:>8}")


if __name__ == "__main__":
    main()
