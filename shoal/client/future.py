"""Futures: handles to results that live in the cluster, and ways to wait on many.

A `Future` is a handle; many handles to one key share one `FutureState`, updated only on the
client's event loop. While any handle to a key is alive the client holds the key on the
scheduler; when the last one goes, the key is released.

Each hold has a generation: a key released (or cancelled) and then submitted again gets a new
`FutureState` with a new generation, and the scheduler's reports carry the generation they
answer, so a late report about the old hold never lands on the new one.

A handle's finalizer takes no lock and waits on nothing (the garbage collector may run it on
any thread, even one holding the client's lock): it queues its state, and the client's loop
counts the release (`Client._drain_releases`).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ..exceptions import FAILURE_KINDS, CancelledError, RemoteTraceback
from ..protocol.refs import collected_keys, resolve_ref
from ..protocol.serialize import Serialized, deserialize
from ..worker.context import seceded, wait_event

if TYPE_CHECKING:
    from .client import Client

Status = Literal["pending", "finished", "error", "cancelled", "lost"]

#: guards the lazy creation of `FutureState.event` (held for an instant, never by a finalizer)
_EVENT_LOCK = threading.Lock()
#: one tuple per distinct holder list (most keys have one holder, of a few workers): a
#: million finished states share a handful of tuples instead of a list each
_HOLDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
_HOLDERS_MAX = 4096


def _shared_holders(workers: list[str]) -> tuple[str, ...]:
    holders = tuple(workers)
    shared = _HOLDERS.get(holders)
    if shared is None:
        if len(_HOLDERS) >= _HOLDERS_MAX:
            _HOLDERS.clear()  # many replicas across many workers: sharing stops paying
        shared = _HOLDERS[holders] = tuple(sys.intern(w) for w in holders)
    return shared


class FutureState:
    """What the client knows of one key. Changed only on the client's loop thread."""

    __slots__ = ("key", "generation", "refs", "status", "workers", "nbytes", "typename",
                 "failure", "_event", "callbacks", "warnings", "async_waiters")  # fmt: skip

    def __init__(self, key: str, generation: int = 0) -> None:
        self.key = key
        #: which hold of the client on ``key`` this is (reports for other holds are dropped)
        self.generation = generation
        #: live handles (`Future` objects) on this state; changed under the client's lock
        self.refs = 0
        self.status: Status = "pending"
        #: holders as last reported (a tuple shared by every state with the same holders)
        self.workers: tuple[str, ...] = ()
        self.nbytes = 0
        self.typename = ""
        #: (kind, text, exception, traceback) once erred, lost or cancelled
        self.failure: tuple[str, str, Serialized | None, Serialized | None] | None = None
        #: made on first use by a waiting thread: most states are never waited on alone
        self._event: threading.Event | None = None
        #: called with the state on the loop thread when the key is done (internal use);
        #: None until the first (most states never get one: no empty list each)
        self.callbacks: list[Callable[[FutureState], None]] | None = None
        self.warnings: Serialized | None = None
        self.async_waiters: list[asyncio.Future[None]] | None = None

    def done(self) -> bool:
        return self.status != "pending"

    @property
    def event(self) -> threading.Event:
        """Set while the key is done (for threads that wait on it)."""
        event = self._event
        if event is None:
            with _EVENT_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
            # After publishing it: `_set` changes the status before it reads ``_event``, so
            # one of the two sees the other's write and the event cannot stay clear.
            if self.status != "pending":
                event.set()
        return event

    def add_callback(self, fn: Callable[[FutureState], None]) -> None:
        """Run ``fn(self)`` when done (loop thread only, like every change here)."""
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(fn)

    def add_async_waiter(self, waiter: asyncio.Future[None]) -> None:
        """Resolve ``waiter`` when done (loop thread only)."""
        if self.async_waiters is None:
            self.async_waiters = []
        self.async_waiters.append(waiter)

    def finish(self, workers: list[str], nbytes: int, typename: str,
               warnings_: Serialized | None) -> None:  # fmt: skip
        self.workers = _shared_holders(workers)
        self.nbytes = nbytes
        self.typename = sys.intern(typename)
        self.warnings = warnings_
        self.failure = None
        self._set("finished")

    def fail(self, kind: str, text: str, exception: Serialized | None = None,
             traceback: Serialized | None = None, warnings_: Serialized | None = None,
             status: Status = "error") -> None:  # fmt: skip
        self.failure = (kind, text, exception, traceback)
        self.warnings = warnings_
        self._set(status)

    def reset(self) -> None:
        """The key went back to pending (recomputed after its holders were lost)."""
        self.status = "pending"
        self.workers = ()
        event = self._event
        if event is not None:
            event.clear()

    def _set(self, status: Status) -> None:
        self.status = status
        event = self._event
        if event is not None:
            event.set()
        waiters, self.async_waiters = self.async_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        callbacks, self.callbacks = self.callbacks, None
        for cb in callbacks or ():
            cb(self)

    def exception_object(self) -> BaseException | None:
        """The exception a waiter should see, rebuilt from what the scheduler sent."""
        if self.failure is None:
            return None
        kind, text, exc, tb = self.failure
        if self.status == "cancelled":
            return CancelledError(f"{self.key}: {text or 'cancelled'}")
        if kind == "exception" and exc is not None:
            try:
                error: BaseException = deserialize(exc)
            except Exception as err:  # noqa: BLE001 - the client may lack the exception's module
                error = RuntimeError(f"{text} (could not unpickle the exception here: {err})")
            if tb is not None:
                try:
                    error.__cause__ = RemoteTraceback(deserialize(tb))
                except Exception:  # noqa: BLE001 - a traceback is a courtesy
                    pass
            return error
        cls = FAILURE_KINDS.get(kind, FAILURE_KINDS["lost"])
        return cls(text)

    def emit_warnings(self) -> None:
        """Re-raise the task's warnings here, once, so the caller's filters see them."""
        packed, self.warnings = self.warnings, None
        if packed is None:
            return
        try:
            records = deserialize(packed)
        except Exception:  # noqa: BLE001 - an unpicklable warning category
            return
        for category, message, filename, lineno in records:
            warnings.warn_explicit(message, category, filename, lineno)


class Future:
    """A handle to the result of a task (or to scattered data) held in the cluster."""

    __slots__ = ("key", "client", "_state", "__weakref__")

    def __init__(self, key: str, client: Client, state: FutureState | None = None) -> None:
        self.key = key
        self.client = client
        self._state = state if state is not None else client._acquire(key)

    # -- status

    @property
    def status(self) -> Status:
        return self._state.status

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    # -- results

    def result(self, timeout: float | None = None) -> Any:
        """The task's result; raises its exception (original type, remote traceback attached)."""
        if self.client.asynchronous:
            return self._result_async(timeout)
        state = self._state
        if not wait_event(state.event, timeout):  # a task gives its slot back meanwhile
            raise TimeoutError(f"{self.key} did not finish within {timeout}s")
        state.emit_warnings()
        error = state.exception_object()
        if error is not None:
            raise error
        return self.client._fetch_one(state, timeout)

    async def _result_async(self, timeout: float | None = None) -> Any:
        await self._wait_async(timeout)
        state = self._state
        state.emit_warnings()
        error = state.exception_object()
        if error is not None:
            raise error
        values = await self.client._fetch_async([state], timeout)
        packed = values[self.key]
        from .data import UNPICKLE_INLINE_BYTES  # (data imports this module)

        if packed.nbytes < UNPICKLE_INLINE_BYTES:
            return receive(self.client, packed)
        # A big value is unpickled off the loop, which serves everything else meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, receive, self.client,
                                                                packed)  # fmt: skip

    async def _wait_async(self, timeout: float | None = None) -> None:
        if not self._state.done():
            waiter = asyncio.get_running_loop().create_future()
            self._state.add_async_waiter(waiter)
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{self.key} did not finish within {timeout}s") from None

    def __await__(self) -> Any:
        return self._result_async().__await__()

    def exception(self, timeout: float | None = None) -> Any:
        """The task's exception, or None if it succeeded; waits up to ``timeout``.
        With an asynchronous client, a coroutine to await (waiting must not block the loop)."""
        if self.client.asynchronous:
            return self._exception_async(timeout)
        if not wait_event(self._state.event, timeout):  # a task gives its slot back meanwhile
            raise TimeoutError(f"{self.key} did not finish within {timeout}s")
        if self._state.status == "finished":
            return None
        return self._state.exception_object()

    async def _exception_async(self, timeout: float | None = None) -> BaseException | None:
        await self._wait_async(timeout)
        if self._state.status == "finished":
            return None
        return self._state.exception_object()

    def traceback(self, timeout: float | None = None) -> Any:
        """The remote traceback as text, or None (a coroutine with an asynchronous client)."""
        if self.client.asynchronous:
            return self._traceback_async(timeout)
        return _traceback_text(self.exception(timeout))

    async def _traceback_async(self, timeout: float | None = None) -> str | None:
        return _traceback_text(await self._exception_async(timeout))

    # -- control

    def cancel(self) -> bool:
        """Cancel this key for this client; returns True unless it already finished."""
        if self._state.status == "finished" or self._state is _RELEASED:
            return False
        self.client.cancel([self])
        return True

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(self)`` on a client thread once the future is done."""
        self.client._add_done_callback(self, fn)

    def release(self) -> None:
        """Drop this handle's hold on the key now rather than at garbage collection. The
        handle is unusable afterwards: ``result()`` raises `FutureLostError` saying so."""
        state, self._state = self._state, _RELEASED
        if state is not _RELEASED:
            self.client._queue_release(state)

    def __del__(self) -> None:
        # No lock, no wait: the GC may run this on a thread that holds the client's lock.
        try:
            state = self._state
            if state is not _RELEASED:
                self.client._queue_release(state)
        except Exception:  # noqa: BLE001 - interpreter shutdown, half-made handle
            pass

    # -- pickling: inside task arguments a future becomes its value on the worker

    def __reduce__(self) -> tuple[Any, ...]:
        keys = collected_keys()
        if keys is not None:
            keys.append(self.key)
            return (resolve_ref, (self.key,))
        return (_rebuild_future, (self.key,))

    def __repr__(self) -> str:
        typename = f", type: {self._state.typename}" if self._state.typename else ""
        return f"<Future: {self.status}{typename}, key: {self.key}>"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key


class _ReleasedState(FutureState):
    """The state of every handle after `Future.release`: done, failed, and immutable, so
    nothing the client hears later (a late cancel, a report) can change it."""

    def __init__(self) -> None:
        super().__init__("<released>", -1)
        self.failure = ("released", "this future was released (Future.release() was called):"
                        " it no longer refers to a result; keep a future to read it", None,
                        None)  # fmt: skip
        self.status = "lost"
        self.event.set()

    def finish(self, *args: Any, **kwargs: Any) -> None:
        pass

    def fail(self, *args: Any, **kwargs: Any) -> None:
        pass

    def reset(self) -> None:
        pass


_RELEASED: FutureState = _ReleasedState()


def _traceback_text(error: BaseException | None) -> str | None:
    cause = getattr(error, "__cause__", None)
    return cause.tb if isinstance(cause, RemoteTraceback) else None


_receiving = threading.local()


def receive(client: Client, packed: Serialized) -> Any:
    """Unpickle a value that ``client`` received: futures and actor handles inside it hold
    their keys in ``client`` (not in whichever client is the process's default)."""
    previous = getattr(_receiving, "client", None)
    _receiving.client = client
    try:
        return deserialize(packed)
    finally:
        _receiving.client = previous


def receiving_client() -> Client | None:
    """The client unpickling a value it received on this thread (see `receive`), if any."""
    client: Client | None = getattr(_receiving, "client", None)
    return client


def _rebuild_future(key: str) -> Future:
    """A future arriving pickled (in a queue item, an actor call, a task's result): it holds
    the key in the client receiving it, which tells the scheduler if it did not hold it yet."""
    from .client import default_client

    client = receiving_client() or default_client()
    return client._future_on_arrival(key)


# ------------------------------------------------------------------ waiting


def wait(
    futures: Iterable[Future] | Future,
    timeout: float | None = None,
    return_when: str = "ALL_COMPLETED",
) -> tuple[set[Future], set[Future]]:
    """Wait like `concurrent.futures.wait`: returns ``(done, not_done)``.

    Each pending key counts down once when it is done, so waiting on N futures costs O(N)."""
    fs = [futures] if isinstance(futures, Future) else list(futures)
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError(f"unknown return_when {return_when!r}")
    pending: dict[int, tuple[Future, FutureState]] = {}
    any_done = failed = False
    for f in fs:
        state = f._state
        if not state.done():
            pending.setdefault(id(state), (f, state))
        else:
            any_done = True
            failed = failed or state.status != "finished"
    satisfied = (not pending or (return_when == "FIRST_COMPLETED" and any_done)
                 or (return_when == "FIRST_EXCEPTION" and failed))  # fmt: skip
    if not satisfied:
        ready = threading.Event()
        lock = threading.Lock()  # callbacks of futures of several clients run on their loops
        left = [len(pending)]

        def count_down(state: FutureState) -> None:
            with lock:
                left[0] -= 1
                if (left[0] <= 0 or return_when == "FIRST_COMPLETED"
                        or (return_when == "FIRST_EXCEPTION" and state.status != "finished")):
                    ready.set()

        by_client: dict[int, tuple[Client, list[FutureState]]] = {}
        for f, state in pending.values():
            by_client.setdefault(id(f.client), (f.client, []))[1].append(state)
        for client, states in by_client.values():
            client._on_done_many(states, count_down)  # one hop to the loop, not one per key
        with seceded():  # a task gives its slot back meanwhile
            ready.wait(timeout)
    done = {f for f in fs if f.done()}
    return done, {f for f in fs if f not in done}


class as_completed:  # noqa: N801 - named like concurrent.futures.as_completed
    """Iterate over futures as they complete (and, with ``with_results``, their results)."""

    def __init__(self, futures: Iterable[Future] = (), with_results: bool = False,
                 raise_errors: bool = True) -> None:  # fmt: skip
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._queue: queue.Queue[Future] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.update(futures)

    def add(self, future: Future) -> None:
        self.update([future])

    def update(self, futures: Iterable[Future]) -> None:
        """Add many futures: one hop to each client's loop, not one per future."""
        by_client: dict[int, tuple[Client, dict[int, tuple[FutureState, list[Future]]]]] = {}
        count = 0
        for f in futures:
            by_state = by_client.setdefault(id(f.client), (f.client, {}))[1]
            by_state.setdefault(id(f._state), (f._state, []))[1].append(f)
            count += 1
        with self._lock:
            self._pending += count
        for client, by_state in by_client.values():
            waiting = {sid: fs for sid, (_, fs) in by_state.items()}

            def on_done(state: FutureState, waiting: dict[int, list[Future]] = waiting) -> None:
                for future in waiting.pop(id(state), ()):
                    self._queue.put(future)

            client._on_done_many([state for state, _ in by_state.values()], on_done)

    def count(self) -> int:
        with self._lock:
            return self._pending

    def is_empty(self) -> bool:
        return self.count() == 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._pending == 0:
                raise StopIteration
            self._pending -= 1
        try:
            future = self._queue.get_nowait()
        except queue.Empty:
            with seceded():  # a task gives its slot back while it waits
                future = self._queue.get()
        if self.with_results:
            try:
                return future, future.result()
            except Exception as exc:
                if self.raise_errors:
                    raise
                return future, exc
        return future


def fire_and_forget(futures: Iterable[Future] | Future) -> None:
    """Compute these to the end even if every future for them is dropped (e.g. side effects)."""
    fs = [futures] if isinstance(futures, Future) else list(futures)
    for f in fs:
        f.client.fire_and_forget(f)
