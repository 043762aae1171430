"""Errors people see, and peers that misbehave: each case closes that one connection,
logs it, and leaves the listener serving everyone else. Malicious peers are raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from shoal.comm import (
    Comm,
    CommClosedError,
    HandshakeRejected,
    Listener,
    ShoalConnectionError,
    connect,
    listen,
    parse_address,
)
from shoal.protocol.codec import decode_handshake, encode_handshake
from shoal.protocol.framing import frame_prefix
from shoal.protocol.messages import PROTOCOL_VERSION, DataReply, Hello, Msg, Reply, Welcome
from shoal.protocol.serialize import serialize

Run = Callable[..., Any]  # the `run` fixture (conftest.py)

TOKEN = "s3cret"
HELLO = Hello(PROTOCOL_VERSION, "client", "test", TOKEN)


class Echo:
    def __init__(self) -> None:
        self.served = 0

    async def __call__(self, comm: Comm) -> None:
        self.served += 1
        with contextlib.suppress(CommClosedError):
            while True:
                await comm.write(list(await comm.read()))


@contextlib.asynccontextmanager
async def echo_server(**kwargs: object) -> AsyncIterator[tuple[Listener, Echo]]:
    echo = Echo()
    options: dict[str, object] = {"name": "echo", "token": TOKEN, **kwargs}
    listener = await listen("tcp://127.0.0.1:0", echo, **options)  # type: ignore[arg-type]
    try:
        yield listener, echo
    finally:
        await listener.stop()


# ------------------------------------------------------------------ raw peers


def frame(*parts: bytes) -> bytes:
    return frame_prefix(parts) + b"".join(parts)


def hello_frame(hello: Msg = HELLO) -> bytes:
    return frame(*(bytes(p) for p in encode_handshake(hello)))


@contextlib.asynccontextmanager
async def raw_peer(
    address: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    _, host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_frame(reader: asyncio.StreamReader) -> list[bytes]:
    (nparts,) = struct.unpack("<I", await reader.readexactly(4))
    lengths = struct.unpack(f"<{nparts}Q", await reader.readexactly(8 * nparts))
    return [await reader.readexactly(n) for n in lengths]


async def raw_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(hello_frame())
    answer = decode_handshake([memoryview(p) for p in await read_frame(reader)], Welcome)
    assert isinstance(answer, Welcome)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> float:
    """Seconds until the server closed the connection (EOF or reset); fails if a read waits
    ``timeout`` seconds (generous: the claim is that it closes, not how fast)."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    return time.monotonic() - start


async def assert_still_serving(listener: Listener) -> None:
    comm = await connect(listener.address, HELLO)
    await comm.write([Reply(rid=42)])
    assert await comm.read() == [Reply(rid=42)]
    await comm.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ handshake rejections


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (Hello(PROTOCOL_VERSION, "client", "c", "wrong"), "invalid authentication token"),
        (Hello(PROTOCOL_VERSION, "client", "c", None), "invalid authentication token"),
        (Hello(PROTOCOL_VERSION + 1, "client", "c", TOKEN), "protocol version"),
        (Hello(PROTOCOL_VERSION, "worker", "c", TOKEN), "role 'worker' is not accepted"),
    ],
    ids=["wrong-token", "no-token", "wrong-version", "wrong-role"],
)
def test_handshake_is_rejected_with_the_reason(
    run: Run, caplog: pytest.LogCaptureFixture, hello: Hello, reason: str
) -> None:
    async def body() -> None:
        async with echo_server(roles={"client"}) as (listener, echo):
            with pytest.raises(HandshakeRejected, match=reason) as info:
                await connect(listener.address, hello, timeout=2)
            assert isinstance(info.value, PermissionError)
            assert listener.address in str(info.value)
            assert echo.served == 0
            await assert_still_serving(listener)

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        run(body())
    assert any("rejected connection" in r.message and reason in r.message for r in caplog.records)


# ------------------------------------------------------------------ malicious peers


def test_malformed_frame_closes_that_connection_only(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with echo_server() as (listener, _):
            healthy = await connect(listener.address, HELLO)
            async with raw_peer(listener.address) as (reader, writer):
                await raw_handshake(reader, writer)
                writer.write(frame(b"\x91\x92\xa7garbage\x01"))
                await closed_by_server(reader)
            await healthy.write([Reply(rid=1)])
            assert await healthy.read() == [Reply(rid=1)]
            await healthy.close()

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        run(body())
    assert any("closing connection with" in r.message and "malformed" in r.message
               for r in caplog.records)  # fmt: skip


BAD_HANDSHAKES = {
    "garbage": frame(b"not msgpack at all \xc1"),
    "welcome-instead-of-hello": hello_frame(Welcome(PROTOCOL_VERSION, "me")),
    "reply-instead-of-hello": frame(msgspec.msgpack.encode([["reply", 1, None, None]])),
    "two-hellos": frame(msgspec.msgpack.encode([HELLO, HELLO])),
    "two-parts": frame(*(bytes(p) for p in encode_handshake(HELLO)), b"extra"),
    "serialized-payload": frame(
        b"\x91\x95\xa5hello\x01\xa6client\xa1c"
        + msgspec.msgpack.encode(msgspec.msgpack.Ext(1, b"\x91\xa1x"))
    ),
    "oversized-prefix": struct.pack("<IQ", 1, 1 << 20),  # 1 MiB > the 64 KiB handshake limit
    "too-many-parts": struct.pack("<I", 1_000_000),
    "no-parts": struct.pack("<I", 0),
}


@pytest.mark.parametrize("data", BAD_HANDSHAKES.values(), ids=BAD_HANDSHAKES.keys())
def test_bad_handshake_is_closed_and_logged(
    run: Run, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    async def body() -> None:
        async with echo_server() as (listener, echo):
            async with raw_peer(listener.address) as (reader, writer):
                writer.write(data)  # only the prefix, for the oversized cases
                await closed_by_server(reader)  # (the log says why: not a handshake timeout)
            assert echo.served == 0
            await assert_still_serving(listener)

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        run(body())
    assert any("bad handshake" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "prefix",
    [struct.pack("<IQ", 1, 1 << 40), struct.pack("<I", 1_000_000)],
    ids=["oversized-length", "too-many-parts"],
)
def test_oversized_prefix_after_handshake_is_closed_from_the_prefix(
    run: Run, caplog: pytest.LogCaptureFixture, prefix: bytes
) -> None:
    async def body() -> None:
        async with echo_server() as (listener, _):
            async with raw_peer(listener.address) as (reader, writer):
                await raw_handshake(reader, writer)
                writer.write(prefix)  # and nothing else: the prefix alone must be refused
                await closed_by_server(reader)
            await assert_still_serving(listener)

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        run(body())
    assert any("exceeds the limit" in r.message for r in caplog.records)


def test_frame_limit_comes_from_the_environment(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_MAX_FRAME_BYTES", "100000")

    async def body() -> None:
        async with echo_server() as (listener, _):
            comm = await connect(listener.address, HELLO)
            await comm.write([DataReply(rid=1, data={"x": serialize(b"x" * 200_000)})])
            with pytest.raises(CommClosedError):
                await comm.read()
            await comm.close()
            await assert_still_serving(listener)

    run(body())


def test_silent_peer_is_closed_after_the_handshake_timeout(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> float:
        async with echo_server(handshake_timeout=0.3) as (listener, echo):
            async with raw_peer(listener.address) as (reader, _):
                elapsed = await closed_by_server(reader)
            assert echo.served == 0
            return elapsed

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        elapsed = run(body())
    assert 0.25 < elapsed < 0.3 + 5  # after the timeout (give or take the start), no hang
    assert any("no handshake within 0.3s" in r.message for r in caplog.records)


# ------------------------------------------------------------------ connecting


def test_connect_to_a_dead_port_fails_within_the_timeout(run: Run) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"

    async def body() -> None:
        start = time.monotonic()
        with pytest.raises(ShoalConnectionError) as info:
            await connect(address, HELLO, timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 0.5 + 5, elapsed  # refused is retried until the timeout
        assert str(info.value).startswith(f"could not connect to {address} within 0.5s: ")
        assert "refused" in str(info.value)
        assert isinstance(info.value, OSError)

    run(body())


def test_connect_to_a_server_that_never_answers_fails_within_the_timeout(run: Run) -> None:
    async def body() -> None:
        held: list[asyncio.StreamWriter] = []

        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ShoalConnectionError, match="within 0.3s: no answer to the handshake"):
            await connect(f"127.0.0.1:{port}", HELLO, timeout=0.3)
        assert time.monotonic() - start < 0.3 + 5  # the timeout, not a hang
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()

    run(body())


def test_connect_retries_until_the_server_starts(run: Run) -> None:
    port = free_port()

    async def body() -> None:
        connecting = asyncio.ensure_future(connect(f"tcp://127.0.0.1:{port}", HELLO, timeout=5))
        await asyncio.sleep(0.2)  # the server is late on purpose
        assert not connecting.done()
        echo = Echo()
        listener = await listen(f"tcp://127.0.0.1:{port}", echo, name="late", token=TOKEN)
        comm = await connecting
        await comm.close()
        await listener.stop()

    run(body())


def test_inproc_errors(run: Run) -> None:
    async def body() -> None:
        listener = await listen("inproc://taken", Echo(), name="s")
        with pytest.raises(OSError, match="already in use"):
            await listen("inproc://taken", Echo(), name="s")
        await listener.stop()
        with pytest.raises(ShoalConnectionError, match="inproc://taken within 0.1s"):
            await connect("inproc://taken", HELLO, timeout=0.1)
        with pytest.raises(ValueError, match="unknown transport"):
            await connect("carrier-pigeon://home", HELLO)

    run(body())


# ------------------------------------------------------------------ handlers and stop


def test_failing_handler_is_logged_and_others_are_served(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        calls = 0

        async def handler(comm: Comm) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("handler bug")
            await Echo()(comm)

        listener = await listen("tcp://127.0.0.1:0", handler, name="s", token=TOKEN)
        first = await connect(listener.address, HELLO)
        with pytest.raises(CommClosedError):
            await first.read()  # the listener aborted the failed handler's connection
        await first.close()
        await assert_still_serving(listener)
        await listener.stop()

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        run(body())
    assert any("handler for connection" in r.message for r in caplog.records)


def test_stop_closes_served_connections_and_waits_for_handlers(run: Run, loop_name: str) -> None:
    async def body() -> None:
        # (a handshake timeout longer than closed_by_server's: stop is what closes ``silent``)
        async with echo_server(handshake_timeout=60) as (listener, _):
            comm = await connect(listener.address, HELLO)
            silent = await asyncio.open_connection(*parse_address(listener.address)[1:])
            await listener.stop()  # the echo handler and the pending handshake both end
            with pytest.raises(CommClosedError):
                await comm.read()
            await comm.close()
            await closed_by_server(silent[0])
            silent[1].close()

    run(body(), loop=loop_name)
