"""The handshake every connection starts with, the same for every backend.

The connecting side sends a `Hello` (protocol version, role, name, token); the listening
side answers `Welcome`, or `Reject` with a reason and closes. Until a `Welcome` has crossed,
a comm carries nothing else and deserializes nothing (see `Comm.read_handshake`).
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from ..protocol.messages import PROTOCOL_VERSION, Hello, Reject, Welcome
from .core import Comm, HandshakeRejected


def check_hello(hello: Hello, *, token: str | None, roles: Collection[str] | None) -> str | None:
    """Why a listener with this ``token`` and ``roles`` refuses ``hello``; None if it accepts."""
    if hello.version != PROTOCOL_VERSION:
        return (
            f"protocol version {hello.version} is not supported "
            f"(this server speaks version {PROTOCOL_VERSION})"
        )
    if roles is not None and hello.role not in roles:
        return f"role {hello.role!r} is not accepted here (accepted: {', '.join(sorted(roles))})"
    if token is not None:
        # compare_digest: the time taken must not tell how much of the token was right.
        given = (hello.token or "").encode()
        if hello.token is None or not hmac.compare_digest(given, token.encode()):
            return "invalid authentication token"
    return None


async def server_handshake(
    comm: Comm, *, name: str, token: str | None, roles: Collection[str] | None
) -> Hello:
    """Read the peer's `Hello` and answer it. Raises `HandshakeRejected` after sending a
    `Reject`; `ProtocolError` or `CommClosedError` if the peer misbehaved."""
    hello = await comm.read_handshake((Hello,))
    assert isinstance(hello, Hello)
    reason = check_hello(hello, token=token, roles=roles)
    if reason is not None:
        await comm.write_handshake(Reject(reason))
        raise HandshakeRejected(reason)
    await comm.write_handshake(Welcome(version=PROTOCOL_VERSION, name=name))
    return hello


async def client_handshake(comm: Comm, hello: Hello) -> Welcome:
    """Send ``hello`` and wait for the answer; raises `HandshakeRejected` on a `Reject`."""
    await comm.write_handshake(hello)
    answer = await comm.read_handshake((Welcome, Reject))
    if isinstance(answer, Reject):
        raise HandshakeRejected(f"{comm.peer_address} rejected the connection: {answer.reason}")
    assert isinstance(answer, Welcome)
    if answer.version != PROTOCOL_VERSION:
        raise HandshakeRejected(
            f"{comm.peer_address} speaks protocol version {answer.version}, "
            f"we speak {PROTOCOL_VERSION}"
        )
    return answer
