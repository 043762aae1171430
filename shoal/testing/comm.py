"""Conformance checks for transports: what every `Comm` backend must do.

Run them against any registered scheme::

    asyncio.run(check_comm_backend("tcp://127.0.0.1:0"))
    asyncio.run(check_comm_backend("inproc://"))

Each check starts its own listener at ``address`` (so use port 0 or an empty inproc name),
raises ``AssertionError`` (or the transport's error) on failure, and stops everything it
started, even when it fails.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager

from ..comm.core import Comm, CommClosedError, HandshakeRejected, Listener, ShoalConnectionError
from ..comm.registry import connect, listen
from ..protocol.messages import PROTOCOL_VERSION, DataReply, Heartbeat, Hello, Msg, Reply, Role
from ..protocol.serialize import Serialized, deserialize, serialize

#: Each check must finish within this many seconds.
CHECK_TIMEOUT = 10.0
TOKEN = "conformance-token"


def make_hello(
    name: str = "checker",
    role: Role = "client",
    token: str | None = TOKEN,
    version: int = PROTOCOL_VERSION,
) -> Hello:
    return Hello(version=version, role=role, name=name, token=token)


class EchoServer:
    """A handler that writes every batch back, and records what it saw."""

    def __init__(self) -> None:
        self.comms: list[Comm] = []
        #: Set when a connection's read raised `CommClosedError`.
        self.saw_close = asyncio.Event()
        self.received: list[list[Msg]] = []

    async def __call__(self, comm: Comm) -> None:
        self.comms.append(comm)
        try:
            while True:
                msgs = await comm.read()
                self.received.append(list(msgs))
                await comm.write(list(msgs))
        except CommClosedError:
            self.saw_close.set()


@asynccontextmanager
async def echo_listener(
    address: str, *, roles: Collection[str] | None = None, handshake_timeout: float = 10.0
) -> AsyncIterator[tuple[Listener, EchoServer]]:
    """An echo server with token `TOKEN`, stopped on exit."""
    server = EchoServer()
    listener = await listen(
        address,
        server,
        name="echo",
        token=TOKEN,
        roles=roles,
        handshake_timeout=handshake_timeout,
    )
    try:
        yield listener, server
    finally:
        await listener.stop()


async def check_comm_backend(address: str) -> None:
    """All the checks below, in turn."""
    for check in (
        check_round_trip,
        check_large_payload,
        check_ordering,
        check_close_semantics,
        check_handshake_rejection,
        check_connect_after_stop,
    ):
        try:
            await asyncio.wait_for(check(address), CHECK_TIMEOUT)
        except asyncio.TimeoutError:
            raise AssertionError(f"{check.__name__}({address!r}) hung") from None


async def check_round_trip(address: str) -> None:
    """Mixed messages come back equal; the server side sees the peer's `Hello`."""
    async with echo_listener(address) as (listener, server):
        scheme = address.partition("://")[0] if "://" in address else "tcp"
        assert listener.address.startswith(f"{scheme}://"), listener.address
        comm = await connect(listener.address, make_hello(name="round-trip"))
        try:
            sent: list[Msg] = [
                Heartbeat(executing=1, ready=2, memory=3, cpu=0.5),
                Reply(rid=1, value={"text": "é", "list": [1, None, 2.5], "raw": b"\x00\xff"}),
                Reply(rid=2, value=serialize({"small": "payload"})),
                Reply(rid=3, error="boom"),
            ]
            await comm.write(sent)
            assert await comm.read() == sent
            assert len(server.comms) == 1
            peer = server.comms[0].peer
            assert peer is not None and peer.name == "round-trip", peer
            assert isinstance(comm.peer_address, str) and isinstance(comm.local_address, str)
            assert not comm.closed
        finally:
            await comm.close()


async def check_large_payload(address: str) -> None:
    """A `Serialized` with a 16 MiB out-of-band buffer crosses intact."""
    payload = bytes(range(256)) * (16 * 4096)
    # A PickleBuffer is what NumPy arrays give pickle: it goes out of band.
    ser = serialize(pickle.PickleBuffer(payload))
    assert len(ser.frames) == 2, "the buffer should be out of band"
    async with echo_listener(address) as (listener, _):
        comm = await connect(listener.address, make_hello())
        try:
            await comm.write([DataReply(rid=7, data={"x": ser, "y": serialize(42)})])
            (reply,) = await comm.read()
            assert isinstance(reply, DataReply) and reply.rid == 7
            value = reply.data["x"]
            assert isinstance(value, Serialized)
            assert bytes(memoryview(deserialize(value))) == payload
            assert deserialize(reply.data["y"]) == 42
        finally:
            await comm.close()


async def check_ordering(address: str) -> None:
    """Batches arrive whole and in the order they were written."""
    async with echo_listener(address) as (listener, _):
        comm = await connect(listener.address, make_hello())
        try:
            for rid in range(0, 300, 3):
                await comm.write([Reply(rid=rid), Reply(rid=rid + 1), Reply(rid=rid + 2)])
            rids: list[int] = []
            while len(rids) < 300:
                batch = await comm.read()
                assert len(batch) == 3, f"a batch of 3 arrived as {len(batch)}"
                rids.extend(msg.rid for msg in batch if isinstance(msg, Reply))
            assert rids == list(range(300))
        finally:
            await comm.close()


async def check_close_semantics(address: str) -> None:
    """What was written before close arrives; then reads and writes raise `CommClosedError`."""
    async with echo_listener(address) as (listener, server):
        # The client writes and closes: the server reads the batch, then sees the close.
        comm = await connect(listener.address, make_hello())
        await comm.write([Reply(rid=1)])
        await comm.close()
        assert comm.closed
        await comm.close()  # closing twice is fine
        await _raises_closed(comm.read())
        await _raises_closed(comm.write([Reply(rid=2)]))
        await server.saw_close.wait()
        assert server.received[-1] == [Reply(rid=1)]

        # The server side closes: a pending read on the client raises.
        comm = await connect(listener.address, make_hello())
        try:
            await comm.write([Reply(rid=3)])
            assert await comm.read() == [Reply(rid=3)]
            reading = asyncio.ensure_future(comm.read())
            await server.comms[-1].close()
            await _raises_closed(reading)
            assert comm.closed
        finally:
            await comm.close()

        # abort() closes at once.
        comm = await connect(listener.address, make_hello())
        comm.abort()
        assert comm.closed
        await _raises_closed(comm.read())
        await comm.close()


async def check_handshake_rejection(address: str) -> None:
    """Wrong token, role or version: `HandshakeRejected` with the reason; others still served."""
    async with echo_listener(address, roles={"client"}) as (listener, server):
        cases = [
            (make_hello(token="wrong"), "token"),
            (make_hello(token=None), "token"),
            (make_hello(role="worker"), "role"),
            (make_hello(version=PROTOCOL_VERSION + 1000), "version"),
        ]
        for hello, reason in cases:
            try:
                comm = await connect(listener.address, hello, timeout=5)
            except HandshakeRejected as exc:
                assert isinstance(exc, PermissionError)
                assert reason in str(exc), f"{exc} should mention the {reason}"
            else:
                comm.abort()
                raise AssertionError(f"{hello} was accepted")
        assert server.comms == [], "a rejected peer reached the handler"
        comm = await connect(listener.address, make_hello())
        try:
            await comm.write([Reply(rid=1)])
            assert await comm.read() == [Reply(rid=1)]
        finally:
            await comm.close()


async def check_connect_after_stop(address: str) -> None:
    """Once a listener stopped, connecting fails within the timeout, naming the address."""
    async with echo_listener(address) as (listener, _):
        stopped_address = listener.address
    try:
        comm = await connect(stopped_address, make_hello(), timeout=0.2)
    except ShoalConnectionError as exc:
        assert stopped_address in str(exc) and "0.2s" in str(exc), str(exc)
    else:
        comm.abort()
        raise AssertionError(f"connected to stopped listener {stopped_address}")


async def _raises_closed(awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except CommClosedError:
        return
    raise AssertionError("expected CommClosedError")
