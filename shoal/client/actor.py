"""Actors: stateful objects that live on one worker, called from anywhere through a handle.

``client.submit(Counter, actor=True)`` runs a task that makes a ``Counter`` on the worker
running it and keeps it there under the task's key (`ActorRegistry`); the task's result is
an `Actor` handle naming that worker. ``handle.incr(1)`` sends an `ActorCall` straight to
the worker's peer listener (the scheduler is not on the way) and returns an `ActorFuture`;
``handle.n`` reads an attribute (`ActorGetAttr`). On the worker each actor has one thread of
its own that runs its calls one at a time, in the order they arrived; calls from one handle
are sent in the order they were made, so they run in that order.

Lifetime: a handle holds a `Future` of the actor's key, so the actor lives while some
handle (or future) does; when the last goes, the scheduler frees the key and the worker
drops the instance. If the actor's worker is lost, calls fail with `ActorLostError` naming
the actor and the worker; the actor's state is gone with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

from ..exceptions import ActorLostError, RemoteTraceback
from ..protocol.messages import ACTOR_LOST_PREFIX, ActorCall, ActorGetAttr, Msg, Nthreads, Reply
from ..protocol.refs import collected_keys, resolve_ref
from ..protocol.serialize import deserialize, serialize
from ..comm.rpc import next_rid
from ..worker.context import current_context, get_client, seceded
from .future import receive, receiving_client

if TYPE_CHECKING:
    from .client import Client
    from .future import Future

__all__ = ["Actor", "ActorFactory", "ActorFuture", "ActorLostError"]

logger = logging.getLogger("shoal.actor")

_AnyFuture = Union["asyncio.Future[Any]", "concurrent.futures.Future[Any]"]

_LOST = ACTOR_LOST_PREFIX


# ------------------------------------------------------------------ the creating task


class ActorFactory:
    """The task that creates an actor: makes the instance on the worker running it, keeps it
    there under the task's key, and returns a handle naming that worker."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        #: the prefix of the creating task's key
        self.__name__ = getattr(cls, "__name__", "actor")

    def __call__(self, *args: Any, **kwargs: Any) -> Actor:
        ctx = current_context()
        if ctx is None or ctx.is_actor:
            raise RuntimeError(f"actor {self.__name__} must be created by a task on a worker:"
                               " use client.submit(cls, actor=True)")  # fmt: skip
        instance = self.cls(*args, **kwargs)
        ctx.worker.actors.add(ctx.key, instance)
        return Actor(self.cls, ctx.key, ctx.worker.address)

    def __repr__(self) -> str:
        return f"<ActorFactory {self.__name__}>"


_factories: weakref.WeakKeyDictionary[type, ActorFactory] = weakref.WeakKeyDictionary()


def actor_factory(cls: Any) -> ActorFactory:
    """The (cached) creating task for actor class ``cls``."""
    if not isinstance(cls, type):
        raise TypeError(f"actor=True needs a class, got {type(cls).__name__}")
    factory = _factories.get(cls)
    if factory is None:
        factory = _factories[cls] = ActorFactory(cls)
    return factory


# ------------------------------------------------------------------ the caller side


class _BaseError:
    """A method's exception that is not an `Exception`, carried to the caller's thread."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _raised(value: Any) -> Any:
    if isinstance(value, _BaseError):
        raise value.error
    return value


class ActorFuture:
    """The outcome of one actor call or attribute read, on its way.

    ``result(timeout)`` blocks (with a synchronous client; inside a task it gives the task's
    thread slot back meanwhile); with an asynchronous client ``await`` it, or its `result`.
    A method's exception is raised with its own type and message, and the worker's
    traceback as its ``__cause__``."""

    __slots__ = ("_fut", "_asynchronous", "_what")

    def __init__(self, fut: _AnyFuture, asynchronous: bool, what: str) -> None:
        self._fut = fut
        self._asynchronous = asynchronous
        self._what = what

    def done(self) -> bool:
        return self._fut.done()

    def result(self, timeout: float | None = None) -> Any:
        if self._asynchronous:
            return self._result_async(timeout)
        fut = self._fut
        if isinstance(fut, asyncio.Future):  # pragma: no cover - sync clients hand out these
            raise RuntimeError("this call was made on the client's event loop: await it")
        if not fut.done():
            with seceded():
                try:
                    return _raised(fut.result(timeout))
                except (TimeoutError, concurrent.futures.TimeoutError):
                    if fut.done():  # the method itself raised TimeoutError
                        raise
                    raise TimeoutError(f"{self._what} did not finish within {timeout}s") from None
        return _raised(fut.result())

    async def _result_async(self, timeout: float | None = None) -> Any:
        fut = self._fut
        afut = fut if isinstance(fut, asyncio.Future) else asyncio.wrap_future(fut)
        try:
            return _raised(await asyncio.wait_for(asyncio.shield(afut), timeout))
        except asyncio.TimeoutError:
            if afut.done():
                raise
            raise TimeoutError(f"{self._what} did not finish within {timeout}s") from None

    def __await__(self) -> Any:
        return self._result_async().__await__()

    def __repr__(self) -> str:
        return f"<ActorFuture {self._what}: {'done' if self.done() else 'pending'}>"


class Actor:
    """A handle to an actor: ``handle.method(*args)`` returns an `ActorFuture`, ``handle.attr``
    the attribute's value (an awaitable with an asynchronous client).

    The handle keeps the actor alive while it exists. It can be pickled (into tasks, queues,
    other clients); each copy holds the actor in the client of the process it lands in.
    """

    __slots__ = ("_cls", "_key", "_address", "_future", "_client", "_sent", "_lost",
                 "__weakref__")  # fmt: skip

    def __init__(self, cls: type, key: str, address: str | None = None,
                 future: Future | None = None, client: Client | None = None) -> None:  # fmt: skip
        self._cls = cls
        self._key = key
        #: the worker holding the actor; None until the creating task has finished
        self._address = address
        #: holds the actor's key in the cluster while this handle lives
        self._future = future
        self._client = client if client is not None else (future.client if future else None)
        #: done once the previous call from this handle was sent (calls go out in order)
        self._sent: asyncio.Future[None] | None = None
        self._lost: ActorLostError | None = None

    @property
    def key(self) -> str:
        return self._key

    # -- calls

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._cls, name, None)
        if callable(attr):
            return _ActorMethod(self, name)
        future = self._start(lambda rid: ActorGetAttr(rid, self._key, name), f"{self._name}.{name}")
        return future if future._asynchronous else future.result()

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ActorFuture:
        packed = serialize((args, kwargs), f"argument of {self._name}.{method}")
        return self._start(lambda rid: ActorCall(rid, self._key, method, packed),
                           f"{self._name}.{method}()")  # fmt: skip

    @property
    def _name(self) -> str:
        return getattr(self._cls, "__name__", "actor")

    def _bound_client(self) -> Client:
        if self._client is None or self._client.status != "running":
            self._client = get_client()
        return self._client

    def _start(self, make: Callable[[int], Msg], what: str) -> ActorFuture:
        client = self._bound_client()
        loop = client.loop
        assert loop is not None
        coro = self._request(client, make(next_rid()))
        if _on_loop(loop):
            return ActorFuture(loop.create_task(coro), True, what)
        return ActorFuture(asyncio.run_coroutine_threadsafe(coro, loop), client.asynchronous, what)

    async def _request(self, client: Client, msg: Msg) -> Any:
        """Send ``msg`` after the previous call of this handle was sent; return its answer.
        Runs on the client's loop."""
        previous, mine = self._sent, asyncio.get_running_loop().create_future()
        self._sent = mine
        address = self._address
        try:
            if previous is not None:
                await asyncio.shield(previous)
            if self._lost is not None:
                raise self._lost
            address = await self._resolve(client)
            peers = client._peers
            assert peers is not None
            if not peers.connected(address):
                # Connecting to a dead worker would retry for the whole connect timeout:
                # ask the scheduler, which knows at once when a worker has left.
                alive = await client._request(Nthreads(next_rid()))
                if address not in alive:
                    raise self._mark_lost(address, "the worker left the cluster")
            reply_future = await peers.start_request(address, msg)
        except OSError as exc:
            raise self._mark_lost(address, str(exc)) from exc
        finally:
            if not mine.done():
                mine.set_result(None)
        try:
            reply = await reply_future
        except OSError as exc:
            raise self._mark_lost(address, str(exc)) from exc
        return self._unpack(reply, address)

    async def _resolve(self, client: Client) -> str:
        """The actor's worker: known, or learnt from the creating task's result."""
        if self._address is not None:
            return self._address
        future = self._future
        if future is None:
            raise ActorLostError(f"actor {self._key!r} has no known worker")
        state = future._state
        if not state.done():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            state.add_async_waiter(waiter)
            await waiter
        if state.status != "finished":
            error = state.exception_object()
            assert error is not None
            raise error  # creating it failed: the constructor's exception
        values = await client._fetch_async([state])
        with _unbound():
            handle = deserialize(values[self._key])
        if not isinstance(handle, Actor) or handle._address is None:
            raise TypeError(f"{self._key!r} is not an actor (got {type(handle).__name__})")
        self._address = handle._address
        return self._address

    def _mark_lost(self, address: str | None, why: str) -> ActorLostError:
        if self._lost is None:
            self._lost = ActorLostError(
                f"actor {self._name} ({self._key!r}) is lost: its worker {address} is"
                f" unreachable or no longer holds it ({why})")  # fmt: skip
            # Let go of the key: a copy the scheduler may make elsewhere is not this actor.
            future, self._future = self._future, None
            if future is not None:
                future.release()
        return self._lost

    def _unpack(self, reply: Any, address: str) -> Any:
        if not isinstance(reply, Reply):
            raise RuntimeError(f"unexpected answer from {address}: {type(reply).__name__}")
        if reply.error:
            if reply.error.startswith(_LOST):
                raise self._mark_lost(address, reply.error[len(_LOST):])
            raise RuntimeError(reply.error)
        ok, *rest = reply.value
        if ok:
            return receive(self._bound_client(), rest[0])
        error: BaseException = deserialize(rest[0])
        try:
            error.__cause__ = RemoteTraceback(deserialize(rest[1]))
        except Exception:  # noqa: BLE001 - a traceback is a courtesy
            pass
        if not isinstance(error, Exception):
            # KeyboardInterrupt, SystemExit...: raised on the loop they would stop it; the
            # caller raises it instead (`ActorFuture.result`).
            return _BaseError(error)
        raise error

    # -- identity and pickling

    def __reduce__(self) -> tuple[Any, ...]:
        keys = collected_keys()
        if keys is not None and self._address is not None:
            # Inside task arguments: a dependency, so the actor lives until the task has run;
            # the worker passes its own copy of the handle.
            keys.append(self._key)
            return (resolve_ref, (self._key,))
        return (_rebuild_actor, (self._cls, self._key, self._address))

    def __repr__(self) -> str:
        where = self._address or "pending"
        return f"<Actor {self._name} key={self._key!r} on {where}>"

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Actor) and other._key == self._key

    def __dir__(self) -> list[str]:
        return sorted(set(dir(type(self))) | {n for n in dir(self._cls) if not n.startswith("_")})


class _ActorMethod:
    """``handle.method``: calling it sends the call."""

    __slots__ = ("_actor", "_name")

    def __init__(self, actor: Actor, name: str) -> None:
        self._actor = actor
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> ActorFuture:
        return self._actor._call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<actor method {self._actor._name}.{self._name}>"


# ------------------------------------------------------------------ unpickling handles

_local = threading.local()


@contextmanager
def _unbound() -> Iterator[None]:
    """While unpickling inside this block, handles hold nothing (a transient copy)."""
    _local.unbound = getattr(_local, "unbound", 0) + 1
    try:
        yield
    finally:
        _local.unbound -= 1


def _rebuild_actor(cls: type, key: str, address: str | None) -> Actor:
    """A handle arriving in this process: it holds the actor in this process's client."""
    if getattr(_local, "unbound", 0):
        return Actor(cls, key, address)
    client = receiving_client()
    if client is None:
        try:
            client = get_client()
        except (ValueError, RuntimeError):  # no client here (yet): bind on first use
            return Actor(cls, key, address)
    return Actor(cls, key, address, client._future_on_arrival(key), client)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
