"""Requests to peers over long-lived connections, many in flight on each.

Each request message carries a ``rid``; the peer answers with a message carrying the same
``rid`` (`Reply` or `DataReply`). One reader task per connection hands answers to waiters.
Used by clients (gather, scatter), workers (fetching inputs) and the scheduler (run).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

from .batched import BatchedSend
from .core import Comm, CommClosedError
from .registry import connect
from ..protocol.messages import Hello, Msg

if TYPE_CHECKING:
    from ..security.credentials import Security

logger = logging.getLogger("shoal.rpc")

_rids = itertools.count(1)


def next_rid() -> int:
    """A request id unique in this process."""
    return next(_rids)


class _Peer:
    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.send = BatchedSend(comm)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.reader: asyncio.Task[None] | None = None


class PeerPool:
    """One connection per peer address, shared by all requests to it."""

    def __init__(self, hello: Hello, connect_timeout: float = 10.0,
                 security: Security | None = None, server_role: str = "worker",
                 max_frame_bytes: int | None = None) -> None:  # fmt: skip
        """``security``: TLS credentials for ``tls://`` peers, whose certificates must hold
        ``server_role`` (the peers are workers, unless told otherwise);
        ``max_frame_bytes`` caps what a peer may send us in one frame."""
        self.hello = hello
        self.connect_timeout = connect_timeout
        self.security = security
        self.server_role = server_role
        self.max_frame_bytes = max_frame_bytes
        self._peers: dict[str, _Peer] = {}
        self._connecting: dict[str, asyncio.Future[_Peer]] = {}
        self._closed = False

    async def request(self, address: str, msg: Msg, timeout: float | None = None) -> Any:
        """Send ``msg`` (which has a ``rid``) to ``address``; return the peer's answer."""
        peer = await self._get(address)
        rid: int = msg.rid  # type: ignore[attr-defined]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        peer.waiting[rid] = fut
        try:
            peer.send.send(msg)
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        finally:
            peer.waiting.pop(rid, None)

    async def start_request(self, address: str, msg: Msg) -> asyncio.Future[Any]:
        """Send ``msg`` (which has a ``rid``) to ``address`` now; return the future of the
        answer. Requests started one after another reach the peer in that order."""
        peer = await self._get(address)
        rid: int = msg.rid  # type: ignore[attr-defined]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        peer.waiting[rid] = fut
        peer.send.send(msg)
        return fut

    def connected(self, address: str) -> bool:
        """Whether a connection to ``address`` is open now."""
        peer = self._peers.get(address)
        return peer is not None and not peer.comm.closed

    async def _get(self, address: str) -> _Peer:
        if self._closed:
            raise CommClosedError("connection pool is closed")
        peer = self._peers.get(address)
        if peer is not None and not peer.comm.closed:
            return peer
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Peer] = asyncio.get_running_loop().create_future()
        self._connecting[address] = fut
        try:
            # Peers are known to be up: a refused connection means the peer is gone.
            comm = await connect(address, self.hello, timeout=self.connect_timeout,
                                 retry_refused=False, security=self.security,
                                 server_role=self.server_role)  # fmt: skip
            if self.max_frame_bytes is not None:
                comm.limit_frames(self.max_frame_bytes, f"{self.server_role} {address}")
            peer = _Peer(comm)
            peer.reader = asyncio.ensure_future(self._read(address, peer))
            self._peers[address] = peer
            fut.set_result(peer)
            return peer
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            self._connecting.pop(address, None)

    async def _read(self, address: str, peer: _Peer) -> None:
        error: BaseException = CommClosedError(f"connection to {address} closed")
        try:
            while True:
                for msg in await peer.comm.read():
                    rid = getattr(msg, "rid", None)
                    fut = peer.waiting.pop(rid, None) if rid is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    del msg, fut  # not kept while waiting to read: a reply may hold data
        except CommClosedError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a broken peer fails its requests, not us
            logger.warning("dropping connection to %s: %s", address, exc)
            error = CommClosedError(f"connection to {address} failed: {exc}")
        finally:
            if self._peers.get(address) is peer:
                del self._peers[address]
            for fut in peer.waiting.values():
                if not fut.done():
                    fut.set_exception(error)
            peer.waiting.clear()
            peer.comm.abort()

    def forget(self, address: str) -> None:
        """Drop the connection to ``address`` (e.g. the worker left)."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.comm.abort()

    async def close(self) -> None:
        self._closed = True
        peers = list(self._peers.values())
        self._peers.clear()
        for peer in peers:
            await peer.send.close()
            if peer.reader is not None:
                peer.reader.cancel()
        for peer in peers:
            if peer.reader is not None:
                try:
                    await peer.reader
                except BaseException:  # noqa: BLE001 - closing: the reader's end is expected
                    pass
