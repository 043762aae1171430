"""TCP transport, and TLS over it: frames (see `protocol.framing`) over an asyncio
``BufferedProtocol``.

Reads land where they belong: a large part goes straight from the kernel into a buffer of
its own, and the decoded `Serialized` values are memoryviews of it, so a NumPy array is
rebuilt without a copy. Writes never join large parts: they go to the transport in pieces,
straight from the caller's memory (small parts are joined, so a small frame is one
packet), and ``write`` waits while the transport is full. Works on the default event loop
and on uvloop, IPv4 and IPv6.

``tls://`` is the same protocol inside the event loop's TLS transport (`TCPBackend` given
an ``ssl.SSLContext``): the TLS handshake completes before the protocol sees a byte, so a
peer without a certificate the CA signed (or speaking plain TCP) never reaches our code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

from ..protocol.codec import Codec, ProtocolError, decode_handshake, encode_handshake
from ..protocol.framing import HANDSHAKE_MAX_FRAME_BYTES, FrameReader, frame_prefix, max_frame_bytes
from ..protocol.messages import Message, Msg, Welcome
from ..protocol.serialize import Buffer
from ..security.credentials import peer_roles
from .addressing import format_address, parse_host_port
from .core import Backend, Comm, CommClosedError, Listener

logger = logging.getLogger("shoal.comm")

DEFAULT_HOST = "127.0.0.1"
#: Stop reading from the socket while this many received bytes wait for `read()`.
READ_PAUSE_BYTES = 64 * 1024 * 1024
#: Consecutive parts smaller than this are joined into one write: one syscall, one packet.
COALESCE_BYTES = 64 * 1024
#: Large parts are handed to the transport in pieces this big, each once it has sent the
#: previous one. Handing it 100 MB at once is slower: before Python 3.12 the default loop
#: copies what the socket does not take into a bytearray (and again each time that halves),
#: and even uvloop runs at 2/3 of the speed (3.4 GB/s vs 2.6 GB/s on loopback).
PIECE_BYTES = 1024 * 1024
#: A graceful close that cannot flush within this many seconds becomes an abort.
CLOSE_TIMEOUT = 5.0
#: Pending connections the kernel queues; many workers may connect at once.
BACKLOG = 1024
#: Bytes a TLS transport may hold unsent before writers wait.
TLS_WRITE_HIGH = 1024 * 1024
#: Seconds a peer has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT = 10.0


class _FrameProtocol(asyncio.BufferedProtocol):
    """The state of one TCP connection: parsed frames waiting to be read, write pausing,
    and why it ended. `TCPComm` is the face of it."""

    def __init__(
        self,
        max_frame_bytes: int,
        on_accept: Callable[[_FrameProtocol], None] | None = None,
        scheme: str = "tcp",
    ) -> None:
        """``on_accept`` is given on the server side: it is called with the new connection."""
        self._scheme = scheme
        self._loop = asyncio.get_running_loop()
        self._on_accept = on_accept
        self._max_frame_bytes = max_frame_bytes
        # Until the handshake passes, a frame may be no bigger than a Hello needs. The server
        # side raises the limit when it sends its Welcome (the client waits for it before
        # sending more); the client side reads only its first frame, the server's answer,
        # under the small limit.
        if on_accept is None:
            self.reader = FrameReader(
                max_frame_bytes, first_frame_max_bytes=HANDSHAKE_MAX_FRAME_BYTES
            )
        else:
            self.reader = FrameReader(HANDSHAKE_MAX_FRAME_BYTES)
        self.transport = cast(asyncio.Transport, None)  # set in connection_made
        self.frames: deque[list[memoryview]] = deque()
        self.queued_bytes = 0
        self.established = False  #: the handshake passed
        self.closing = False  #: we closed or aborted
        self.lost = False  #: the connection is gone
        self.lost_future: asyncio.Future[None] = self._loop.create_future()
        self.error: BaseException | None = None  #: why it ended, unless by a clean close
        self.peer_address = f"{scheme}://?"
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._read_paused = False
        self._write_lock = asyncio.Lock()  # held while a frame is written in pieces
        self._peer_label = ""  # who the peer said it is, for log lines

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer_address = _format_sockname(transport.get_extra_info("peername"), self._scheme)
        if self._scheme == "tls":
            # TLS encrypts (copies) every byte anyway. Its transport pauses us when its
            # buffer reaches the high mark, even at 0 bytes: a high mark of 0 would pause
            # writers for good.
            self.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_HIGH // 2)
        else:
            # Pause writers as soon as the transport holds unsent data, resume them once it
            # is empty: each piece of a large part is then handed over when the socket can
            # take it straight from our memory.
            self.transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # Small control messages must not wait for Nagle's algorithm.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        if self._on_accept is not None:
            self._on_accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.violation(exc)
            return
        except (MemoryError, OSError) as exc:  # the buffer for a part could not be allocated
            self.violation(ProtocolError(f"cannot receive this frame: {exc!r}"))
            return
        if frames:
            for frame in frames:
                self.queued_bytes += _frame_nbytes(frame)
            self.frames.extend(frames)
            self._wake_reader()
            if self.queued_bytes > READ_PAUSE_BYTES and not self._read_paused and not self.closed:
                self._read_paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.reader.mid_frame and self.error is None:
            self.error = ProtocolError("connection closed in the middle of a frame")
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.error is None:
            self.error = exc
        self._wake_reader()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not self.lost_future.done():
            self.lost_future.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- used by TCPComm

    @property
    def closed(self) -> bool:
        return self.closing or self.lost

    def establish(self) -> None:
        """The handshake passed: frames may now be as big as the configured limit."""
        self.established = True
        self.reader.max_frame_bytes = self._max_frame_bytes

    def limit_frames(self, nbytes: int, peer: str = "") -> None:
        """Lower the limit that applies once the handshake passed (never raise it)."""
        self._max_frame_bytes = min(self._max_frame_bytes, nbytes)
        self._peer_label = peer
        if self.established:
            self.reader.max_frame_bytes = self._max_frame_bytes

    def violation(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: drop the connection."""
        if self.error is None:
            self.error = exc
        if self.established:  # before that, the handshake reports it
            who = f" ({self._peer_label})" if self._peer_label else ""
            logger.warning("closing connection with %s%s: %s", self.peer_address, who, exc)
        self.abort()

    def abort(self) -> None:
        self.closing = True
        self._wake_reader()
        self.transport.abort()

    async def wait_for_frame(self) -> None:
        if self._read_waiter is not None:
            raise RuntimeError("another task is already reading from this comm")
        self._read_waiter = self._loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    def pop_frame(self) -> list[memoryview]:
        frame = self.frames.popleft()
        self.queued_bytes -= _frame_nbytes(frame)
        if self._read_paused and self.queued_bytes <= READ_PAUSE_BYTES // 2 and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return frame

    async def send_frame(self, parts: list[Buffer]) -> None:
        """Send one frame whole: frames of concurrent writers never interleave."""
        if self.closed:
            raise CommClosedError(f"connection with {self.peer_address} is closed")
        pieces = _pieces(parts, PIECE_BYTES)
        if len(pieces) == 1 and not self._write_lock.locked():
            self.transport.write(pieces[0])
            await self.drain()
            return
        async with self._write_lock:
            written = 0
            try:
                for piece in pieces:
                    if self.closed:
                        break
                    self.transport.write(piece)
                    written += 1
                    await self.drain()  # until the transport's buffer is empty
            except BaseException:
                if written < len(pieces):  # half a frame went out: the stream is broken
                    self.abort()
                raise
            if written < len(pieces):
                raise CommClosedError(f"connection with {self.peer_address} closed while writing")

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._drain_waiters.remove(waiter)
        if self.lost:
            raise CommClosedError(f"connection with {self.peer_address} was lost while writing")

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _pieces(parts: list[Buffer], max_piece: int) -> list[Buffer]:
    """What to hand the transport for one frame: the prefix with the small parts that
    follow it joined (one syscall, one packet), and large parts as they are, never joined
    into a big buffer, sliced into ``max_piece`` bytes."""
    pieces: list[Buffer] = []
    small: list[Buffer] = [frame_prefix(parts)]
    for part in parts:
        view = memoryview(part)
        if view.nbytes < COALESCE_BYTES:
            small.append(part)
            continue
        if small:
            pieces.append(small[0] if len(small) == 1 else b"".join(small))
            small = []
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        pieces.extend(view[i : i + max_piece] for i in range(0, view.nbytes, max_piece))
    if small:
        pieces.append(small[0] if len(small) == 1 else b"".join(small))
    return pieces


def _frame_nbytes(frame: list[memoryview]) -> int:
    return sum(part.nbytes for part in frame)


def _format_sockname(sockname: object, scheme: str = "tcp") -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return format_address(scheme, str(sockname[0]), int(sockname[1]))
    return f"{scheme}://{sockname}"


class TCPComm(Comm):
    def __init__(self, protocol: _FrameProtocol) -> None:
        self._protocol = protocol
        self._encoder = Codec()
        self._decoder = Codec()
        transport = protocol.transport
        self._local_address = _format_sockname(transport.get_extra_info("sockname"),
                                               protocol._scheme)  # fmt: skip
        if transport.get_extra_info("sslcontext") is not None:
            # Verified by the TLS layer against our CA (CERT_REQUIRED both ways).
            self.peer_roles = peer_roles(transport.get_extra_info("peercert"))

    @property
    def closed(self) -> bool:
        return self._protocol.closed

    @property
    def peer_address(self) -> str:
        return self._protocol.peer_address

    @property
    def local_address(self) -> str:
        return self._local_address

    async def read(self) -> list[Message]:
        if not self._protocol.established:
            raise RuntimeError("read() before the handshake passed")
        parts = await self._read_frame()
        try:
            return self._decoder.decode(parts)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's fault
            error = exc if isinstance(exc, ProtocolError) else ProtocolError(repr(exc))
            self._protocol.violation(error)
            raise CommClosedError(f"{self.peer_address} sent a bad message: {error}") from error

    async def write(self, msgs: list[Msg]) -> None:
        await self._protocol.send_frame(self._encoder.encode(msgs))

    async def close(self) -> None:
        protocol = self._protocol
        if not protocol.closing:
            protocol.closing = True
            protocol.transport.close()  # flushes what is buffered, then closes
        if not protocol.lost_future.done():
            try:
                await asyncio.wait_for(asyncio.shield(protocol.lost_future), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:  # the peer does not read: give up on the rest
                protocol.abort()
                await protocol.lost_future

    def abort(self) -> None:
        self._protocol.abort()

    def limit_frames(self, nbytes: int, peer: str = "") -> None:
        self._protocol.limit_frames(nbytes, peer)

    async def write_handshake(self, msg: Msg) -> None:
        if isinstance(msg, Welcome):
            self._protocol.establish()
        await self._protocol.send_frame(encode_handshake(msg))

    async def read_handshake(self, expect: tuple[type[Msg], ...]) -> Msg:
        parts = await self._read_frame()
        error = ProtocolError("no handshake message type expected")
        for typ in expect:  # decode_handshake takes one type: try each
            try:
                msg = decode_handshake(parts, typ)
            except ProtocolError as exc:
                error = exc
                continue
            if isinstance(msg, Welcome):
                self._protocol.establish()
            return msg
        raise error

    async def _read_frame(self) -> list[memoryview]:
        protocol = self._protocol
        while True:
            if protocol.closing:
                raise CommClosedError(f"connection with {self.peer_address} is closed")
            if protocol.frames:
                return protocol.pop_frame()
            if protocol.lost:
                # Everything the peer sent before closing has been read.
                reason = protocol.error
                text = f"connection with {self.peer_address} was closed"
                raise CommClosedError(f"{text}: {reason}" if reason else text) from reason
            await protocol.wait_for_frame()


class TCPListener(Listener):
    def __init__(self, server: asyncio.AbstractServer, address: str) -> None:
        self._server = server
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def stop(self) -> None:
        self._server.close()  # closes the listening sockets
        # Not ``wait_closed()``: since Python 3.12 it also waits for every accepted
        # connection to close, and those belong to their handlers, not to the listener.
        await asyncio.sleep(0)


class TCPBackend(Backend):
    """``tcp://``; with an ``ssl_context``, ``tls://`` (mutual TLS: the context says so)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.scheme = "tls" if ssl_context is not None else "tcp"

    async def connect(self, location: str) -> Comm:
        host, port = parse_host_port(location)
        if not host or port is None:
            raise ValueError(f"a {self.scheme} address needs a host and a port, not {location!r}")
        limit = max_frame_bytes()
        loop = asyncio.get_running_loop()
        context = self.ssl_context
        _, protocol = await loop.create_connection(
            lambda: _FrameProtocol(limit, scheme=self.scheme), host, port, ssl=context,
            server_hostname=host if context else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if context else None,
        )
        return TCPComm(protocol)

    async def listen(self, location: str, on_comm: Callable[[Comm], None]) -> Listener:
        host, port = parse_host_port(location)
        limit = max_frame_bytes()

        def accepted(protocol: _FrameProtocol) -> None:
            on_comm(TCPComm(protocol))

        loop = asyncio.get_running_loop()
        context = self.ssl_context
        server = await loop.create_server(
            lambda: _FrameProtocol(limit, on_accept=accepted, scheme=self.scheme),
            host or DEFAULT_HOST,
            port or 0,
            backlog=BACKLOG,
            ssl=context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if context else None,
        )
        # With port 0 and a name that resolves to several addresses, each socket gets its
        # own port; the first one is the address we report.
        address = _format_sockname(server.sockets[0].getsockname(), self.scheme)
        return TCPListener(server, address)
