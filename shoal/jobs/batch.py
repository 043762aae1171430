"""`Batch`: ``with app.batch():`` sends the jobs enqueued in the block in a few broker calls.

Inside the block, `JobFunction.delay` and `JobFunction.enqueue` (of that app, in that thread
or asyncio task: the batch is held in a context variable) return a `Job` handle at once and
keep the job in the batch. The batch is sent with `Broker.enqueue_many` when it holds
``size`` jobs, when the block ends (also on an exception or ``sys.exit``: what was enqueued
is sent, as it would have been without the batch), when a handle of it is read, and on
`flush`. So a job is durable only once its batch is sent; until then it lives only in this
process's memory.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

from .job import Job
from .message import JobMessage

if TYPE_CHECKING:
    from .app import JobQueue

#: the batch ``with app.batch():`` opened in this context, if any
current: ContextVar[Batch | None] = ContextVar("shoal_jobs_batch", default=None)


class Batch:
    """Jobs enqueued but not sent yet, in order. Thread-safe; sends happen one at a time, in
    the order jobs were added."""

    def __init__(self, app: JobQueue, size: int = 500) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.app = app
        self.size = size
        self._lock = threading.Lock()  #: guards the lists
        self._sending = threading.Lock()  #: one send at a time: order, and settled handles
        self._messages: list[JobMessage] = []
        self._handles: list[Job] = []
        self._token: Token[Batch | None] | None = None
        #: the block has ended: later jobs (from an asyncio task created in the block, which
        #: copied its context) are sent at once, as no one would send them otherwise
        self._closed = False
        self.sent = 0  #: jobs sent so far

    def __repr__(self) -> str:
        return f"<Batch {self.app.url} waiting={len(self._messages)} sent={self.sent}>"

    def __len__(self) -> int:
        """Jobs waiting to be sent."""
        return len(self._messages)

    def __enter__(self) -> Batch:
        outer = current.get()
        if outer is not None:
            outer.flush()  # keep the order of jobs across nested blocks
        with self._lock:
            self._closed = False
        self._token = current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            current.reset(self._token)
            self._token = None
        with self._lock:
            self._closed = True
        self.flush()

    def add(self, message: JobMessage) -> Job:
        """Keep ``message`` for the next send; its handle. Sends when the batch is full."""
        handle = Job(message.id, self.app.broker, True, self, keyed=message.key is not None,
                     signer=self.app.signer)
        with self._lock:
            kept = not self._closed
            if kept:
                self._messages.append(message)
                self._handles.append(handle)
            full = len(self._messages) >= self.size
        if not kept:
            job_id, created = self.app.broker.enqueue(message)
            return Job(job_id, self.app.broker, created, signer=self.app.signer)
        if full:
            self.flush()
        return handle

    def flush(self) -> None:
        """Send every waiting job now (one `Broker.enqueue_many`). If that raises, the
        error propagates here, and the jobs of this send must not be taken as stored: their
        handles say the job is not in the broker (or, on Redis, some chunks may be)."""
        with self._sending:
            with self._lock:
                messages, handles = self._messages, self._handles
                self._messages, self._handles = [], []
            if not messages:
                return
            try:
                results = self.app.broker.enqueue_many(messages)
            except BaseException:
                for handle in handles:
                    handle._batch = None
                raise
            for handle, (job_id, created) in zip(handles, results):
                handle._id, handle._created, handle._batch = job_id, created, None
            self.sent += len(messages)
