"""The user's entry point: submit work, hold futures, gather results.

`Client()` with no address starts a `LocalCluster` (scheduler on the client's event loop,
worker processes beside it). A synchronous client runs its own event-loop thread, so it
works the same from a script and from Jupyter; ``asynchronous=True`` uses the caller's loop.
Data is fetched straight from the workers that hold it, never through the scheduler.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import hashlib
import itertools
import logging
import os
import threading
import types
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..comm.batched import BatchedSend
from ..comm.core import Comm, CommClosedError
from ..comm.registry import connect
from ..coordination.datasets import DatasetsMixin
from ..exceptions import FutureLostError, SchedulerGoneError
from .cluster_ops import ClusterMixin
from .data import DataMixin
from .future import Future, FutureState, Status, as_completed, wait
from ..protocol.messages import (
    PROTOCOL_VERSION,
    CancelKeys,
    FireAndForgetKeys,
    Hello,
    Identity,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    Msg,
    ReleaseKeys,
    Reply,
    SchedulerClosing,
    SubmitTasks,
    TaskWarning,
    TaskSpec,
    WantKeys,
    WorkerRemoved,
)
from .annotate import resolve_options
from ..protocol.refs import collecting
from ..protocol.serialize import Serialized, dumps_function, serialize, serialize_call
from ..comm.rpc import PeerPool, next_rid
from ..utils.loop import LoopThread
from ..utils.loop_monitor import LoopMonitor, watch_loop

#: ``make(args, kwargs, key)`` -> the spec of one call (see `Client._spec_maker`)
SpecMaker = Callable[[tuple[Any, ...], dict[str, Any], "str | None"], TaskSpec]

if TYPE_CHECKING:
    from ..integrations.dask import DaskScheduler
    from ..integrations.executor import ShoalExecutor
    from ..security.credentials import Security

__all__ = ["Client", "as_completed", "default_client", "wait"]

logger = logging.getLogger("shoal.client")

#: clients made defaults, oldest first: the default is the newest still running, so closing
#: one falls back to the one before it (as dask's default client does), not to none at all
_defaults: list[weakref.ReferenceType[Client]] = []
_defaults_lock = threading.Lock()
_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _client_security(address: str, security: Security | bool | None) -> Security | None:
    """The client's credentials: given, or (for a tls:// address) from the environment;
    a `Security` holding several roles' certificates gives its client one."""
    from ..security.credentials import Security

    if security is True:
        raise ValueError("security=True makes a temporary CA for a local cluster: give"
                         " shoal.Security(...) to connect to a running scheduler")  # fmt: skip
    if isinstance(security, Security):
        return security.for_role("client")
    if str(address).startswith("tls://"):
        return _security_from_config()
    return None


def _security_from_config() -> Security | None:
    """The client certificate of the configuration's ``[tls]`` settings (None when none is
    set); some but not all is an error naming the missing keys and their variables."""
    from ..config import SETTINGS, load_config
    from ..security.credentials import Security, SecurityError

    config = load_config()
    keys = ("tls.ca_file", "tls.cert", "tls.key")
    values = {key: config.get(key) for key in keys}
    if not any(values.values()):
        return None
    missing = [f"{key} ({' or '.join((SETTINGS[key].env_var, *SETTINGS[key].meta.aliases))})"
               for key in keys if not values[key]]  # fmt: skip
    if missing:
        raise SecurityError(f"TLS settings are incomplete: {', '.join(missing)} not set")
    return Security(str(values["tls.ca_file"]), str(values["tls.cert"]), str(values["tls.key"]))


def default_client() -> Client:
    """The most recent open client in this process; inside a task, its worker's client."""
    from ..worker.context import task_client

    client = task_client()
    if client is None:
        with _defaults_lock:
            running = [c for c in (ref() for ref in _defaults)
                       if c is not None and c.status == "running"]  # fmt: skip
        client = running[-1] if running else None
    if client is None or client.status != "running":
        raise ValueError("no shoal client is running: create one with shoal.Client()")
    return client


class Client(DataMixin, ClusterMixin, DatasetsMixin):
    """Connects to a scheduler (or starts a local cluster) and runs work on it."""

    def __init__(
        self,
        address: str | None = None,
        *,
        asynchronous: bool = False,
        timeout: float | None = None,
        name: str | None = None,
        token: str | None = None,
        set_as_default: bool = True,
        security: Security | bool | None = None,
        reconnect_timeout: float = 0.0,
        **cluster_kwargs: Any,
    ) -> None:
        """``security``: TLS credentials (`shoal.Security`, a client certificate) for a
        ``tls://`` scheduler; read from ``SHOAL_TLS_CA_FILE``, ``SHOAL_TLS_CERT`` and
        ``SHOAL_TLS_KEY`` (the ``[tls]`` settings of `shoal.config`) when not given.
        ``timeout`` and ``token`` default to ``client.timeout`` and ``security.token``.
        With no address, ``security=True`` (or
        `Security.temporary()`) starts a local cluster that speaks only TLS.
        ``reconnect_timeout``: seconds to keep reconnecting to a lost scheduler (one restarted
        from its journal) before futures fail with `SchedulerGoneError` (0: fail at once);
        see `shoal.client.reconnect`."""
        self.asynchronous = asynchronous
        self._security_arg = security
        #: the TLS credentials in use (None: plain TCP), known once connected
        self.security: Security | None = None
        from ..config import load_config

        # Keywords first, then SHOAL_* variables and shoal.toml (see shoal.config).
        config = load_config()
        self.timeout = timeout if timeout is not None else config.client.timeout
        self.name = name or f"client-{os.getpid()}"
        self.token = token if token is not None else config.security.token
        self.cluster: Any = None
        self._cluster_kwargs = cluster_kwargs
        self._address = address
        self.scheduler_address = ""
        self.status = "created"
        #: the current hold on each key; guarded by ``_lock`` (never taken by a finalizer)
        self._states: dict[str, FutureState] = {}
        self._lock = threading.Lock()
        #: unique keys of impure calls: a random prefix per client, then a count
        self._key_prefix = uuid.uuid4().hex[:16]
        self._key_counter = itertools.count()
        #: generations of holds: each new `FutureState` takes the next
        self._generations = itertools.count(1)
        #: messages for the scheduler and states whose handles died, in the order they came
        #: (any thread, finalizers included: no lock); sent by the loop (`_drain_outbox`)
        self._outbox: collections.deque[Msg | FutureState] = collections.deque()
        self._drain_due = False
        self._replies: dict[int, asyncio.Future[Any]] = {}
        #: id(function) -> (weak reference to it, its pickle): never keeps a function alive
        self._function_cache: dict[int, tuple[weakref.ReferenceType[Any], bytes]] = {}
        self._comm: Comm | None = None
        self._send_batch: BatchedSend | None = None
        from .reconnect import Reconnector

        self._reconnector = Reconnector(self, reconnect_timeout)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._peers: PeerPool | None = None
        self._callback_pool: ThreadPoolExecutor | None = None
        self._set_as_default = set_as_default
        #: the scheduler's dashboard URL once known ("" when it serves none)
        self._dashboard_link: str | None = None
        self._loop_thread: LoopThread | None = None
        #: the watchdog of the client's event loop (its own thread's, or the caller's)
        self.loop_monitor: LoopMonitor | None = None
        #: why the scheduler connection ended, once it has (set on the loop thread)
        self._scheduler_lost: str | None = None
        #: handlers of other scheduler messages, by type (e.g. topic messages for `Sub`)
        self._message_handlers: dict[type[Msg], Callable[[Any], None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        if not asynchronous:
            self._loop_thread = LoopThread(name=f"shoal-{self.name}")
            self.loop = self._loop_thread.loop
            try:
                self._loop_thread.run(self._start(), timeout=None)
            except BaseException:
                self._loop_thread.run(self._stop_everything())
                self._loop_thread.stop()
                raise

    # --------------------------------------------------------------- lifecycle

    def __await__(self) -> Any:
        async def start() -> Client:
            if self.status == "created":
                self.loop = asyncio.get_running_loop()
                await self._start()
            return self

        return start().__await__()

    async def _start(self) -> None:
        from ..cluster.local import LocalCluster

        self.loop = asyncio.get_running_loop()
        self.loop_monitor = watch_loop(f"client {self.name}")  # released by _stop_everything
        address = self._address
        security = self._security_arg
        if address is None:
            self.cluster = LocalCluster(token=self.token, security=security or None,
                                        **self._cluster_kwargs)  # fmt: skip
            await self.cluster._start()
            address = self.cluster.scheduler_address
            security = self.cluster.security
        elif self._cluster_kwargs:
            raise TypeError(f"unexpected arguments {sorted(self._cluster_kwargs)}"
                            " (cluster options apply only when no address is given)")  # fmt: skip
        elif hasattr(address, "scheduler_address"):
            self.cluster, address = address, address.scheduler_address  # a cluster object
            self.token = self.token or getattr(self.cluster, "token", None)  # its token
            security = security or getattr(self.cluster, "security", None)
        self.security = _client_security(address, security)
        self.scheduler_address = address
        hello = Hello(PROTOCOL_VERSION, "client", self.name, self.token, os.getpid())
        self._comm = await connect(address, hello, timeout=self.timeout,
                                   security=self.security, server_role="scheduler")
        self._send_batch = BatchedSend(self._comm)
        self._peers = PeerPool(hello, connect_timeout=self.timeout, security=self.security)
        self._reader = asyncio.ensure_future(self._read_scheduler(self._comm))
        self._callback_pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-callbacks")
        self.status = "running"
        _live_clients.add(self)
        if self.asynchronous and getattr(self.cluster, "dashboard_link", None) is None:
            # `dashboard_link` cannot wait for an answer later: ask now.
            try:
                info = await self._request(Identity(next_rid()), timeout=self.timeout)
                self._dashboard_link = str(info.get("dashboard") or "")
            except (FutureLostError, RuntimeError, asyncio.TimeoutError):
                self._dashboard_link = ""
        if self._set_as_default:
            with _defaults_lock:
                _defaults.append(weakref.ref(self))

    def close(self, timeout: float | None = None) -> Any:
        """Close the connection, and the local cluster if this client started it."""
        if self.asynchronous:
            return self._close_async()
        if self.status in ("closing", "closed") or self._loop_thread is None:
            return None
        self.status = "closing"
        try:
            self._loop_thread.run(self._stop_everything(), timeout=timeout or 30)
        finally:
            self._loop_thread.stop()
            if self._callback_pool is not None:
                self._callback_pool.shutdown(wait=False)
            self.status = "closed"
        return None

    async def _close_async(self) -> None:
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        await self._stop_everything()
        if self._callback_pool is not None:
            self._callback_pool.shutdown(wait=False)
        self.status = "closed"

    async def _stop_everything(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.gather(self._reconnect_task, return_exceptions=True)
        if self._send_batch is not None:
            await self._send_batch.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._peers is not None:
            await self._peers.close()
        if self.cluster is not None and self._address is None:
            await self.cluster._close()
        self._fail_pending("lost", "the client was closed")
        with _defaults_lock:
            _defaults[:] = [ref for ref in _defaults if ref() not in (None, self)]
        if self.loop_monitor is not None:
            self.loop_monitor.release(f"client {self.name}")
            self.loop_monitor = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        await self
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._close_async()

    def __del__(self) -> None:
        # A finalizer neither locks nor waits: ask the client's own loop to close it.
        # (getattr: __init__ may have failed early, e.g. on a bad setting.)
        loop_thread = getattr(self, "_loop_thread", None)
        if getattr(self, "status", "") == "running" and loop_thread is not None:
            try:
                loop_thread.loop.call_soon_threadsafe(self._close_on_own_loop)
            except Exception:  # noqa: BLE001 - interpreter shutdown, loop closed
                pass

    def _close_on_own_loop(self) -> None:
        """Close from the client's loop thread, then stop that loop (no one waits)."""
        if self.status != "running" or self._loop_thread is None:
            return
        self.status = "closing"
        loop = self._loop_thread.loop

        async def close() -> None:
            try:
                await self._stop_everything()
            finally:
                if self._callback_pool is not None:
                    self._callback_pool.shutdown(wait=False)
                self.status = "closed"
                loop.stop()

        asyncio.ensure_future(close())

    def __repr__(self) -> str:
        return f"<Client {self.scheduler_address!r} {self.status}>"

    # ------------------------------------------------------------ loop plumbing

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop_thread is not None:
            self._loop_thread.call_soon(fn, *args)
        elif self.loop is not None:
            if _on_loop(self.loop):
                fn(*args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)

    def _send(self, msg: Msg) -> None:
        """Send ``msg`` to the scheduler from any thread (a finalizer too: no lock, no wait),
        in order with every other message and release of this client."""
        self._outbox.append(msg)
        self._schedule_drain()

    def _send_now(self, msg: Msg) -> None:
        """Send ``msg`` now, after what is queued before it (on the loop only; a user thread
        uses `_send`: a callback it schedules may run after a drain of later messages)."""
        self._drain_outbox()
        self._write(msg)

    def _write(self, msg: Msg) -> None:
        reconnector = self._reconnector
        if reconnector.enabled:
            reconnector.sent(msg)
            if reconnector.held_back is not None and self.status == "running":
                reconnector.held_back.append(msg)  # sent once connected again
                return
        batch = self._send_batch
        if batch is not None and not batch.closed and self.status in ("running", "closing"):
            batch.send(msg)

    def _schedule_drain(self) -> None:
        loop = self.loop
        if not self._drain_due and loop is not None:
            self._drain_due = True
            try:
                loop.call_soon_threadsafe(self._drain_outbox)
            except RuntimeError:  # the loop is closed: so is the client
                pass

    def _drain_outbox(self) -> None:
        """Send what is queued, in order; count released handles and tell the scheduler of
        holds that ended (on the loop)."""
        self._drain_due = False  # before draining: what is queued later schedules anew
        outbox = self._outbox
        if not outbox:
            return
        out: list[Msg] = []
        keys: list[str] = []
        generations: list[int] = []
        with self._lock:
            while outbox:
                item = outbox.popleft()
                if not isinstance(item, FutureState):
                    if keys:
                        out.append(ReleaseKeys(keys, generations=generations))
                        keys, generations = [], []
                    out.append(item)
                    continue
                item.refs -= 1
                if item.refs <= 0 and self._states.get(item.key) is item:
                    del self._states[item.key]
                    keys.append(item.key)
                    generations.append(item.generation)
        if keys:
            out.append(ReleaseKeys(keys, generations=generations))
        for msg in out:
            self._write(msg)

    def _sync(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the client's loop (sync mode) or hand it back (async mode)."""
        if self.asynchronous:
            return coro
        assert self._loop_thread is not None
        return self._loop_thread.run(coro, timeout)

    async def _request(self, msg: Msg, timeout: float | None = None) -> Any:
        rid: int = msg.rid  # type: ignore[attr-defined]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        self._send_now(msg)
        try:
            reply = await asyncio.wait_for(fut, timeout or self.timeout * 6)
        finally:
            self._replies.pop(rid, None)
        if reply.error:
            raise RuntimeError(reply.error)
        return reply.value

    async def _read_scheduler(self, comm: Comm) -> None:
        reason = "the connection to the scheduler closed"
        try:
            while True:
                for msg in await comm.read():
                    try:
                        self._on_message(msg)
                    except Exception:  # noqa: BLE001 - one bad message must not end the reader
                        logger.exception("client %s: error handling %s", self.name,
                                         type(msg).__name__)  # fmt: skip
        except CommClosedError as exc:
            reason = f"lost the scheduler at {self.scheduler_address}: {exc}"
        finally:
            if self.status == "running" and self._reconnector.enabled:
                self._reconnector.lost(reason)
            elif self.status == "running":
                self._fail_pending("scheduler-gone", reason)

    def _current(self, key: str, generation: int) -> FutureState | None:
        """The state a report about ``key`` at ``generation`` is for, if it is still held
        (a report about an earlier hold of a reused key is stale and dropped)."""
        st = self._states.get(key)
        return st if st is not None and st.generation == generation else None

    def _on_message(self, msg: Msg) -> None:
        if isinstance(msg, KeyInMemory):
            st = self._current(msg.key, msg.generation)
            if st is not None:
                st.finish(msg.workers, msg.nbytes, msg.typename, msg.warnings)
        elif isinstance(msg, KeyErred):
            st = self._current(msg.key, msg.generation)
            if st is not None:
                status: Status = "error" if msg.kind == "exception" else "lost"
                st.fail(msg.kind, msg.text, msg.exception, msg.traceback, msg.warnings, status)
        elif isinstance(msg, KeyLost):
            st = self._current(msg.key, msg.generation)
            if st is not None and st.status == "finished":
                st.reset()  # being computed again: its futures wait for the new result
        elif isinstance(msg, KeyCancelled):
            # The scheduler dropped this hold (a dependency of it was cancelled): the next
            # submission of the key is a new hold.
            with self._lock:
                st = self._current(msg.key, msg.generation)
                if st is not None:
                    del self._states[msg.key]
            if st is not None and st.status != "cancelled":
                st.fail("cancelled", msg.reason, status="cancelled")
        elif isinstance(msg, WorkerRemoved):
            if self._peers is not None:
                self._peers.forget(msg.address)  # requests waiting on it fail over now
        elif isinstance(msg, Reply):
            fut = self._replies.pop(msg.rid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, TaskWarning):
            try:
                warnings.warn(msg.text, RuntimeWarning, stacklevel=1)
            except Warning:  # a filter turned it into an error: it is still worth a log line
                logger.warning("%s", msg.text)
        elif isinstance(msg, SchedulerClosing):
            if self._reconnector.enabled:
                return  # it may come back (a restart): reconnecting starts when it is gone
            self._fail_pending("scheduler-gone", f"the scheduler closed: {msg.reason}")
        else:
            handler = self._message_handlers.get(type(msg))
            if handler is not None:
                handler(msg)

    def _fail_pending(self, kind: str, reason: str) -> None:
        if kind == "scheduler-gone" and self._scheduler_lost is None:
            self._scheduler_lost = reason  # new work is refused from now on (_check_running)
        for st in list(self._states.values()):
            if not st.done():
                st.fail(kind, reason, status="lost")
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(FutureLostError(reason))

    # --------------------------------------------------- reference counting

    def _acquire(self, key: str) -> FutureState:
        """A new handle on ``key``: the current hold's state (a new hold if there is none)."""
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = FutureState(key, next(self._generations))
            st.refs += 1
            return st

    def _acquire_many(self, keys: list[str]) -> list[FutureState]:
        """`_acquire` for each of ``keys``, under one taking of the lock."""
        states = self._states
        generations = self._generations
        acquired: list[FutureState] = []
        with self._lock:
            for key in keys:
                st = states.get(key)
                if st is None:
                    st = states[key] = FutureState(key, next(generations))
                st.refs += 1
                acquired.append(st)
        return acquired

    def _future_on_arrival(self, key: str) -> Future:
        """A handle for a future that arrived pickled: if this client did not hold the key,
        it tells the scheduler it does now (else the future would never complete)."""
        with self._lock:
            st = self._states.get(key)
            new = st is None
            if st is None:
                st = self._states[key] = FutureState(key, next(self._generations))
            st.refs += 1
        future = Future(key, self, st)
        if new:
            self._send(WantKeys([key], [st.generation]))
        return future

    def _queue_release(self, state: FutureState) -> None:
        """A handle on ``state`` is gone. Called from finalizers on any thread: no lock, no
        wait; the loop counts it, in order with the messages sent before (`_drain_outbox`)."""
        self._outbox.append(state)
        self._schedule_drain()

    def _on_done_many(self, states: list[FutureState],
                      fn: Callable[[FutureState], None]) -> None:  # fmt: skip
        """`_on_done` for many states in one hop to the loop."""

        def register() -> None:
            for state in states:
                if state.done():
                    fn(state)
                else:
                    state.add_callback(fn)

        self._call_soon(register)

    def _on_done(self, state: FutureState, fn: Callable[[FutureState], None]) -> None:
        """Run ``fn(state)`` on the loop thread when ``state`` is done (now if it is)."""

        def register() -> None:
            if state.done():
                fn(state)
            else:
                state.add_callback(fn)

        self._call_soon(register)

    def _add_done_callback(self, future: Future, fn: Callable[[Future], Any]) -> None:
        pool = self._callback_pool

        def run(_: FutureState) -> None:
            if pool is not None:
                try:
                    pool.submit(fn, future)
                except RuntimeError:  # the client is closed; run it here
                    fn(future)

        self._on_done(future._state, run)

    # --------------------------------------------------------------- submit

    def _pickled_function(self, fn: Callable[..., Any]) -> bytes:
        """``fn`` pickled, cached while ``fn`` lives: the cache holds it weakly, so a bound
        method or a closure over a large object never outlives the user's last reference."""
        cache = self._function_cache
        cached = cache.get(id(fn))
        if cached is not None and cached[0]() is fn:
            return cached[1]
        payload = dumps_function(fn)
        if isinstance(fn, types.MethodType):
            return payload  # made anew at each attribute access: a weak reference dies at once
        ident = id(fn)
        try:
            # The callback only pops from a dict: no lock, no wait (it runs inside the GC).
            ref = weakref.ref(fn, lambda _ref: cache.pop(ident, None))
        except TypeError:  # not weakly referenceable (a builtin): not cached
            return payload
        cache[ident] = (ref, payload)
        return payload

    def _make_spec(self, fn: Callable[..., Any], function: bytes, args: tuple[Any, ...],
                   kwargs: dict[str, Any], key: str | None, pure: bool,
                   options: dict[str, Any]) -> TaskSpec:  # fmt: skip
        return self._spec_maker(fn, function, pure, options)(args, kwargs, key)

    def _spec_maker(self, fn: Callable[..., Any], function: bytes, pure: bool,
                    options: dict[str, Any]) -> SpecMaker:  # fmt: skip
        """Makes the specs of calls of ``fn``: what is the same for every call (its name, the
        resolved options) is worked out once, not once per task of a `map`."""
        name = _funcname(fn)
        what = f"argument of {name}"
        prefix = f"{name}-{self._key_prefix}"
        counter = self._key_counter
        workers = options.get("workers")
        # Shared by every spec of the call: nothing mutates a spec's options once made.
        fixed: dict[str, Any] = dict(
            priority=int(options.get("priority") or 0),
            retries=int(options.get("retries") or 0),
            resources={k: float(v) for k, v in options["resources"].items()}
            if options.get("resources") else None,
            workers=[workers] if isinstance(workers, str) else list(workers) if workers else None,
            allow_other_workers=bool(options.get("allow_other_workers", False)),
            retry_delay=float(options.get("retry_delay", 0.1)),
        )  # fmt: skip

        def make(args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> TaskSpec:
            packed: Serialized | None = serialize_call(args, kwargs)
            dependencies: tuple[str, ...] = ()
            if packed is None:  # code or futures inside: cloudpickle, noting the futures
                with collecting() as deps:
                    packed = serialize((args, kwargs), what)
                dependencies = tuple(dict.fromkeys(deps))
            if key is None:
                if pure:
                    h = hashlib.blake2b(function, digest_size=16)
                    for frame in packed.frames:
                        h.update(frame)
                    key = f"{name}-{h.hexdigest()}"
                else:
                    # Unique without a system call per task: this client's prefix + a count.
                    key = f"{prefix}{next(counter):x}"
            return TaskSpec(key, function, packed, dependencies, **fixed)

        return make

    def submit(self, fn: Callable[..., Any], *args: Any, key: str | None = None,
               pure: bool = True, priority: int | None = None, retries: int | None = None,
               resources: dict[str, float] | None = None, workers: list[str] | str | None = None,
               allow_other_workers: bool | None = None, retry_delay: float | None = None,
               actor: bool = False, **kwargs: Any) -> Future:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` in the cluster; futures among the arguments become
        dependencies (their values are passed in). Pure calls get a key from their inputs,
        so the same call submitted twice runs once. With ``actor=True``, ``fn`` is a class
        whose instance lives on the worker that makes it: the result is a `shoal.Actor`.

        ``priority`` (higher first), ``retries`` (with ``retry_delay`` seconds before the
        first, doubling), ``resources`` (e.g. ``{"GPU": 1}``, against what workers declare),
        ``workers`` (addresses, names or hosts) with ``allow_other_workers``; unset options
        come from an enclosing `shoal.annotate`."""
        if not callable(fn):
            raise TypeError(f"submit expects a callable, got {type(fn).__name__}")
        self._check_running()
        if actor:
            from .actor import actor_factory

            fn, pure = actor_factory(fn), False  # each submit makes its own instance
        options = resolve_options(dict(
            priority=priority, retries=retries, resources=resources, workers=workers,
            allow_other_workers=allow_other_workers, retry_delay=retry_delay))  # fmt: skip
        spec = self._make_spec(fn, self._pickled_function(fn), args, kwargs, key, pure, options)
        future = Future(spec.key, self)
        self._send(SubmitTasks([spec], [spec.key], generations=[future._state.generation]))
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            key: str | list[str] | None = None, pure: bool = True, priority: int | None = None,
            retries: int | None = None, resources: dict[str, float] | None = None,
            workers: list[str] | str | None = None, allow_other_workers: bool | None = None,
            retry_delay: float | None = None, **kwargs: Any) -> list[Future]:  # fmt: skip
        """``submit(fn, *args)`` for each tuple of arguments zipped from ``iterables``."""
        if not callable(fn):
            raise TypeError(f"map expects a callable, got {type(fn).__name__}")
        self._check_running()
        options = resolve_options(dict(
            priority=priority, retries=retries, resources=resources, workers=workers,
            allow_other_workers=allow_other_workers, retry_delay=retry_delay))  # fmt: skip
        make = self._spec_maker(fn, self._pickled_function(fn), pure, options)
        columns = [list(it) for it in iterables]
        keys = key if isinstance(key, list) else None
        specs = []
        for i, args in enumerate(zip(*columns)):
            k = keys[i] if keys is not None else (f"{key}-{i}" if isinstance(key, str) else None)
            specs.append(make(args, kwargs, k))
        names = [s.key for s in specs]
        states = self._acquire_many(names)
        futures = [Future(k, self, st) for k, st in zip(names, states)]
        self._send(SubmitTasks(specs, names, generations=[st.generation for st in states]))
        return futures

    def _check_running(self) -> None:
        if self.status != "running":
            raise RuntimeError(f"the client is {self.status}; create a new Client")
        if self._scheduler_lost is not None:
            # Submitting now would leave futures pending forever: nobody will answer.
            raise SchedulerGoneError(f"{self._scheduler_lost}; create a new Client")

    # ------------------------------------------------------------- controls

    def cancel(self, futures: Iterable[Future] | Future) -> None:
        """Cancel futures for this client (what depends on them too): they end cancelled,
        and the same key submitted again from now on is a new hold that runs anew."""
        fs = [futures] if isinstance(futures, Future) else list(futures)
        states: dict[int, FutureState] = {}
        with self._lock:
            for f in fs:
                st = f._state
                if st.generation < 0 or st.status == "cancelled":
                    continue  # a released handle, or cancelled already
                if self._states.get(f.key) is st:
                    del self._states[f.key]
                states[id(st)] = st
        if not states:
            return

        def mark() -> None:
            for st in states.values():
                if st.status != "cancelled":
                    st.fail("cancelled", "cancelled by the client", status="cancelled")

        self._call_soon(mark)
        # Through the outbox, so it reaches the scheduler before a resubmission made after it.
        self._send(CancelKeys([st.key for st in states.values()],
                              generations=[st.generation for st in states.values()]))

    def fire_and_forget(self, futures: Iterable[Future] | Future) -> None:
        """Run these to the end even if every future for them is dropped."""
        fs = [futures] if isinstance(futures, Future) else list(futures)
        self._send(FireAndForgetKeys([f.key for f in fs]))

    def want(self, futures: Iterable[Future]) -> None:
        fs = list(futures)
        self._send(WantKeys([f.key for f in fs], [f._state.generation for f in fs]))

    # ------------------------------------------------ the ecosystem (integrations/)

    def _submit_specs(self, specs: list[TaskSpec], wanted: list[str]) -> list[Future]:
        """Submit prebuilt tasks in one batch (any order); a future for each of ``wanted``."""
        self._check_running()
        futures = [Future(key, self) for key in wanted]
        self._send(SubmitTasks(specs, wanted, generations=[f._state.generation for f in futures]))
        return futures

    def get_executor(self, **submit_options: Any) -> ShoalExecutor:
        """A `concurrent.futures.Executor` that runs calls on this cluster; ``submit_options``
        (``pure``, ``priority``, ``retries``, ``resources``, ``workers``...) apply to each."""
        from ..integrations.executor import ShoalExecutor

        return ShoalExecutor(self, **submit_options)

    def get(self, dsk: Any, keys: Any, **options: Any) -> Any:
        """Run a dask graph and return the values of ``keys`` (dask's scheduler interface:
        ``dask.compute(x, scheduler=client.get)``); see `shoal.integrations.dask`."""
        from ..integrations.dask import get

        return get(self, dsk, keys, **options)

    def compute(self, collections: Any, sync: bool = False, optimize_graph: bool = True,
                traverse: bool = True, **options: Any) -> Any:  # fmt: skip
        """Start computing dask collections: a `Future` per collection (values if ``sync``)."""
        from ..integrations.dask import compute

        return compute(self, collections, sync=sync, optimize_graph=optimize_graph,
                       traverse=traverse, **options)  # fmt: skip

    def persist(self, collections: Any, optimize_graph: bool = True, **options: Any) -> Any:
        """Dask collections whose chunks are computed and held on the workers (as futures)."""
        from ..integrations.dask import persist

        return persist(self, collections, optimize_graph=optimize_graph, **options)

    def as_dask_scheduler(self) -> DaskScheduler:
        """Make this client dask's default scheduler now, until the returned object's
        ``restore()`` or the end of ``with client.as_dask_scheduler():``."""
        from ..integrations.dask import DaskScheduler

        return DaskScheduler(self)


# --------------------------------------------------------------------- helpers


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _funcname(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else str(name)


@atexit.register
def _close_clients_at_exit() -> None:
    for client in list(_live_clients):
        if client.status == "running" and not client.asynchronous:
            try:
                client.close(timeout=10)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass

