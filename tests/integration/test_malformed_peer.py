"""A peer that sends garbage loses its own connection; everyone else keeps being served."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

import shoal
from shoal.comm.addressing import parse_address
from shoal.protocol.codec import Codec, encode_handshake
from shoal.protocol.framing import frame_prefix
from shoal.protocol.messages import PROTOCOL_VERSION, Hello, Msg, TaskFinished


def inc(x: int) -> int:
    return x + 1


def raw_connection(address: str) -> socket.socket:
    _, host, port = parse_address(address)
    assert port is not None
    return socket.create_connection((host, port), timeout=10)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read until the peer closes (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def frame(*parts: bytes) -> bytes:
    return frame_prefix(list(parts)) + b"".join(parts)


def handshake(sock: socket.socket) -> None:
    """Pass the handshake as a client would, so that what follows is read as messages."""
    hello = Hello(PROTOCOL_VERSION, "client", "raw-test", None, os.getpid())
    sock.sendall(frame(*map(bytes, encode_handshake(hello))))
    answer = b""
    while b"welcome" not in answer:
        chunk = sock.recv(65536)
        assert chunk, f"the scheduler refused the handshake: {answer!r}"
        answer += chunk


def message(msg: Msg) -> bytes:
    return frame(*map(bytes, Codec().encode([msg])))


def after_handshake(data: bytes) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        handshake(sock)
        sock.sendall(data)

    return send


#: Ways to send garbage, by name; each writes to a fresh raw connection.
GARBAGE: dict[str, Callable[[socket.socket], None]] = {
    "garbage bytes": lambda sock: sock.sendall(b"\xff" * 512),
    "http request": lambda sock: sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "huge frame prefix": lambda sock: sock.sendall(struct.pack("<IQ", 1, 2**40)),
    "frame of zero parts": lambda sock: sock.sendall(struct.pack("<I", 0)),
    "frame that is not a hello": lambda sock: sock.sendall(frame(b"\x92\x01\x02")),
    "garbage after the handshake": after_handshake(frame(b"\xc1\xc1\xc1")),
    "unknown message after the handshake": after_handshake(frame(b"\x91\x93\xa4junk\x01\x02")),
    "a message a client may not send": after_handshake(
        message(TaskFinished("not-yours", 8, "int", 0.0, 0.0))
    ),
}


@pytest.mark.parametrize("send_garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_closes_that_connection_and_the_scheduler_keeps_serving(
    client: shoal.Client, send_garbage: Callable[[socket.socket], None]
) -> None:
    # given a client with work in flight
    before = client.submit(inc, 1)
    # when a raw socket sends garbage to the scheduler's port
    with raw_connection(client.scheduler_address) as sock:
        send_garbage(sock)
        # then the scheduler closes that connection
        assert closed_by_peer(sock), "the scheduler kept a connection that sent garbage"
    # and the existing client keeps working
    assert before.result(timeout=10) == 2
    assert client.submit(inc, 2).result(timeout=10) == 3
    assert len(client.nthreads()) == 2


def test_garbage_to_a_worker_closes_that_connection_only(client: shoal.Client) -> None:
    worker = min(client.nthreads())
    with raw_connection(worker) as sock:
        sock.sendall(b"\xfe" * 256)
        assert closed_by_peer(sock)
    assert client.gather(client.map(inc, range(10))) == list(range(1, 11))
