"""`connect` and `listen` by address: the backend is chosen by the URI scheme, and every
connection goes through the handshake here, the same way for all backends."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Collection

from ..protocol.codec import ProtocolError
from ..protocol.messages import Hello
from .addressing import normalize_address, split_address
from .core import Backend, Comm, CommClosedError, HandshakeRejected, Listener, ShoalConnectionError
from .handshake import client_handshake, server_handshake
from .inproc import InprocBackend
from .tcp import TCPBackend

logger = logging.getLogger("shoal.comm")

#: First pause between attempts while an address refuses connections; it doubles each time.
RETRY_DELAY = 0.01
MAX_RETRY_DELAY = 0.5

_backends: dict[str, Backend] = {"tcp": TCPBackend(), "inproc": InprocBackend()}


def register_backend(scheme: str, backend: Backend) -> None:
    """Make ``scheme://`` addresses use ``backend``."""
    _backends[scheme.lower()] = backend


def get_backend(scheme: str) -> Backend:
    try:
        return _backends[scheme]
    except KeyError:
        known = ", ".join(sorted(_backends))
        raise ValueError(f"unknown transport {scheme!r} (known: {known})") from None


async def connect(
    address: str, hello: Hello, timeout: float = 10.0, retry_refused: bool = True
) -> Comm:
    """Connect to ``address`` and pass the handshake, all within ``timeout`` seconds.

    While the address refuses connections (the server may be starting) we retry with a
    growing pause, unless ``retry_refused`` is False (a peer that left will not come back
    at that address: fail at once). Raises `ShoalConnectionError` naming the address and
    the timeout, or `HandshakeRejected` with the server's reason.
    """
    address = normalize_address(address)
    scheme, location = split_address(address)
    backend = get_backend(scheme)
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
        except OSError as exc:
            raise failed(exc) from exc

    try:
        await asyncio.wait_for(client_handshake(comm, hello), deadline - loop.time())
    except asyncio.TimeoutError:
        comm.abort()
        raise failed("no answer to the handshake") from None
    except (CommClosedError, ProtocolError) as exc:
        comm.abort()
        raise failed(f"handshake failed: {exc}") from exc
    except BaseException:  # rejected, or cancelled
        comm.abort()
        raise
    return comm


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
) -> Listener:
    """Listen at ``address``; each connection that passes the handshake is given to
    ``handler`` in a task of its own, with ``comm.peer`` set to the peer's `Hello`.

    The handshake checks the protocol version, the role (if ``roles`` is given) and the
    token (if ``token`` is given); a peer that fails it gets a `Reject` and is
    disconnected, one that breaks the protocol or stays silent for ``handshake_timeout``
    seconds is disconnected; both are logged. ``name`` is sent in the `Welcome`.
    """
    scheme, location = split_address(address)
    backend = get_backend(scheme)
    listener = _HandshakingListener(
        handler, name=name, token=token, roles=roles, handshake_timeout=handshake_timeout
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
    ) -> None:
        self._handler = handler
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
                server_handshake(comm, name=self._name, token=self._token, roles=self._roles),
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
