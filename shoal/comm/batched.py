"""`BatchedSend`: fire-and-forget sends, one write per event-loop tick.

Many small messages (task finished, release key, ...) are produced in bursts. Writing each
on its own costs a syscall and a packet apiece; waiting a fixed interval to gather them
adds latency. Instead, the first message of a tick starts a flush task, whose first step
runs after every callback already queued in this tick (``create_task`` schedules it with
``call_soon``), so everything sent during the tick goes out as one batch, one tick later.
While a write is in flight, messages accumulate and go out as one batch right after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..protocol.messages import Msg
from .core import Comm, CommClosedError


class BatchedSend:
    """Wraps a `Comm`; ``send`` never blocks. Use from the comm's event loop only.

    When the comm breaks, the messages not yet written are dropped, ``on_error`` (if given)
    is called once with the error, and every later ``send`` raises `CommClosedError`.
    """

    def __init__(self, comm: Comm, on_error: Callable[[BaseException], None] | None = None) -> None:
        self.comm = comm
        self._on_error = on_error
        self._buffer: list[Msg] = []
        self._flusher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closing = False
        self.batches_sent = 0  #: writes done, for tests and metrics
        self.messages_sent = 0

    def send(self, msg: Msg) -> None:
        self._check()
        self._buffer.append(msg)
        self._schedule()

    def send_many(self, msgs: list[Msg]) -> None:
        self._check()
        self._buffer.extend(msgs)
        self._schedule()

    async def close(self) -> None:
        """Write what is queued, then close the comm."""
        self._closing = True
        if self._flusher is not None:
            # wait() neither raises the flusher's outcome nor cancels it if we are cancelled.
            await asyncio.wait([self._flusher])
        await self.comm.close()

    def abort(self) -> None:
        """Drop what is queued and abort the comm."""
        self._closing = True
        self._buffer = []
        if self._flusher is not None:
            self._flusher.cancel()
        self.comm.abort()

    @property
    def closed(self) -> bool:
        return self._closing or self._error is not None or self.comm.closed

    def _check(self) -> None:
        if self._error is not None:
            raise CommClosedError(f"cannot send to {self.comm.peer_address}: {self._error}")
        if self._closing or self.comm.closed:
            raise CommClosedError(f"cannot send to {self.comm.peer_address}: comm is closed")

    def _schedule(self) -> None:
        # A running flusher picks up what was added while it writes.
        if self._flusher is None and self._buffer:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name=f"shoal-batched-send {self.comm.peer_address}"
            )

    async def _flush(self) -> None:
        try:
            while self._buffer:
                batch, self._buffer = self._buffer, []
                await self.comm.write(batch)
                self.batches_sent += 1
                self.messages_sent += len(batch)
        except Exception as exc:  # noqa: BLE001 - whatever broke the write, report it
            # What was in the batch is lost, so the stream is no longer whole: drop it.
            self._buffer = []
            self._error = exc
            self.comm.abort()
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            self._flusher = None
