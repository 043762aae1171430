"""An aiohttp application served on the running event loop (the scheduler's or a worker's).

`HttpServer.start` binds the listening socket at once, so the URL is known (and printed,
and advertised) before aiohttp is even imported. The app starts in the background: when
aiohttp is not imported yet, only once the first connection arrives (then importing it on a
thread), so a cold `Client()` pays nothing for a dashboard nobody opens. Connections wait in
the socket's backlog meanwhile. With an ``ssl_context`` it serves HTTPS (the URL says so).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger("shoal.dashboard")

__all__ = ["HttpServer", "parse_address"]


def parse_address(address: str | int, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``":8787"``, ``"8787"``, ``8787`` -> (default_host, 8787); ``"0.0.0.0:0"`` ->
    ("0.0.0.0", 0); ``"http://host:1234/"`` -> ("host", 1234)."""
    text = str(address).strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad dashboard address {address!r}: expected [HOST]:PORT") from None
    if not 0 <= number < 65536:
        raise ValueError(f"bad dashboard address {address!r}: port out of range")
    return host, number


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class HttpServer:
    """Serves the app that ``build()`` returns (called once aiohttp is imported)."""

    def __init__(self, address: str | int, build: Callable[[], web.Application],
                 default_host: str = "127.0.0.1", what: str = "dashboard",
                 preload: tuple[str, ...] = ("aiohttp.web",),
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.host, self.requested_port = parse_address(address, default_host)
        #: serve HTTPS with this context (None: plain HTTP)
        self.ssl_context = ssl_context
        self.build = build
        #: modules ``build`` needs, imported on a thread the first time
        self.preload = preload
        self.what = what
        self.port = 0
        self.url = ""
        #: set when the app serves requests (or failed to start: see ``error``)
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        #: set when closing; long-lived handlers (event streams) end when they see it
        self.closing = asyncio.Event()
        self._sock: socket.socket | None = None
        self._runner: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HttpServer:
        """Bind now; serve from the background. Raises OSError if the address is unusable.
        A port that is taken (other than 0) falls back to a free one, with a warning."""
        try:
            self._sock = _bind(self.host, self.requested_port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or self.requested_port == 0:
                raise
            self._sock = _bind(self.host, 0)
            logger.warning("%s port %d is in use; serving on port %d instead", self.what,
                           self.requested_port, self._sock.getsockname()[1])  # fmt: skip
        self.port = self._sock.getsockname()[1]
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{_url_host(self.host)}:{self.port}/"
        self._task = asyncio.ensure_future(self._serve(self._sock))
        return self

    async def _serve(self, sock: socket.socket) -> None:
        try:
            missing = [m for m in self.preload if m not in sys.modules]
            if missing:
                # aiohttp is ~0.1 s of imports: not before someone connects (a cold
                # `Client()` does not pay for a page nobody opens), and not on the loop.
                await self._first_connection(sock)
                loop = asyncio.get_running_loop()
                for module in missing:
                    await loop.run_in_executor(None, importlib.import_module, module)
            from aiohttp import web

            runner = web.AppRunner(self.build(), access_log=None, handle_signals=False,
                                   shutdown_timeout=1.0)  # fmt: skip
            await runner.setup()
            self._runner = runner
            await web.SockSite(runner, sock, ssl_context=self.ssl_context).start()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            logger.exception("%s at %s could not start", self.what, self.url)
        finally:
            self.ready.set()

    @staticmethod
    async def _first_connection(sock: socket.socket) -> None:
        """Until a connection waits on ``sock`` (it stays in the backlog for the app)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_reader(sock.fileno(), readable)
        try:
            await waiter
        finally:
            loop.remove_reader(sock.fileno())

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.error is not None:
            raise RuntimeError(f"{self.what} failed to start: {self.error}") from self.error

    async def close(self) -> None:
        self.closing.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._runner is not None:
            server = self._runner.server
            transports = [h.transport for h in server.connections] if server is not None else []
            await self._runner.cleanup()
            self._runner = None
            if self.ssl_context is not None:
                # A TLS close waits for the peer's close_notify (an open page may never send
                # it): handlers have had their shutdown time, so drop what is left now.
                for transport in transports:
                    if transport is not None:
                        transport.abort()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
