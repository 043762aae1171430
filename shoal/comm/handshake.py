"""The handshake every connection starts with, the same for every backend.

The connecting side sends a `Hello` (protocol version, role, name, token); the listening
side answers `Welcome`, or `Reject` with a reason and closes. Until a `Welcome` has crossed,
a comm carries nothing else and deserializes nothing (see `Comm.read_handshake`).

Over TLS both sides also hold the other's certificate, verified against the cluster's CA,
and check its role: the listener that the role claimed in the `Hello` is one the
certificate allows (`CERT_ROLES_FOR_HELLO`), the connecting side that the listener's
certificate is of the role it meant to reach, before it sends its token.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping

from ..protocol.messages import PROTOCOL_VERSION, Hello, Reject, Welcome
from .core import Comm, HandshakeRejected

#: The certificate roles that may say each `Hello` role: a client certificate cannot
#: register a worker, a worker certificate cannot act as a client, and only the scheduler
#: and workers talk to workers as peers (the scheduler forwarding `run`, workers fetching).
CERT_ROLES_FOR_HELLO: dict[str, frozenset[str]] = {
    "client": frozenset({"client"}),
    "worker": frozenset({"worker"}),
    "peer": frozenset({"scheduler", "worker"}),
    "nanny": frozenset({"worker"}),
}


def _describe_roles(roles: frozenset[str]) -> str:
    return "a certificate with no shoal role" if not roles else (
        f"a {' and '.join(sorted(roles))} certificate")  # fmt: skip


def check_certificate(hello: Hello, cert_roles: frozenset[str] | None) -> str | None:
    """Why a peer whose certificate holds ``cert_roles`` may not say ``hello``; None if it
    may (or if the transport has no certificates)."""
    if cert_roles is None:
        return None
    allowed = CERT_ROLES_FOR_HELLO.get(hello.role, frozenset())
    if cert_roles & allowed:
        return None
    need = " or ".join(sorted(allowed)) or "no"
    return (f"{_describe_roles(cert_roles)} may not connect as {hello.role!r}"
            f" (that takes a {need} certificate)")  # fmt: skip


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
    comm: Comm,
    *,
    name: str,
    token: str | None,
    roles: Collection[str] | None,
    frame_limits: Mapping[str, int] | None = None,
) -> Hello:
    """Read the peer's `Hello` and answer it. Raises `HandshakeRejected` after sending a
    `Reject`; `ProtocolError` or `CommClosedError` if the peer misbehaved.

    ``frame_limits`` caps (by role) the frames the peer may send once welcomed: set before
    the `Welcome` goes out, so that no frame is ever read under a larger limit."""
    hello = await comm.read_handshake((Hello,))
    assert isinstance(hello, Hello)
    reason = check_hello(hello, token=token, roles=roles) or check_certificate(
        hello, comm.peer_roles)
    if reason is not None:
        await comm.write_handshake(Reject(reason))
        raise HandshakeRejected(reason)
    if frame_limits and hello.role in frame_limits:
        comm.limit_frames(frame_limits[hello.role], f"{hello.role} {hello.name!r}")
    await comm.write_handshake(Welcome(version=PROTOCOL_VERSION, name=name))
    return hello


async def client_handshake(comm: Comm, hello: Hello, server_role: str | None = None) -> Welcome:
    """Send ``hello`` and wait for the answer; raises `HandshakeRejected` on a `Reject`.

    Over TLS, a listener whose certificate is not of ``server_role`` is refused before our
    `Hello` (and its token) goes out."""
    if comm.peer_roles is not None and server_role is not None:
        if server_role not in comm.peer_roles:
            raise HandshakeRejected(
                f"{comm.peer_address} presented {_describe_roles(comm.peer_roles)}, not a"
                f" {server_role} certificate: refusing to connect to it as {hello.role!r}")
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
