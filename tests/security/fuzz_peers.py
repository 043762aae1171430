"""Helpers for the hostile-peer tests: raw sockets speaking (or breaking) shoal's wire format,
a pickle that leaves a trace when it is unpickled, and the listening ports of a process.

A helper module rather than a conftest: test modules import it by name (pytest puts this
directory on ``sys.path``), and a conftest cannot reliably be imported (tests/conftest.py).
"""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import time
from pathlib import Path

import psutil

from shoal.comm.addressing import parse_address
from shoal.protocol.codec import Codec, encode_handshake
from shoal.protocol.framing import frame_prefix
from shoal.protocol.messages import PROTOCOL_VERSION, Hello, Msg

#: What a raw peer waits for at most: a server answers or disconnects well within it.
PEER_TIMEOUT = 10.0


# ------------------------------------------------------------------ the canary pickle


class _TouchOnUnpickle:
    """Unpickling this runs ``touch PATH`` (``os.system``): the classic pickle exploit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(self.path)}",)


def canary_pickle(path: Path) -> bytes:
    """A pickle that creates ``path`` in whichever process unpickles it. It references only
    ``os.system`` (``posix.system``), so any Python process can load it: no shoal code needed."""
    data = pickle.dumps(_TouchOnUnpickle(str(path)), protocol=5)
    assert b"_TouchOnUnpickle" not in data  # nothing of this module is needed to load it
    return data


# ------------------------------------------------------------------ frames and messages


def frame(*parts: bytes) -> bytes:
    """One frame on the wire: the prefix (part count and lengths), then the parts."""
    return frame_prefix(list(parts)) + b"".join(parts)


def message_frame(*msgs: Msg) -> bytes:
    """A well-formed frame holding ``msgs`` as one batch, as a peer past the handshake sends."""
    return frame(*(bytes(memoryview(p)) for p in Codec().encode(list(msgs))))


def hello_frame(token: str | None, role: str = "client", version: int = PROTOCOL_VERSION,
                name: str = "hostile-peer") -> bytes:  # fmt: skip
    hello = Hello(version, role, name, token, os.getpid())  # type: ignore[arg-type]
    return frame(*(bytes(memoryview(p)) for p in encode_handshake(hello)))


# ------------------------------------------------------------------ raw connections


def connect_raw(address: str, timeout: float = PEER_TIMEOUT) -> socket.socket:
    """A plain TCP connection to a shoal address (``tcp://host:port``) or ``(host, port)``."""
    _, host, port = parse_address(address)
    assert port is not None, address
    return socket.create_connection((host, port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float = PEER_TIMEOUT) -> tuple[bool, bytes]:
    """Read until the peer closes the connection: (True, what it sent), or (False, what it
    sent so far) once ``timeout`` seconds passed with the connection still open."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, bytes(received)
        sock.settimeout(max(0.01, left))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(received)
        except TimeoutError:
            return False, bytes(received)
        if not chunk:
            return True, bytes(received)
        received += chunk


def read_until(sock: socket.socket, marker: bytes, timeout: float = PEER_TIMEOUT) -> bytes:
    """Read until ``marker`` has arrived; fails if the peer closes or stays silent first."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while marker not in received:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout}s; got {bytes(received)!r}"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r} arrived; got {bytes(received)!r}"
        received += chunk
    return bytes(received)


def read_status_line(sock: socket.socket, timeout: float = PEER_TIMEOUT) -> str:
    """The first line of an HTTP answer ("" if the server closed without one); fails if
    nothing comes within ``timeout``. What follows is not read (an event stream never ends)."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while b"\r\n" not in received:
        left = deadline - time.monotonic()
        assert left > 0, f"no answer within {timeout}s; got {bytes(received)!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        received += chunk
    line = bytes(received).split(b"\r\n", 1)[0].decode("latin-1")
    return line.split(" ", 1)[1] if line.startswith("HTTP/") and " " in line else ""


def send_all(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the server closed the connection before taking all of it
    (which is fine for a peer it has every right to drop)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


# ------------------------------------------------------------------ processes and ports


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process ``pid`` and its descendants listen on."""
    root = psutil.Process(pid)
    ports: set[int] = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:  # exited while we looked
            continue
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
    return ports


def port_of(url_or_address: str) -> int:
    """The port of ``tcp://h:p`` or ``http://h:p/``."""
    rest = url_or_address.split("://", 1)[-1].split("/", 1)[0]
    return int(rest.rpartition(":")[2])


def rss_of(pid: int) -> int:
    """Resident bytes of the process ``pid`` alone (each server is measured on its own)."""
    return int(psutil.Process(pid).memory_info().rss)
