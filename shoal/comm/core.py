"""The transport interfaces: `Comm` (one connection), `Listener`, `Backend`, and their errors.

A backend (tcp, inproc, ...) only moves message batches and handshake messages; the
handshake itself, address schemes and connect retries live in `registry`, once for all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from ..protocol.messages import Hello, Message, Msg


class CommClosedError(ConnectionError):
    """The connection is closed (by either side, or because the peer broke the protocol)."""


class ShoalConnectionError(ConnectionError):
    """Could not connect; the message names the address and the timeout."""


class HandshakeRejected(ConnectionError, PermissionError):
    """The server refused our `Hello`; the message carries its reason."""


class Comm(ABC):
    """One connection: ordered, reliable batches of messages in both directions.

    One task may ``read`` at a time; any number may ``write`` (each batch is sent whole).
    A `Comm` is handed out only after its handshake has passed.
    """

    #: The peer's handshake; set on the server side once it passed.
    peer: Hello | None = None
    #: The shoal roles in the peer's TLS certificate (verified against our CA); None on a
    #: transport without certificates.
    peer_roles: frozenset[str] | None = None

    @abstractmethod
    async def read(self) -> list[Message]:
        """The next batch the peer wrote. Raises `CommClosedError` once the comm is closed
        (batches the peer sent before closing are still delivered first)."""

    @abstractmethod
    async def write(self, msgs: list[Msg]) -> None:
        """Send one batch; returns when the transport can take more (backpressure)."""

    @abstractmethod
    async def close(self) -> None:
        """Close gracefully: what was written is flushed to the peer first."""

    @abstractmethod
    def abort(self) -> None:
        """Close at once, dropping unsent data."""

    def limit_frames(self, nbytes: int, peer: str = "") -> None:
        """Cap the frames the peer may send once the handshake passed; ``peer`` names it in
        the log line when it sends a bigger one. (A transport that does not frame bytes
        from another process has nothing to cap.)"""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @property
    @abstractmethod
    def peer_address(self) -> str: ...

    @property
    @abstractmethod
    def local_address(self) -> str: ...

    # -- used by the handshake only (see `handshake`)

    @abstractmethod
    async def write_handshake(self, msg: Msg) -> None:
        """Send one handshake message (`Hello`, `Welcome` or `Reject`)."""

    @abstractmethod
    async def read_handshake(self, expect: tuple[type[Msg], ...]) -> Msg:
        """Read one handshake message of one of the ``expect`` types. Must not accept
        anything else, nor deserialize any payload; raises `ProtocolError` or
        `CommClosedError`. A `Welcome` crossing the comm (either way) ends the handshake."""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.local_address} -> {self.peer_address} {state}>"


class Listener(ABC):
    """Accepts connections until stopped."""

    @property
    @abstractmethod
    def address(self) -> str:
        """The address actually bound, e.g. ``tcp://127.0.0.1:40123`` when port 0 was asked."""

    @abstractmethod
    async def stop(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"


class Backend(ABC):
    """A transport, registered under a URI scheme. Its comms come un-handshaken."""

    @abstractmethod
    async def connect(self, location: str) -> Comm:
        """Open a connection to ``location`` (the address without ``scheme://``). Raises
        `ConnectionRefusedError` when nobody listens there yet (the caller retries)."""

    @abstractmethod
    async def listen(self, location: str, on_comm: Callable[[Comm], None]) -> Listener:
        """Listen at ``location``; ``on_comm`` is called with each new connection."""
