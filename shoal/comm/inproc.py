"""In-process transport, ``inproc://name``: a client and a scheduler on one event loop.

Batches are passed by reference, never encoded, so the receiver gets the very objects the
sender wrote: neither side may mutate a message after writing it. There is no
backpressure. The handshake runs as on every transport. Listener names are unique per
process; ``inproc://`` with no name gets a fresh one.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections import deque
from collections.abc import Callable
from typing import cast

from ..protocol.codec import ProtocolError
from ..protocol.messages import Message, Msg
from .core import Backend, Comm, CommClosedError, Listener

_listeners: dict[str, InprocListener] = {}
_counter = itertools.count(1)


class InprocComm(Comm):
    """One end of an in-process connection; its twin is the other end."""

    def __init__(self, local_address: str, peer_address: str) -> None:
        self._local_address = local_address
        self._peer_address = peer_address
        self._loop = asyncio.get_running_loop()
        self._inbox: deque[list[Msg]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._twin = self  # set by `pair`
        self._closing = False  # this end closed
        self._twin_closed = False  # the other end closed: read what is left, then fail

    @staticmethod
    def pair(address_a: str, address_b: str) -> tuple[InprocComm, InprocComm]:
        a, b = InprocComm(address_a, address_b), InprocComm(address_b, address_a)
        a._twin, b._twin = b, a
        return a, b

    @property
    def closed(self) -> bool:
        return self._closing or self._twin_closed

    @property
    def peer_address(self) -> str:
        return self._peer_address

    @property
    def local_address(self) -> str:
        return self._local_address

    async def read(self) -> list[Message]:
        # Everything in the inbox was written by our own process as typed messages.
        return cast("list[Message]", await self._next_batch())

    async def write(self, msgs: list[Msg]) -> None:
        self._check_writable()
        self._twin._deliver(list(msgs))  # a copy of the list: the caller may reuse it

    async def close(self) -> None:
        self.abort()  # nothing is buffered on our side, so closing is immediate

    def abort(self) -> None:
        if not self._closing:
            self._closing = True
            self._wake()
            self._twin._twin_gone()

    async def write_handshake(self, msg: Msg) -> None:
        self._check_writable()
        self._twin._deliver([msg])

    async def read_handshake(self, expect: tuple[type[Msg], ...]) -> Msg:
        batch = await self._next_batch()
        if len(batch) != 1 or not isinstance(batch[0], expect):
            names = " or ".join(t.__name__ for t in expect)
            raise ProtocolError(f"bad handshake: expected one {names}, got {batch!r:.200}")
        return batch[0]

    def _deliver(self, batch: list[Msg]) -> None:
        self._inbox.append(batch)
        self._wake()

    def _twin_gone(self) -> None:
        self._twin_closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next_batch(self) -> list[Msg]:
        while True:
            if self._closing:
                raise CommClosedError(f"connection with {self._peer_address} is closed")
            if self._inbox:
                return self._inbox.popleft()
            if self._twin_closed:
                raise CommClosedError(f"connection with {self._peer_address} was closed")
            if self._waiter is not None:
                raise RuntimeError("another task is already reading from this comm")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _check_writable(self) -> None:
        if self.closed:
            raise CommClosedError(f"connection with {self._peer_address} is closed")


class InprocListener(Listener):
    def __init__(self, name: str, on_comm: Callable[[Comm], None]) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self._on_comm = on_comm
        self._connections = itertools.count(1)

    @property
    def address(self) -> str:
        return f"inproc://{self.name}"

    def accept(self) -> InprocComm:
        """A new connection: its server end goes to ``on_comm``, the client end is returned."""
        client_address = f"{self.address}/client-{next(self._connections)}"
        client, server = InprocComm.pair(client_address, self.address)
        self._on_comm(server)
        return client

    async def stop(self) -> None:
        if _listeners.get(self.name) is self:
            del _listeners[self.name]


def _fresh_name() -> str:
    while True:
        name = f"{os.getpid()}-{next(_counter)}"
        if name not in _listeners:
            return name


class InprocBackend(Backend):
    async def connect(self, location: str) -> Comm:
        listener = _listeners.get(location)
        if listener is None:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"no listener at inproc://{location} in this process"
            )
        if listener.loop is not asyncio.get_running_loop():
            raise RuntimeError(f"inproc://{location} listens on another event loop")
        return listener.accept()

    async def listen(self, location: str, on_comm: Callable[[Comm], None]) -> Listener:
        name = location or _fresh_name()
        if name in _listeners:
            raise OSError(errno.EADDRINUSE, f"inproc://{name} is already in use")
        listener = _listeners[name] = InprocListener(name, on_comm)
        return listener
