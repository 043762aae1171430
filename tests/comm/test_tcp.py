"""TCP specifics: zero-copy receives, whole frames under concurrency, flow control."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from shoal.comm import Comm, CommClosedError, connect, listen, tcp
from shoal.protocol.codec import Codec, encode_handshake
from shoal.protocol.framing import frame_prefix
from shoal.protocol.messages import PROTOCOL_VERSION, DataReply, Hello, Message, Reply, Welcome
from shoal.protocol.serialize import deserialize, serialize

Run = Callable[..., Any]  # the `run` fixture (conftest.py)

HELLO = Hello(PROTOCOL_VERSION, "client", "test")


class Collect:
    """A handler that queues what it reads; ``gate`` (if set) holds reading back."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[list[Message]] = asyncio.Queue()
        self.comms: list[Comm] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, comm: Comm) -> None:
        self.comms.append(comm)
        if self.gate is not None:
            await self.gate.wait()
        with contextlib.suppress(CommClosedError):
            while True:
                self.batches.put_nowait(await comm.read())


async def read_raw_frame(reader: asyncio.StreamReader) -> list[bytes]:
    (nparts,) = struct.unpack("<I", await reader.readexactly(4))
    lengths = struct.unpack(f"<{nparts}Q", await reader.readexactly(8 * nparts))
    return [await reader.readexactly(n) for n in lengths]


def test_numpy_array_is_received_without_a_copy(run: Run, loop_name: str) -> None:
    async def body() -> None:
        collect = Collect()
        listener = await listen("tcp://127.0.0.1:0", collect, name="s")
        comm = await connect(listener.address, HELLO)
        array = np.arange(2_000_000, dtype="f8")
        await comm.write([DataReply(rid=1, data={"a": serialize(array)})])
        (msg,) = await asyncio.wait_for(collect.batches.get(), 5)
        assert isinstance(msg, DataReply)
        frame = msg.data["a"].frames[1]
        assert isinstance(frame, memoryview) and frame.nbytes == array.nbytes
        # its own buffer: a pooled receive buffer of about its size (framing.allocate_part)
        assert isinstance(frame.obj, ctypes.Array)
        assert array.nbytes <= len(frame.obj) <= array.nbytes * 5 // 4 + 2**21
        result = deserialize(msg.data["a"])
        assert np.array_equal(result, array)
        assert np.shares_memory(result, np.frombuffer(frame, dtype="f8"))
        assert result.flags.writeable
        await comm.close()
        await listener.stop()

    run(body(), loop=loop_name)


def test_frames_of_concurrent_writers_arrive_whole(run: Run, loop_name: str) -> None:
    """A big frame goes out in pieces; small frames written meanwhile wait for it."""

    async def body() -> None:
        collect = Collect()
        listener = await listen("tcp://127.0.0.1:0", collect, name="s")
        comm = await connect(listener.address, HELLO)
        big = np.full(4 * tcp.PIECE_BYTES + 5, 7, dtype="u1")
        writes = [comm.write([DataReply(rid=0, data={"big": serialize(big)})])]
        writes += [comm.write([Reply(rid=rid)]) for rid in range(1, 50)]
        await asyncio.gather(*writes)
        received = [await asyncio.wait_for(collect.batches.get(), 5) for _ in range(50)]
        first = received[0][0]
        assert isinstance(first, DataReply) and np.array_equal(deserialize(first.data["big"]), big)
        assert [b[0].rid for b in received[1:] if isinstance(b[0], Reply)] == list(range(1, 50))
        await comm.close()
        await listener.stop()

    run(body(), loop=loop_name)


def test_reading_pauses_while_frames_wait_to_be_read(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp, "READ_PAUSE_BYTES", 500_000)

    async def body() -> None:
        collect = Collect()
        collect.gate = asyncio.Event()
        listener = await listen("tcp://127.0.0.1:0", collect, name="s")
        comm = await connect(listener.address, HELLO)
        payload = serialize(b"x" * 200_000)
        for rid in range(10):
            await comm.write([DataReply(rid=rid, data={"x": payload})])
        server_side = collect.comms[0]
        transport = server_side._protocol.transport  # type: ignore[attr-defined]
        for _ in range(500):  # poll, with a deadline, until the server stops reading
            if not transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not transport.is_reading()
        collect.gate.set()
        rids = [(await asyncio.wait_for(collect.batches.get(), 5))[0].rid for _ in range(10)]
        assert rids == list(range(10))
        assert transport.is_reading()
        await comm.close()
        await listener.stop()

    run(body())


def test_a_write_cancelled_mid_frame_aborts_the_connection(run: Run) -> None:
    """Half a frame on the wire would corrupt the stream: the comm is dropped instead."""

    async def body() -> None:
        async def welcome_then_stall(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            (nparts,) = struct.unpack("<I", await reader.readexactly(4))
            lengths = struct.unpack(f"<{nparts}Q", await reader.readexactly(8 * nparts))
            await reader.readexactly(sum(lengths))
            parts = encode_handshake(Welcome(PROTOCOL_VERSION, "staller"))
            writer.write(frame_prefix(parts) + b"".join(bytes(p) for p in parts))
            stalled.append(writer)  # and never read again

        stalled: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(welcome_then_stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        comm = await connect(f"127.0.0.1:{port}", HELLO)
        big = np.zeros(64 * tcp.PIECE_BYTES, dtype="u1")
        writing = asyncio.ensure_future(comm.write([DataReply(rid=1, data={"x": serialize(big)})]))
        done, _ = await asyncio.wait([writing], timeout=0.2)
        assert not done, "the peer does not read, so the write cannot finish"
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert comm.closed
        await comm.close()
        server.close()
        for writer in stalled:
            writer.close()
        await server.wait_closed()

    run(body())


def test_server_may_send_a_big_frame_right_after_welcome(run: Run, loop_name: str) -> None:
    """The client reads the Welcome under the handshake limit, and what follows it (even
    within the same bytes received) under the normal one."""
    body_part = bytes(Codec().encode([Reply(rid=1, value="x" * 1_000_000)])[0])

    async def body() -> None:
        async def welcome_and_push(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await read_raw_frame(reader)  # the Hello
            welcome = bytes(encode_handshake(Welcome(PROTOCOL_VERSION, "pusher"))[0])
            writer.write(frame_prefix([welcome]) + welcome + frame_prefix([body_part]) + body_part)
            writers.append(writer)

        writers: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(welcome_and_push, "127.0.0.1", 0)
        comm = await connect(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", HELLO)
        (msg,) = await comm.read()
        assert isinstance(msg, Reply) and msg.rid == 1
        await comm.close()
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()

    run(body(), loop=loop_name)
