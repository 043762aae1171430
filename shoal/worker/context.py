"""Tasks that launch tasks: the client a task uses, and giving a thread slot back while waiting.

Inside a task, `get_client` returns a client of the task's scheduler that its worker makes
on first use and shares among its tasks (it closes when the worker closes); outside tasks
it is `shoal.default_client()`, which also returns the worker's client while a task runs.

A task that waits on other tasks would hold its thread slot while they wait for one: with
one thread per worker, ``fib(n)`` calling ``get_client().submit(fib, n - 1).result()``
would deadlock. So a task waiting on a future (`Future.result`, `wait`, `Client.gather`,
`as_completed`, `ActorFuture.result`) secedes for the wait: its worker's state machine moves
it out of the slot count (``long-running``) and starts the next ready task; when the wait
ends, it rejoins, taking a slot again once one is free. `secede` and `rejoin` do the same
explicitly: after `secede` a task runs beside the worker's ``nthreads`` until it returns or
calls `rejoin`.

The task's context (its worker and key) is a thread-local set by the worker around each
run; actor methods run with their worker's context too (they hold no slot, so they never
secede).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.client import Client
    from .server import Worker

__all__ = ["get_client", "get_worker", "rejoin", "secede"]


class TaskContext:
    """What a worker thread is running: a task (``key``) or an actor's methods."""

    __slots__ = ("worker", "key", "is_actor", "seceded")

    def __init__(self, worker: Worker, key: str, is_actor: bool = False) -> None:
        self.worker = worker
        self.key = key
        #: an actor's thread: it holds no thread slot, so it has none to give back
        self.is_actor = is_actor
        #: the task gave its slot back and has not rejoined
        self.seceded = False


_local = threading.local()


def current_context() -> TaskContext | None:
    """The task or actor this thread runs, or None outside workers' threads."""
    ctx: TaskContext | None = getattr(_local, "context", None)
    return ctx


@contextmanager
def running(ctx: TaskContext) -> Iterator[TaskContext]:
    """Mark this thread as running ``ctx`` (the worker wraps each task run in this)."""
    previous = current_context()
    _local.context = ctx
    try:
        yield ctx
    finally:
        _local.context = previous


def get_worker() -> Worker:
    """The worker running the current task; raises ValueError outside tasks."""
    ctx = current_context()
    if ctx is None:
        raise ValueError("get_worker() works only inside a task running on a shoal worker")
    return ctx.worker


def task_client() -> Client | None:
    """The worker's client when called from a task or an actor, else None."""
    ctx = current_context()
    if ctx is None:
        return None
    return ctx.worker.task_clients.get()


def get_client() -> Client:
    """A client of the current scheduler: in a task, the one its worker shares among its
    tasks (made on first use); elsewhere `shoal.default_client()`."""
    client = task_client()
    if client is not None:
        return client
    from ..client.client import default_client

    return default_client()


def secede() -> None:
    """Give this task's thread slot back to its worker, which may start another task now.

    The task goes on running (beside the worker's ``nthreads``) and reports its result as
    usual. Does nothing outside tasks or if the task has seceded already."""
    ctx = current_context()
    if ctx is None or ctx.is_actor or ctx.seceded:
        return
    ctx.seceded = True
    ctx.worker.secede_task(ctx.key)


def rejoin() -> None:
    """Take a thread slot again after `secede`: blocks until the worker has one free.
    Does nothing outside tasks or if the task holds a slot already."""
    ctx = current_context()
    if ctx is None or ctx.is_actor or not ctx.seceded:
        return
    ctx.seceded = False
    ctx.worker.rejoin_task(ctx.key)


@contextmanager
def seceded() -> Iterator[None]:
    """Inside a task, give the slot back for the block and take one again after it (a task
    that seceded already stays so). Outside tasks, does nothing."""
    ctx = current_context()
    if ctx is None or ctx.is_actor or ctx.seceded:
        yield
        return
    secede()
    try:
        yield
    finally:
        rejoin()


def wait_event(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait(timeout)``, seceding meanwhile if this is a task and it must wait."""
    if event.is_set():
        return True
    with seceded():
        return event.wait(timeout)
