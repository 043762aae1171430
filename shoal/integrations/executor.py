"""A `concurrent.futures.Executor` that runs calls on a shoal cluster.

``client.get_executor(**submit_options)`` returns a `ShoalExecutor`. Code written against
the standard library's executors (``submit``, ``map``, ``shutdown``, ``with``) runs on the
cluster unchanged, and its futures are real `concurrent.futures.Future` objects, so
`concurrent.futures.wait` and `concurrent.futures.as_completed` work on them.

How a future is bridged: each call becomes a shoal task (with ``pure=False`` unless the
options say otherwise, so every call runs, as with the standard executors). When the task
ends, the client's event loop fetches the result from the worker that holds it (results
finished in the same loop tick are fetched together, one request per worker) and sets it on
the `concurrent.futures.Future` right there: a small result is unpickled on the loop, a
large one (over 1 MB) on the loop's worker thread pool first. Errors and cancellations are
set on the loop too. Setting an outcome wakes `concurrent.futures.wait`, `as_completed` and
``result()`` at once; the future's done callbacks are handed to the client's callback thread
(which runs the done callbacks of shoal futures too), in the order they were added. So no
callback runs on the loop or between the loop and a result, and a callback that blocks, waits for another future or shuts
the executor down delays only the callbacks queued behind it, never a result. (As with the
standard executors, a callback added to a future that is done already runs at once, in the
thread that adds it.) From then on the result lives in the `concurrent.futures.Future`
only: the cluster's copy is released.

Differences from the standard executors, all inherent to a cluster:

- A future stays PENDING until its task ends (the client is not told when a task starts),
  so ``running()`` is always False and ``cancel()`` succeeds until the task has ended; a
  task cancelled while it runs finishes on its worker, but its result is dropped.
- ``shutdown()`` stops this executor only: the client and its cluster stay up (close
  them yourself, e.g. with ``with Client() as client``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..client.annotate import check_options, resolve_options
from ..client.future import Future, FutureState
from ..protocol.serialize import Serialized, deserialize

if TYPE_CHECKING:
    from ..client.client import Client

__all__ = ["ShoalExecutor"]


#: results larger than this (bytes) are unpickled on a worker thread, not on the event loop
LARGE_RESULT = 1_000_000


class ShoalFuture(cf.Future[Any]):
    """A `concurrent.futures.Future` fed by a shoal task; ``cancel()`` cancels the task.

    Its outcome is set on the client's event loop; its done callbacks run on the client's
    callback thread (see the module docstring)."""

    def __init__(self, shoal_future: Future, executor: ShoalExecutor) -> None:
        super().__init__()
        #: the task's shoal future while it runs; dropped once the result is here
        self._shoal: Future | None = shoal_future
        #: the task's state, kept to re-raise the warnings it emitted when its result is read
        self._shoal_state: FutureState | None = shoal_future._state
        #: the executor that made it, until the outcome is set (it counts pending futures)
        self._executor: ShoalExecutor | None = executor
        #: its client, whose callback thread runs the done callbacks
        self._client = executor.client

    @property
    def key(self) -> str | None:
        """The shoal key of the task (None once the result is here or it was cancelled)."""
        shoal = self._shoal
        return shoal.key if shoal is not None else None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # What a standard executor does when it reaches a cancelled item: waiters in
        # `concurrent.futures.wait` / `as_completed` count it as done from here on.
        self.set_running_or_notify_cancel()
        shoal = self._let_go()
        if shoal is not None:
            if not shoal.done():
                try:
                    shoal.cancel()
                except RuntimeError:  # the client is closed already: nothing left to cancel
                    pass
            shoal.release()
        return True

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self._emit_warnings()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._emit_warnings()

    def _emit_warnings(self) -> None:
        state, self._shoal_state = self._shoal_state, None
        if state is not None and self.done():
            state.emit_warnings()
        elif state is not None:
            self._shoal_state = state  # not done yet (timed out): keep them for later

    def _invoke_callbacks(self) -> None:
        """Hand the done callbacks to the client's callback thread: the outcome is set on
        the event loop, which must never wait for user code (nor run it).

        Overrides `concurrent.futures.Future._invoke_callbacks` (CPython's hook, called
        once the outcome is set); `wait` and `as_completed` use the waiters, not this."""
        if not getattr(self, "_done_callbacks", True):
            return  # none: hand nothing over (a queued hand-over would keep the result alive)
        # (getattr: typeshed does not declare this private hook)
        run_callbacks: Callable[[], None] = getattr(super(), "_invoke_callbacks")  # noqa: B009
        pool = self._client._callback_pool
        if pool is not None:
            try:
                pool.submit(run_callbacks)
                return
            except RuntimeError:  # the client closed: no callback thread any more
                pass
        run_callbacks()

    def _let_go(self) -> Future | None:
        """Take the shoal future (once: None afterwards) and leave the executor's count."""
        with self._condition:  # cancel() and _settle() may race from two threads
            shoal, self._shoal = self._shoal, None
            executor, self._executor = self._executor, None
        if executor is not None:
            executor._forget(self)
        return shoal

    def _settle(self, value: Any = None, error: BaseException | None = None) -> None:
        """Set the outcome (unless cancelled meanwhile) and let go of the shoal future."""
        try:
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)
        except cf.InvalidStateError:  # cancelled while the result was on its way
            pass
        shoal = self._let_go()
        if shoal is not None:
            shoal.release()


class ShoalExecutor(cf.Executor):
    """A `concurrent.futures.Executor` over a shoal client; see the module docstring.

    ``submit_options`` are applied to every call: ``pure`` (default False: every call
    runs), ``priority``, ``retries``, ``retry_delay``, ``resources``, ``workers``,
    ``allow_other_workers`` (as for `Client.submit`); an enclosing `shoal.annotate` fills
    in the ones not given.
    """

    def __init__(self, client: Client, **submit_options: Any) -> None:
        self._pure = bool(submit_options.pop("pure", False))
        check_options(submit_options)
        self._client = client
        self._options = submit_options
        #: futures not yet settled; shutdown(wait=True) waits for these
        self._pending: set[ShoalFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False
        #: finished states whose results the loop fetches in its next tick (loop thread only)
        self._to_fetch: list[tuple[FutureState, ShoalFuture]] = []

    @property
    def client(self) -> Client:
        return self._client

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"{len(self._pending)} pending"
        return f"<ShoalExecutor {self._client.scheduler_address!r} {state}>"

    # ---------------------------------------------------------------- submitting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ShoalFuture:
        """Run ``fn(*args, **kwargs)`` on the cluster; every keyword goes to ``fn``."""
        return self._submit_many(fn, [(args, kwargs)])[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:  # fmt: skip
        """Like `concurrent.futures.Executor.map`: every call is submitted now (in one batch),
        and the returned iterator yields the results in order, raising a call's exception,
        or `TimeoutError` if a result is not there ``timeout`` seconds after this call.
        Results already yielded are not referenced any more. ``chunksize`` > 1 runs that
        many calls per task (fewer, larger tasks for many small calls)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        calls = list(zip(*iterables))
        if chunksize == 1:
            fs = self._submit_many(fn, [(args, {}) for args in calls])
        else:
            chunks = [calls[i:i + chunksize] for i in range(0, len(calls), chunksize)]
            fs = self._submit_many(_run_chunk, [((fn, chunk), {}) for chunk in chunks])

        def result_iterator() -> Iterator[Any]:
            # As the standard library's: futures are popped (oldest first) and results are
            # yielded straight from the call, so nothing here refers to a yielded result.
            try:
                fs.reverse()
                while fs:
                    if end_time is None:
                        yield _result_or_cancel(fs.pop())
                    else:
                        yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
            finally:
                for future in fs:
                    future.cancel()

        if chunksize == 1:
            return result_iterator()
        return _chain_from_lists(result_iterator())

    def _submit_many(self, fn: Callable[..., Any],
                     calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[ShoalFuture]:  # fmt: skip
        if not callable(fn):
            raise TypeError(f"submit expects a callable, got {type(fn).__name__}")
        client = self._client
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            client._check_running()
            options = resolve_options(dict(self._options))
            function = client._pickled_function(fn)
            specs = [client._make_spec(fn, function, args, kwargs, None, self._pure, options)
                     for args, kwargs in calls]  # fmt: skip
            shoal_futures = client._submit_specs(specs, [s.key for s in specs])
            futures = [ShoalFuture(f, self) for f in shoal_futures]
            self._pending.update(futures)
        for shoal_future, future in zip(shoal_futures, futures):
            client._on_done(shoal_future._state, _on_task_done(self, future))
        return futures

    def _forget(self, future: ShoalFuture) -> None:
        with self._lock:
            self._pending.discard(future)

    # ------------------------------------------------------ results (loop thread)

    def _task_done(self, state: FutureState, future: ShoalFuture) -> None:
        if future.done():  # cancelled meanwhile
            future._settle()
            return
        if state.status == "cancelled":  # e.g. by client.cancel: cancelled here too
            if not future.cancel():  # not pending any more: just let go of the task
                future._settle()
            return
        if state.status != "finished":
            error = state.exception_object()
            future._settle(error=error or RuntimeError(f"{state.key} failed"))
            return
        self._to_fetch.append((state, future))
        if len(self._to_fetch) == 1:
            asyncio.get_running_loop().call_soon(self._fetch_batch)

    def _fetch_batch(self) -> None:
        batch, self._to_fetch = self._to_fetch, []
        task = asyncio.ensure_future(self._client._fetch_async([st for st, _ in batch]))
        task.add_done_callback(lambda t: self._fetched(batch, t))

    def _fetched(self, batch: list[tuple[FutureState, ShoalFuture]],
                 task: asyncio.Future[dict[str, Serialized]]) -> None:  # fmt: skip
        if task.cancelled():
            error: BaseException | None = cf.CancelledError("the client closed while fetching")
        else:
            error = task.exception()
        if error is not None and len(batch) > 1:
            # One lost key fails the whole request: fetch the others one by one.
            for state, future in batch:
                single = asyncio.ensure_future(self._client._fetch_async([state]))
                single.add_done_callback(
                    lambda t, item=(state, future): self._fetched([item], t))  # type: ignore[misc]
            return
        if error is not None:
            for _, future in batch:
                future._settle(error=error)
            return
        values = task.result()
        for state, future in batch:
            packed = values[state.key]
            if packed.nbytes > LARGE_RESULT:
                self._unpickle_off_loop(future, packed)
            else:
                _settle_with(future, packed)

    def _unpickle_off_loop(self, future: ShoalFuture, packed: Serialized) -> None:
        """Unpickle a large result on the loop's thread pool, then set it on the loop."""
        loop = asyncio.get_running_loop()
        try:
            unpickling = loop.run_in_executor(None, _unpickled, packed)
        except RuntimeError:  # the loop is shutting its thread pool down
            _settle_with(future, packed)
            return
        unpickling.add_done_callback(lambda done: _settle_unpickled(future, done))

    # ---------------------------------------------------------------- shutting down

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``cancel_futures`` cancel every call not finished yet;
        with ``wait`` return once every call's future is done. The client stays open."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            cf.wait(pending)


def _unpickled(packed: Serialized) -> tuple[Any, BaseException | None]:
    """``(value, None)``, or ``(None, error)`` if ``packed`` does not unpickle here."""
    try:
        return deserialize(packed), None
    except Exception as exc:  # noqa: BLE001 - reported through the future
        return None, exc


def _settle_with(future: ShoalFuture, packed: Serialized) -> None:
    value, error = _unpickled(packed)
    future._settle(value, error)


def _settle_unpickled(future: ShoalFuture,
                      done: asyncio.Future[tuple[Any, BaseException | None]]) -> None:  # fmt: skip
    if done.cancelled():
        future._settle(error=cf.CancelledError("the client closed while unpickling"))
    else:
        value, error = done.result()
        future._settle(value, error)


def _on_task_done(executor: ShoalExecutor, future: ShoalFuture) -> Callable[[FutureState], None]:
    def done(state: FutureState) -> None:
        executor._task_done(state, future)

    return done


def _result_or_cancel(future: cf.Future[Any], timeout: float | None = None) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the reference cycle through the traceback


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """One task of ``map(..., chunksize=n)``: the calls of one chunk, in order."""
    return [fn(*args) for args in chunk]



def _chain_from_lists(lists: Iterator[list[Any]]) -> Iterator[Any]:
    """The items of each list in turn, popped so that none stays referenced here."""
    for items in lists:
        items.reverse()
        while items:
            yield items.pop()
