"""Cluster-wide coordination primitives, usable from clients and from tasks.

Each object names state kept by the scheduler (`shoal.coordination.service`); two objects
with the same name, in any process, are the same lock, queue or event. With a synchronous
client each method blocks and returns its result; with an asynchronous one it returns an
awaitable. ``client=None`` means the current client (inside a task: the one its worker
provides), looked up on first use, so the objects can be pickled into tasks by name.

Every blocking call takes ``timeout`` (seconds; None waits for ever). The scheduler keeps the
deadline and answers when it passes, so a call never hangs much beyond it; a wait of any
length ends (``FutureLostError``) when its client closes. A task that must wait gives its
thread slot back meanwhile, as `Future.result` does (see `_Named._wait`), so the task that
would end the wait (a `Queue.put` queued behind a `Queue.get`) can run on that slot.
Leases (`Lock`, `Semaphore`) are held by the client's connection and given back when it
closes or its process dies.

Queues and variables carry plain objects as pickled bytes the scheduler never opens, or
futures, whose keys the scheduler keeps alive until they are taken (`get` returns a
`Future` then).
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from ..client.future import Future, receive
from ..comm.rpc import next_rid
from ..protocol.messages import (
    EventSet,
    EventWait,
    LeaseAcquire,
    LeaseCount,
    LeaseRelease,
    Publish,
    QueueGet,
    QueuePut,
    QueueSize,
    Subscribe,
    TopicMessage,
    Unsubscribe,
    VariableDelete,
    VariableGet,
    VariableSet,
)
from ..protocol.serialize import Serialized, serialize
from ..worker.context import current_context, seceded
from .requests import check_running, done_awaitable, register_wait, request, send

if TYPE_CHECKING:
    from ..client.client import Client

__all__ = ["Event", "Lock", "Pub", "Queue", "Semaphore", "Sub", "Variable"]


def _current_client() -> Client:
    """The client a primitive made without one uses: inside a task (or an actor), the one
    its worker provides; elsewhere the default client."""
    from ..worker.context import get_client

    return get_client()


class _Named:
    """A named handle on scheduler state, bound to a client on first use."""

    def __init__(self, name: str | None, client: Client | None) -> None:
        self.name = name if name is not None else uuid.uuid4().hex
        self._client = client

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = _current_client()
        return self._client

    def _run(self, coro: Any) -> Any:
        """Block on ``coro`` (synchronous client) or hand it back to be awaited."""
        client = self.client
        if client.status != "running":
            coro.close()
            check_running(client)
        return client._sync(coro)

    def _wait(
        self,
        attempt: Callable[[float | None], Coroutine[Any, Any, Any]],
        timeout: float | None,
        missed: Callable[[Any], bool] = lambda _: False,
    ) -> Any:
        """Run ``attempt(timeout)``, a request that may have to wait, like `_run`.

        In a task holding a thread slot (with a synchronous client), first try without
        waiting (``attempt(0)``; it missed if it raised ``TimeoutError`` or ``missed`` says so);
        only if that missed, give the slot back for the real wait and take one again after
        it. Without this, a task queued behind the waiter on the same worker, maybe the one
        that would end the wait, could not start. The deadline counts from the first try.
        """
        if self.client.asynchronous or (timeout is not None and timeout <= 0) or not _in_slot():
            return self._run(attempt(timeout))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            result = self._run(attempt(0))
        except TimeoutError:
            pass
        else:
            if not missed(result):
                return result
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        with seceded():
            return self._run(attempt(remaining))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _in_slot() -> bool:
    """Whether this thread runs a task that holds one of its worker's thread slots."""
    ctx = current_context()
    return ctx is not None and not ctx.is_actor and not ctx.seceded


def _refused(granted: Any) -> bool:
    return granted is False


# ------------------------------------------------------------------------- leases


class _Leases(_Named):
    """What `Lock` and `Semaphore` share: leases taken by `_acquire`, held by this object
    (and by its client's connection) until `release`."""

    _kind = "semaphore"

    def __init__(self, max_leases: int, name: str | None, client: Client | None) -> None:
        if max_leases < 1:
            raise ValueError(f"max_leases must be >= 1, not {max_leases}")
        super().__init__(name, client)
        self.max_leases = max_leases
        #: leases this object holds, oldest first (changed on the client's loop only)
        self._leases: list[str] = []

    async def _acquire(self, timeout: float | None) -> bool:
        client = self.client
        lease = uuid.uuid4().hex
        msg = LeaseAcquire(next_rid(), self._kind, self.name, lease, self.max_leases, timeout)
        try:
            granted = bool(await request(client, msg, timeout))
        except asyncio.CancelledError:
            # The grant may be on its way: give the lease back (or withdraw the request).
            client._send_now(LeaseRelease(next_rid(), self._kind, self.name, lease))
            raise
        except TimeoutError:  # the scheduler did not answer, even well after the deadline
            client._send_now(LeaseRelease(next_rid(), self._kind, self.name, lease))
            return False
        if granted:
            self._leases.append(lease)
        return granted

    def release(self) -> Any:
        """Give back the oldest lease this object holds."""
        return self._run(self._release())

    async def _release(self) -> bool:
        if not self._leases:
            raise self._not_held()
        lease = self._leases.pop(0)
        return bool(await request(self.client, LeaseRelease(next_rid(), self._kind, self.name,
                                                            lease)))  # fmt: skip

    def _not_held(self) -> Exception:
        return RuntimeError(f"{self!r} released more often than acquired")

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class Semaphore(_Leases):
    """At most ``max_leases`` holders at a time, cluster-wide.

    Each `acquire` takes one lease, which this object holds until `release` (``RuntimeError``
    if it holds none); a lease is given back when its client's connection closes (the client
    closed, or its process died), so a dead holder cannot block everyone else for ever.
    Every user of one name must agree on ``max_leases`` (``ValueError`` otherwise).
    """

    def __init__(self, max_leases: int = 1, name: str | None = None,
                 client: Client | None = None) -> None:  # fmt: skip
        super().__init__(max_leases, name, client)

    def acquire(self, timeout: float | None = None) -> Any:
        """Take a lease, waiting up to ``timeout`` seconds; returns whether it was granted."""
        return self._wait(self._acquire, timeout, _refused)

    def get_value(self) -> Any:
        """How many leases are held now, by anyone."""
        return self._run(request(self.client, LeaseCount(next_rid(), self._kind, self.name)))

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    async def __aenter__(self) -> Semaphore:
        await self.acquire()
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Into a task goes the name: the copy has no leases, and binds to the task's client.
        return (type(self), (self.max_leases, self.name))

    def __repr__(self) -> str:
        return f"<Semaphore {self.name!r} max_leases={self.max_leases}>"


class Lock(_Leases):
    """A cluster-wide mutual-exclusion lock (one lease; named apart from semaphores).

    Not reentrant. `release` gives back what this object acquired (``ValueError`` if it
    holds nothing), and `locked` says whether this object holds the lock. Held by the
    client's connection: released if the holder's client closes or its process dies.
    """

    _kind = "lock"

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        super().__init__(1, name, client)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> Any:
        """Take the lock, waiting up to ``timeout`` (not at all unless ``blocking``);
        returns whether it was taken."""
        if not blocking:
            if timeout is not None:
                raise ValueError("a non-blocking acquire takes no timeout")
            timeout = 0
        return self._wait(self._acquire, timeout, _refused)

    def _not_held(self) -> Exception:
        return ValueError(f"{self!r} is not held by this Lock object")

    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return bool(self._leases)

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name,))

    def __repr__(self) -> str:
        return f"<Lock {self.name!r}>"


# ------------------------------------------------------------------------- events


class Event(_Named):
    """A cluster-wide flag that tasks and clients can wait for (like `threading.Event`)."""

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        super().__init__(name, client)

    def set(self) -> Any:
        """Set the flag; every waiter wakes."""
        return self._run(request(self.client, EventSet(next_rid(), self.name, True)))

    def clear(self) -> Any:
        return self._run(request(self.client, EventSet(next_rid(), self.name, False)))

    def is_set(self) -> Any:
        return self._run(request(self.client, EventWait(next_rid(), self.name, 0)))

    def wait(self, timeout: float | None = None) -> Any:
        """Wait until the flag is set; returns False if ``timeout`` passed first."""
        return self._wait(self._wait_set, timeout, _refused)

    async def _wait_set(self, timeout: float | None) -> bool:
        return bool(await request(self.client, EventWait(next_rid(), self.name, timeout),
                                  timeout))  # fmt: skip

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name,))


# ------------------------------------------------------------- queues and variables


def _pack(value: Any, what: str) -> tuple[Serialized | None, str | None]:
    if isinstance(value, Future):
        return None, value.key
    return serialize(value, what), None


def _unpack(client: Client, wire: list[Any]) -> Any:
    """An item as the scheduler sent it: a value, or a future (for a key it made us want)."""
    value, key = wire
    if key is None:
        return receive(client, value)
    return client._future_on_arrival(key)  # the scheduler made us want it: hold it here


class Queue(_Named):
    """A cluster-wide FIFO queue of plain objects and futures. ``maxsize`` > 0 bounds it
    (`put` then waits for room); the first user of a name sets it."""

    def __init__(self, name: str | None = None, maxsize: int = 0,
                 client: Client | None = None) -> None:  # fmt: skip
        super().__init__(name, client)
        self.maxsize = maxsize

    def put(self, value: Any, timeout: float | None = None) -> Any:
        """Append ``value`` (a future's key is kept alive while it is queued); waits up to
        ``timeout`` for room in a bounded queue, then raises ``TimeoutError``."""
        item, key = _pack(value, f"item for queue {self.name!r}")
        return self._wait(lambda t: self._put(item, key, value, t), timeout)

    async def _put(self, item: Serialized | None, key: str | None, value: Any,
                   timeout: float | None) -> None:  # fmt: skip
        # ``value`` (a future) stays referenced until the scheduler holds its key.
        msg = QueuePut(next_rid(), self.name, item, key, self.maxsize, timeout)
        await request(self.client, msg, timeout)
        del value

    def get(self, timeout: float | None = None, batch: bool | int = False) -> Any:
        """Take the oldest item, waiting up to ``timeout`` (then ``TimeoutError``).
        ``batch=True``: every item there now, as a list (maybe empty, no waiting);
        ``batch=n``: a list of n items, waiting until there are n."""
        if batch is True:
            count = -1
        elif batch is False:
            count = 0
        elif isinstance(batch, int) and batch > 0:
            count = batch
        else:
            raise ValueError(f"batch must be True, False or a positive int, not {batch!r}")
        if count < 0:  # takes what is there, never waits
            return self._run(self._get(count, timeout))
        return self._wait(lambda t: self._get(count, t), timeout)

    async def _get(self, batch: int, timeout: float | None) -> Any:
        client = self.client
        wire = await request(client, QueueGet(next_rid(), self.name, batch, timeout), timeout)
        if batch:
            return [_unpack(client, w) for w in wire]
        return _unpack(client, wire)

    def qsize(self) -> Any:
        """How many items are in the queue now."""
        return self._run(request(self.client, QueueSize(next_rid(), self.name)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.maxsize))


class Variable(_Named):
    """A cluster-wide variable holding a plain object or a future (kept alive while set)."""

    def __init__(self, name: str | None = None, client: Client | None = None) -> None:
        super().__init__(name, client)

    def set(self, value: Any) -> Any:
        item, key = _pack(value, f"value for variable {self.name!r}")
        return self._run(self._set(item, key, value))

    async def _set(self, item: Serialized | None, key: str | None, value: Any) -> None:
        await request(self.client, VariableSet(next_rid(), self.name, item, key))
        del value  # a future stays referenced until the scheduler holds its key

    def get(self, timeout: float | None = None) -> Any:
        """The value (a `Future` if a future was set); waits up to ``timeout`` for a value
        to be set, then raises ``TimeoutError``."""
        return self._wait(self._get, timeout)

    async def _get(self, timeout: float | None) -> Any:
        client = self.client
        wire = await request(client, VariableGet(next_rid(), self.name, timeout), timeout)
        return _unpack(client, wire)

    def delete(self) -> Any:
        """Unset the variable (releasing a future it held)."""
        return self._run(request(self.client, VariableDelete(next_rid(), self.name)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name,))


# ------------------------------------------------------------------ publish/subscribe


class Pub(_Named):
    """Publishes messages on ``topic`` to the subscribers there at the time (`Sub`).

    `put` does not wait (with an asynchronous client it returns something already done,
    which may be awaited). Messages from one publisher arrive in the order they were put.
    """

    def __init__(self, topic: str, client: Client | None = None) -> None:
        super().__init__(topic, client)

    @property
    def topic(self) -> str:
        return self.name

    def put(self, msg: Any) -> Any:
        payload = serialize(msg, f"message for topic {self.topic!r}")
        client = self.client
        send(client, Publish(self.topic, payload))
        return done_awaitable(client)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.topic,))


class _Router:
    """Hands a client's topic messages to its `Sub` objects (on the client's loop)."""

    def __init__(self) -> None:
        #: topic -> the live subscribers here (a forgotten `Sub` unsubscribes as it goes)
        self.subs: dict[str, weakref.WeakValueDictionary[int, Sub]] = {}

    def __call__(self, msg: TopicMessage) -> None:
        subs = self.subs.get(msg.topic)
        for sub in list(subs.values()) if subs is not None else ():
            sub._deliver(msg.payload)


def _router(client: Client) -> _Router:
    handler = client._message_handlers.get(TopicMessage)
    if not isinstance(handler, _Router):
        handler = _Router()
        client._message_handlers[TopicMessage] = handler
    return handler


class Sub(_Named):
    """Receives the messages published on ``topic`` after it subscribed.

    With a synchronous client the subscription is in place when the constructor returns;
    with an asynchronous one, ``await Sub(topic)`` to be sure of that. Iterate (``for`` or
    ``async for``) or call `get`. Messages wait here until taken; `close` unsubscribes.
    """

    def __init__(self, topic: str, client: Client | None = None) -> None:
        super().__init__(topic, client)
        self._buffer: deque[Serialized] = deque()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closed = False
        client_ = self.client
        coro = self._subscribe()
        if client_.asynchronous:
            self._subscribed: asyncio.Future[None] | None = asyncio.ensure_future(coro)
            self._subscribed.add_done_callback(_retrieve)
        else:
            self._subscribed = None
            self._run(coro)

    @property
    def topic(self) -> str:
        return self.name

    async def _subscribe(self) -> None:
        client = self.client
        subs = _router(client).subs.setdefault(self.topic, weakref.WeakValueDictionary())
        subs[id(self)] = self
        await request(client, Subscribe(next_rid(), self.topic))

    def __await__(self) -> Any:
        async def ready() -> Sub:
            if self._subscribed is not None:
                await self._subscribed
            return self

        return ready().__await__()

    def _deliver(self, payload: Serialized) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(payload)
                return
        self._buffer.append(payload)

    def get(self, timeout: float | None = None) -> Any:
        """The next message, waiting up to ``timeout`` for one (then ``TimeoutError``).
        A task that must wait gives its thread slot back meanwhile."""
        must_wait = not self._buffer and (timeout is None or timeout > 0)
        if must_wait and not self.client.asynchronous and _in_slot():
            with seceded():
                return self._run(self._get(timeout))
        return self._run(self._get(timeout))

    async def _get(self, timeout: float | None) -> Any:
        if self._buffer:
            return receive(self.client, self._buffer.popleft())
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        client = self.client
        rid, fut = register_wait(client)  # failed by the client if it closes first
        self._waiters.append(fut)
        try:
            payload = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message on topic {self.topic!r} within {timeout}s") from None
        finally:
            client._replies.pop(rid, None)
        return receive(client, payload)

    def close(self) -> None:
        """Unsubscribe; messages already here can still be taken."""
        if self._closed or self._client is None:
            return
        self._closed = True
        client = self._client
        client._call_soon(self._unsubscribe, client)

    def _unsubscribe(self, client: Client) -> None:
        subs = _router(client).subs.get(self.topic)
        if subs is not None:
            subs.pop(id(self), None)
            if not subs:
                _router(client).subs.pop(self.topic, None)
        client._send_now(Unsubscribe(self.topic))
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError(f"{self!r} was closed"))

    def __del__(self) -> None:
        try:
            client = self._client
            if not self._closed and client is not None and client.status == "running":
                client._send(Unsubscribe(self.topic))
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.get()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            yield await self.get()

    def __enter__(self) -> Sub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.topic,))


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # an unawaited subscription's failure is seen when it is awaited
