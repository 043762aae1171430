"""The scheduler's side of coordination and datasets: `Extension`s over the plain state.

They run on the scheduler's loop. A request becomes a call on `CoordinationState` or
`DatasetState`; the effects it returns become replies, key holds and topic messages here.
Deadlines are timers on the loop (``call_later``): when one fires, the waiter gets its
timeout answer. A client that leaves loses its waiters, leases and subscriptions.

Nothing here unpickles: user values are `Serialized` carried through as they came.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..comm.batched import BatchedSend
from ..core.scheduler_events import ClientDisconnected
from ..protocol.messages import (
    DatasetGet,
    DatasetList,
    DatasetPublish,
    DatasetUnpublish,
    EventSet,
    EventWait,
    LeaseAcquire,
    LeaseCount,
    LeaseRelease,
    Msg,
    Publish,
    QueueGet,
    QueuePut,
    QueueSize,
    Reply,
    StopWaiting,
    Subscribe,
    TopicMessage,
    Unsubscribe,
    VariableDelete,
    VariableGet,
    VariableSet,
)
from ..protocol.serialize import Serialized
from ..scheduler import Extension
from .state import (
    Answer,
    CoordinationState,
    DatasetState,
    Deliver,
    DropKey,
    Effect,
    GiveKey,
    HoldKey,
    Item,
    Waiter,
)

if TYPE_CHECKING:
    from ..scheduler import Scheduler

logger = logging.getLogger("shoal.coordination")


class KeyHolds:
    """Counts holds per (holder, key), so the scheduler sees one want per holder and key
    (a key put twice in a queue stays held until both copies are taken)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        #: holder -> key -> count
        self.counts: dict[str, dict[str, int]] = {}

    def hold(self, holder: str, key: str) -> None:
        keys = self.counts.setdefault(holder, {})
        keys[key] = keys.get(key, 0) + 1
        if keys[key] == 1:
            self.scheduler.hold_keys(holder, [key])

    def drop(self, holder: str, key: str) -> None:
        keys = self.counts.get(holder)
        if keys is None or key not in keys:
            return
        keys[key] -= 1
        if keys[key] > 0:
            return
        del keys[key]
        self.scheduler.release_keys(holder, [key])
        if not keys:
            del self.counts[holder]
            # The scheduler keeps an entry per holder like one per client: forget the empty
            # one, or every short-lived queue name would leave one behind.
            self.scheduler._handle([ClientDisconnected(f"unhold-{holder}", holder)])


class _Base(Extension):
    """Replies, key holds and error handling shared by the coordination extensions."""

    def __init__(self, scheduler: Scheduler, holds: KeyHolds) -> None:
        super().__init__(scheduler)
        self.holds = holds
        #: the connection of every client that sent us something and has not left
        self.sends: dict[str, BatchedSend] = {}

    def handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        self.sends[client] = send
        try:
            self._handle(client, msg, send)
        except Exception as exc:  # a bad request fails itself, not the client's connection
            logger.exception("%s from %s failed", type(msg).__name__, client)
            rid = getattr(msg, "rid", None)
            if isinstance(rid, int):
                send.send(Reply(rid, error=f"RuntimeError: {type(exc).__name__}: {exc}"))

    def _handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        raise NotImplementedError

    def client_left(self, client: str) -> None:
        self.sends.pop(client, None)

    def _apply(self, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, Answer):
                self._answer(eff)
            elif isinstance(eff, HoldKey):
                self.holds.hold(eff.holder, eff.key)
            elif isinstance(eff, DropKey):
                self.holds.drop(eff.holder, eff.key)
            elif isinstance(eff, GiveKey):
                if eff.client in self.sends:  # only to a client still here
                    self.scheduler.hold_keys(eff.client, [eff.key])
            elif isinstance(eff, Deliver):
                self._to(eff.client, TopicMessage(eff.topic, eff.payload))

    def _answer(self, answer: Answer) -> None:
        self._to(answer.waiter.client, Reply(answer.waiter.rid, answer.value, answer.error))

    def _to(self, client: str, msg: Msg) -> None:
        send = self.sends.get(client)
        if send is not None and not send.closed:
            send.send(msg)


#: requests that may wait, each under its ``Waiter(client, rid)``
_WAITS = (LeaseAcquire, EventWait, QueuePut, QueueGet, VariableGet)


class CoordinationExtension(_Base):
    """Locks, semaphores, events, queues, variables and topics (see `CoordinationState`)."""

    handles = (LeaseAcquire, LeaseRelease, LeaseCount, EventSet, EventWait, QueuePut, QueueGet,
               QueueSize, VariableSet, VariableGet, VariableDelete, StopWaiting, Subscribe,
               Unsubscribe, Publish)  # fmt: skip

    def __init__(self, scheduler: Scheduler, holds: KeyHolds) -> None:
        super().__init__(scheduler, holds)
        self.state = CoordinationState()
        #: deadlines of waiters that have one
        self.timers: dict[Waiter, asyncio.TimerHandle] = {}

    def _handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        if isinstance(msg, _WAITS) and Waiter(client, msg.rid) in self.state.waiting:
            # A second wait under one id would leave the first one half-registered: a later
            # answer to it failed with KeyError, and other clients' waiters went unanswered.
            raise ValueError(f"request id {msg.rid} is already waiting (ids must be unique)")
        if isinstance(msg, LeaseAcquire):
            waiter = Waiter(client, msg.rid)
            self._wait(waiter, self.state.acquire(waiter, msg.kind, msg.name, msg.lease,
                                                  msg.max_leases), msg.timeout)  # fmt: skip
        elif isinstance(msg, LeaseRelease):
            held, effects = self.state.release(msg.kind, msg.name, msg.lease)
            self._apply(effects)
            send.send(Reply(msg.rid, held))
        elif isinstance(msg, LeaseCount):
            send.send(Reply(msg.rid, self.state.leases_held(msg.kind, msg.name)))
        elif isinstance(msg, EventSet):
            if msg.value:
                self._apply(self.state.set_event(msg.name))
            else:
                self.state.clear_event(msg.name)
            send.send(Reply(msg.rid, None))
        elif isinstance(msg, EventWait):
            waiter = Waiter(client, msg.rid)
            self._wait(waiter, self.state.wait_event(waiter, msg.name), msg.timeout)
        elif isinstance(msg, QueuePut):
            waiter = Waiter(client, msg.rid)
            item = _item(msg.value, msg.key)
            self._wait(waiter, self.state.put(waiter, msg.name, item, msg.maxsize), msg.timeout)
        elif isinstance(msg, QueueGet):
            waiter = Waiter(client, msg.rid)
            self._wait(waiter, self.state.get(waiter, msg.name, msg.batch), msg.timeout)
        elif isinstance(msg, QueueSize):
            send.send(Reply(msg.rid, self.state.qsize(msg.name)))
        elif isinstance(msg, VariableSet):
            self._apply(self.state.set_variable(msg.name, _item(msg.value, msg.key)))
            send.send(Reply(msg.rid, None))
        elif isinstance(msg, VariableGet):
            waiter = Waiter(client, msg.rid)
            self._wait(waiter, self.state.get_variable(waiter, msg.name), msg.timeout)
        elif isinstance(msg, VariableDelete):
            self._apply(self.state.delete_variable(msg.name))
            send.send(Reply(msg.rid, None))
        elif isinstance(msg, StopWaiting):
            waiter = Waiter(client, msg.rid)
            self._cancel_timer(waiter)
            self._apply(self.state.forget(waiter))
        elif isinstance(msg, Subscribe):
            self.state.subscribe(client, msg.topic)
            send.send(Reply(msg.rid, None))
        elif isinstance(msg, Unsubscribe):
            self.state.unsubscribe(client, msg.topic)
        elif isinstance(msg, Publish):
            self._apply(self.state.publish(msg.topic, msg.payload))

    def _wait(self, waiter: Waiter, effects: list[Effect], timeout: float | None) -> None:
        """Carry out a blocking request's effects; if it still waits, give it its deadline."""
        self._apply(effects)
        if waiter not in self.state.waiting or timeout is None:
            return
        if not timeout > 0:  # NaN too: the event loop refuses it as a delay
            self._apply(self.state.expire(waiter))
        else:
            loop = asyncio.get_running_loop()
            self.timers[waiter] = loop.call_later(timeout, self._expire, waiter)

    def _expire(self, waiter: Waiter) -> None:
        self.timers.pop(waiter, None)
        self._apply(self.state.expire(waiter))

    def _cancel_timer(self, waiter: Waiter) -> None:
        timer = self.timers.pop(waiter, None)
        if timer is not None:
            timer.cancel()

    def _answer(self, answer: Answer) -> None:
        self._cancel_timer(answer.waiter)
        super()._answer(answer)

    def client_left(self, client: str) -> None:
        if client not in self.sends:
            return  # it never asked us for anything, so it holds and awaits nothing here
        for waiter in [w for w in self.timers if w.client == client]:
            self._cancel_timer(waiter)
        super().client_left(client)
        self._apply(self.state.client_left(client))

    async def close(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()


class DatasetExtension(_Base):
    """Named datasets (see `DatasetState`); their keys outlive the clients that published."""

    handles = (DatasetPublish, DatasetGet, DatasetList, DatasetUnpublish)

    def __init__(self, scheduler: Scheduler, holds: KeyHolds) -> None:
        super().__init__(scheduler, holds)
        self.state = DatasetState()

    def _handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        if isinstance(msg, DatasetPublish):
            error, effects = self.state.publish(msg.datasets, msg.scattered, msg.override,
                                                 msg.inner)
            self._apply(effects)
            send.send(Reply(msg.rid, None, error))
        elif isinstance(msg, DatasetGet):
            dataset, effects = self.state.get(client, msg.name)
            self._apply(effects)
            send.send(Reply(msg.rid, None if dataset is None else [dataset.key, dataset.scattered]))
        elif isinstance(msg, DatasetList):
            send.send(Reply(msg.rid, self.state.names()))
        elif isinstance(msg, DatasetUnpublish):
            found, effects = self.state.unpublish(msg.name)
            self._apply(effects)
            send.send(Reply(msg.rid, None, None if found else
                            f"KeyError: no dataset named {msg.name!r}"))  # fmt: skip


def _item(value: Serialized | None, key: str | None) -> Item:
    if key is None and value is None:
        raise ValueError("a queue or variable item needs a value or a key")
    return Item(None if key is not None else value, key)


def coordination_extensions(scheduler: Scheduler) -> list[Extension]:
    """The extensions every scheduler hosts: coordination primitives and datasets."""
    holds = KeyHolds(scheduler)
    return [CoordinationExtension(scheduler, holds), DatasetExtension(scheduler, holds)]
