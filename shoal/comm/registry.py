"""`connect` and `listen` by address: the backend is chosen by the URI scheme, and every
connection goes through the handshake here, the same way for all backends.

``tls://`` is the tcp backend with the TLS context of a `Security` (which must be given);
a `Security` given with a plaintext address is an error rather than a silent downgrade.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING

from ..protocol.codec import ProtocolError
from ..protocol.messages import Hello
from .addressing import normalize_address, split_address
from .core import Backend, Comm, CommClosedError, HandshakeRejected, Listener, ShoalConnectionError
from .handshake import client_handshake, server_handshake
from .inproc import InprocBackend
from .tcp import TCPBackend

if TYPE_CHECKING:
    from ..security.credentials import Security

logger = logging.getLogger("shoal.comm")

#: First pause between attempts while an address refuses connections; it doubles each time.
RETRY_DELAY = 0.01
MAX_RETRY_DELAY = 0.5

_backends: dict[str, Backend] = {"tcp": TCPBackend(), "inproc": InprocBackend()}


def register_backend(scheme: str, backend: Backend) -> None:
    """Make ``scheme://`` addresses use ``backend``."""
    _backends[scheme.lower()] = backend


def get_backend(scheme: str) -> Backend:
    if scheme == "tls":
        raise ValueError("tls:// addresses need TLS credentials: pass security=shoal.Security"
                         "(ca_file=..., cert_file=..., key_file=...) or set SHOAL_TLS_CA_FILE,"
                         " SHOAL_TLS_CERT and SHOAL_TLS_KEY")  # fmt: skip
    try:
        return _backends[scheme]
    except KeyError:
        known = ", ".join(sorted(_backends))
        raise ValueError(f"unknown transport {scheme!r} (known: {known})") from None


def _backend_for(address: str, security: Security | None, server: bool) -> Backend:
    scheme, _ = split_address(address)
    if security is None:
        return get_backend(scheme)
    if scheme != "tls":
        raise ValueError(f"TLS credentials were given, but {address} is not a tls:// address:"
                         " refusing to fall back to plaintext")  # fmt: skip
    return TCPBackend(security.server_context() if server else security.client_context())


async def connect(
    address: str,
    hello: Hello,
    timeout: float = 10.0,
    retry_refused: bool = True,
    *,
    security: Security | None = None,
    server_role: str | None = None,
) -> Comm:
    """Connect to ``address`` and pass the handshake, all within ``timeout`` seconds.

    While the address refuses connections (the server may be starting) we retry with a
    growing pause, unless ``retry_refused`` is False (a peer that left will not come back
    at that address: fail at once). Raises `ShoalConnectionError` naming the address and
    the timeout, or `HandshakeRejected` with the server's reason.

    ``tls://`` addresses need ``security``; then the listener's certificate must hold
    ``server_role`` ("scheduler" or "worker"), and a TLS failure (a certificate our CA did
    not sign, or none) is a `ShoalConnectionError` that says so.
    """
    address = normalize_address(address)
    scheme, location = split_address(address)
    backend = _backend_for(address, security, server=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def failed(reason: object) -> ShoalConnectionError:
        text = _describe(reason) if isinstance(reason, BaseException) else reason
        return ShoalConnectionError(f"could not connect to {address} within {timeout}s: {text}")

    refused: ConnectionRefusedError | None = None
    delay = RETRY_DELAY
    while True:
        try:
            comm = await asyncio.wait_for(backend.connect(location), deadline - loop.time())
            break
        except asyncio.TimeoutError:
            raise failed(refused or "timed out") from refused
        except ConnectionRefusedError as exc:
            refused = exc
            remaining = deadline - loop.time()
            if remaining <= 0 or not retry_refused:
                raise failed(exc) from exc
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, MAX_RETRY_DELAY)
        except ssl.SSLError as exc:
            raise failed(f"TLS handshake failed: {_describe_tls(exc)}") from exc
        except ConnectionResetError as exc:
            raise failed(f"{exc} (a TLS listener refusing our certificate, or not TLS?)"
                         if security is not None else exc) from exc  # fmt: skip
        except OSError as exc:
            raise failed(exc) from exc

    try:
        await asyncio.wait_for(client_handshake(comm, hello, server_role), deadline - loop.time())
    except asyncio.TimeoutError:
        comm.abort()
        raise failed("no answer to the handshake") from None
    except (CommClosedError, ProtocolError) as exc:
        comm.abort()
        hint = ""
        if security is not None and isinstance(exc, CommClosedError):
            # TLS 1.3 verifies our certificate after our side of the TLS handshake is done:
            # a listener refusing it just closes.
            hint = (" (the server closed the connection: it may have refused our certificate,"
                    " one its CA did not sign)")  # fmt: skip
        raise failed(f"handshake failed: {exc}{hint}") from exc
    except BaseException:  # rejected, or cancelled
        comm.abort()
        raise
    return comm


def _describe_tls(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None) or ""
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return (f"the server's certificate is not signed by our CA ({exc.args[-1]})"
                if len(exc.args) > 1 else "the server's certificate is not signed by our CA")
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return f"the server refused our certificate ({reason})"
    if reason == "WRONG_VERSION_NUMBER":
        return "the server does not speak TLS (a tcp:// address?)"
    return str(exc)


def _describe(exc: BaseException) -> str:
    # asyncio words a refusal "Connect call failed ('127.0.0.1', 1)": our message already
    # names the address, what it lacks is the reason.
    if isinstance(exc, OSError) and exc.errno and str(exc.strerror).startswith("Connect call"):
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return str(exc)


async def listen(
    address: str,
    handler: Callable[[Comm], Awaitable[None]],
    *,
    name: str,
    token: str | None = None,
    handshake_timeout: float = 10.0,
    roles: Collection[str] | None = None,
    security: Security | None = None,
    frame_limits: Mapping[str, int] | None = None,
) -> Listener:
    """Listen at ``address``; each connection that passes the handshake is given to
    ``handler`` in a task of its own, with ``comm.peer`` set to the peer's `Hello`.

    The handshake checks the protocol version, the role (if ``roles`` is given) and the
    token (if ``token`` is given); a peer that fails it gets a `Reject` and is
    disconnected, one that breaks the protocol or stays silent for ``handshake_timeout``
    seconds is disconnected; both are logged. ``name`` is sent in the `Welcome`.

    A ``tls://`` address needs ``security``: every peer must then show a certificate our CA
    signed, whose role allows the role its `Hello` claims. ``frame_limits`` caps the frames
    each role may send once it passed the handshake (a bigger one closes that connection).
    """
    scheme, location = split_address(address)
    backend = _backend_for(normalize_address(address), security, server=True)
    listener = _HandshakingListener(
        handler, name=name, token=token, roles=roles, handshake_timeout=handshake_timeout,
        frame_limits=frame_limits,
    )
    listener.inner = await backend.listen(location, listener.on_comm)
    return listener


class _HandshakingListener(Listener):
    """Wraps a backend's listener: handshake, then handler, one task per connection.

    ``stop`` stops accepting, then aborts the connections whose handler is still running
    and waits for those tasks: nothing this listener started outlives it.
    """

    inner: Listener

    def __init__(
        self,
        handler: Callable[[Comm], Awaitable[None]],
        *,
        name: str,
        token: str | None,
        roles: Collection[str] | None,
        handshake_timeout: float,
        frame_limits: Mapping[str, int] | None = None,
    ) -> None:
        self._handler = handler
        self._frame_limits = dict(frame_limits or {})
        self._name = name
        self._token = token
        self._roles = None if roles is None else frozenset(roles)
        self._handshake_timeout = handshake_timeout
        self._tasks: dict[asyncio.Task[None], Comm] = {}
        self._stopped = False

    @property
    def address(self) -> str:
        return self.inner.address

    def on_comm(self, comm: Comm) -> None:
        if self._stopped:
            comm.abort()
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(comm), name=f"shoal-serve {comm.peer_address} -> {comm.local_address}"
        )
        self._tasks[task] = comm
        task.add_done_callback(self._tasks.pop)

    async def _serve(self, comm: Comm) -> None:
        peer = comm.peer_address
        try:
            hello = await asyncio.wait_for(
                server_handshake(comm, name=self._name, token=self._token, roles=self._roles,
                                 frame_limits=self._frame_limits),
                self._handshake_timeout,
            )
        except HandshakeRejected as exc:
            logger.warning("rejected connection from %s: %s", peer, exc)
            await comm.close()  # graceful, so that the Reject reaches the peer
            return
        except asyncio.TimeoutError:
            logger.warning(
                "closing connection from %s: no handshake within %ss", peer, self._handshake_timeout
            )
            comm.abort()
            return
        except (ProtocolError, CommClosedError) as exc:
            logger.warning("closing connection from %s: bad handshake: %s", peer, exc)
            comm.abort()
            return
        comm.peer = hello
        try:
            await self._handler(comm)
        except CommClosedError as exc:
            logger.debug("connection from %s closed: %s", peer, exc)
            comm.abort()
        except Exception:
            logger.exception("handler for connection from %s failed", peer)
            comm.abort()

    async def stop(self) -> None:
        self._stopped = True  # connections still arriving are dropped in `on_comm`
        # A handler may stop its own listener: do not cancel (and wait for) ourselves.
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            self._tasks[task].abort()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.inner.stop()
