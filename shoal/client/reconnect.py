"""A client that lost its scheduler connects again by itself (issue #16).

With ``Client(..., reconnect_timeout=T)``, losing the scheduler no longer fails the futures
at once: the client tries the same address again with backoff for up to T seconds. Messages
made meanwhile are held back. Once connected, it re-attaches: it submits again the recipe of
every key it holds (with the same generations), so that a scheduler restarted from its
journal, which knows the tasks, takes it as a new hold, and one that lost the last
submissions (the journal's last fsync interval) learns them again. Then the held-back
messages go out and the pending futures complete from the new connection's reports. Only
past T do the futures fail with `SchedulerGoneError`.

To resubmit, the client keeps the spec of each key it submitted while a hold on it (or on
a key that depends on it) lives; scattered data is only re-wanted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..comm.batched import BatchedSend
from ..comm.registry import connect
from ..protocol.messages import PROTOCOL_VERSION, Hello, Msg, SubmitTasks, TaskSpec, WantKeys

if TYPE_CHECKING:
    from .client import Client

logger = logging.getLogger("shoal.client")

#: Backoff between attempts: from the first to the last, doubling.
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 0.5


class Reconnector:
    """The client's memory for reconnecting: specs of held keys, messages held back."""

    def __init__(self, client: Client, timeout: float) -> None:
        if not timeout >= 0:
            raise ValueError(f"reconnect_timeout must be >= 0 seconds, not {timeout!r}")
        self.client = client
        self.timeout = timeout
        #: key -> the spec it was submitted with (pruned to what holds still need)
        self.specs: dict[str, TaskSpec] = {}
        self._prune_at = 10_000
        #: messages made while disconnected (None: connected)
        self.held_back: list[Msg] | None = None
        self.reconnects = 0

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    @property
    def disconnected(self) -> bool:
        return self.held_back is not None

    def sent(self, msg: Msg) -> None:
        """Remember the specs of a submission (on the loop)."""
        if isinstance(msg, SubmitTasks):
            for spec in msg.tasks:
                self.specs[spec.key] = spec
            if len(self.specs) > self._prune_at:
                self._prune()

    def _needed_specs(self) -> list[TaskSpec]:
        """The specs of held keys and of everything they depend on, inputs first."""
        with self.client._lock:
            held = list(self.client._states)
        specs = self.specs
        order: list[TaskSpec] = []
        seen: set[str] = set()
        stack = [k for k in held if k in specs]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            spec = specs[key]
            order.append(spec)
            stack.extend(d for d in spec.dependencies if d in specs and d not in seen)
        order.reverse()  # one SubmitTasks links them in any order; inputs first reads better
        return order

    def _prune(self) -> None:
        needed = self._needed_specs()
        self.specs = {s.key: s for s in needed}
        self._prune_at = max(10_000, 2 * len(self.specs))

    def lost(self, reason: str) -> None:
        """The connection ended (on the loop): hold messages back and start reconnecting."""
        if self.held_back is not None:
            return
        self.held_back = []
        client = self.client
        # Requests in flight will not be answered on the old connection.
        for fut in client._replies.values():
            if not fut.done():
                from ..exceptions import FutureLostError

                fut.set_exception(FutureLostError(f"{reason} (reconnecting)"))
        logger.warning("client %s: %s; reconnecting for up to %ss", client.name, reason,
                       self.timeout)  # fmt: skip
        client._reconnect_task = asyncio.ensure_future(self.run(reason))

    async def run(self, reason: str) -> None:
        client = self.client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = FIRST_DELAY_S
        hello = Hello(PROTOCOL_VERSION, "client", client.name, client.token, 0)
        while client.status == "running":
            left = deadline - loop.time()
            try:
                comm = await connect(client.scheduler_address, hello,
                                     timeout=max(0.05, min(client.timeout, left)),
                                     security=client.security, server_role="scheduler")  # fmt: skip
                break
            except (OSError, asyncio.TimeoutError) as exc:
                if loop.time() + delay >= deadline:
                    self.held_back = None
                    client._fail_pending("scheduler-gone", f"{reason}; it did not come back"
                                         f" within reconnect_timeout={self.timeout}s ({exc})")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
        else:
            return
        client._comm = comm
        client._send_batch = BatchedSend(comm)
        self._reattach(client._send_batch)
        held_back, self.held_back = self.held_back or [], None
        for msg in held_back:
            client._write(msg)
        client._reader = asyncio.ensure_future(client._read_scheduler(comm))
        self.reconnects += 1
        logger.warning("client %s: reconnected to %s", client.name, client.scheduler_address)

    def _reattach(self, send: BatchedSend) -> None:
        """Hold again every key held, at the same generations."""
        client = self.client
        with client._lock:
            generations = {k: st.generation for k, st in client._states.items()}
        specs = self._needed_specs()
        submitted = [s.key for s in specs if s.key in generations]
        if specs:
            send.send(SubmitTasks(specs, submitted, stimulus_id="reconnect",
                                  generations=[generations[k] for k in submitted]))  # fmt: skip
        others = [k for k in generations if k not in self.specs]
        if others:  # scattered data, or keys another client submitted
            send.send(WantKeys(others, [generations[k] for k in others]))
