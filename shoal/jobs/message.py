"""What travels through a broker: the job envelope and the job's stored record.

Both are msgspec structs. The envelope (`JobMessage`) is written once at enqueue and never
changed; the broker keeps it as opaque bytes beside the few fields it indexes (queue,
priority, eta, status...). The user's arguments inside it are cloudpickled bytes
(``payload``) that only a job worker unpickles.
"""

from __future__ import annotations

from typing import Literal

import msgspec

#: Where a job is. ``scheduled`` is ``queued`` with an ``eta`` still in the future.
Status = Literal["waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled"]

#: How long an idempotency key holds (see `JobMessage.key_until`).
KeyUntil = Literal["forever", "start", "finish"]

#: Statuses in which a job has not started yet (a ``key_until="start"`` key holds).
UNSTARTED: frozenset[str] = frozenset({"waiting", "scheduled", "queued"})

#: What `Broker.list` filters on: a status, or ``"dead"`` for the dead-letter list.
Filter = Literal["waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled",
                 "dead"]

#: Statuses a job never leaves (except ``failed``, through a retry from the dead-letter list).
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

#: Priorities are kept in this range so that a broker can fold them into one sort key.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


class JobMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A job as enqueued: what to run, with which arguments, under which policy."""

    id: str
    name: str  #: the registered job name, e.g. ``"myapp.send_mail"``
    queue: str = "default"
    payload: bytes  #: cloudpickle of ``(args, kwargs)``, signed with a secret (`signing`)
    priority: int = 0  #: higher runs first
    max_attempts: int = 1  #: 1 + retries
    backoff: float = 1.0  #: seconds before the first retry; doubles each retry
    backoff_max: float = 3600.0
    time_limit: float | None = None  #: seconds one attempt may run
    eta: float = 0.0  #: not before this time (epoch seconds)
    created: float = 0.0
    key: str | None = None  #: idempotency key: one job per key
    parents: tuple[str, ...] = ()  #: jobs that must succeed first
    pass_results: bool = True  #: call with the parents' results before ``args``
    #: seconds the finished record (and result) is kept; None: until purged
    result_ttl: float | None = None
    #: how long ``key`` holds: ``"forever"`` (while the record exists), ``"start"`` (while
    #: the job has not started), ``"finish"`` (until it finishes)
    key_until: KeyUntil = "forever"
    key_expires: float | None = None  #: the key holds at most until then (``unique_for``)
    #: jobs with the same limit key share ``rate`` and ``max_concurrency`` across the cluster
    limit_key: str | None = None
    rate: float | None = None  #: at most one start per this many seconds (``rate_limit``)
    max_concurrency: int | None = None  #: at most this many running at once


class JobRecord(msgspec.Struct, kw_only=True):
    """A broker's view of one job, as `Broker.get` returns it."""

    id: str
    name: str
    queue: str
    status: Status
    priority: int = 0
    attempts: int = 0  #: attempts started so far (a lost worker's attempt counts)
    max_attempts: int = 1
    eta: float = 0.0
    created: float = 0.0
    finished: float | None = None
    last_error: str | None = None  #: ``"TypeError: ..."`` or a reason the broker gave
    traceback: str | None = None
    #: cloudpickled return value, or the pickled exception (signed blobs with a secret)
    result: bytes | None = None
    dead: bool = False  #: in the dead-letter list (failed on its own, not by a parent)
    parents: tuple[str, ...] = ()
    key: str | None = None
    worker: str | None = None  #: who runs it (while ``running``)
    result_ttl: float | None = None  #: seconds the finished record is kept (None: until purged)
    started: float | None = None  #: when its last attempt started (reserved), epoch seconds

    @property
    def run_time(self) -> float | None:
        """Seconds its last attempt took, once finished after starting."""
        if self.started is None or self.finished is None or self.finished < self.started:
            return None
        return self.finished - self.started

    @property
    def expires(self) -> float | None:
        """When the finished record (and its result) expires, or None."""
        if self.finished is None or self.result_ttl is None:
            return None
        return self.finished + self.result_ttl

    def expired(self, now: float) -> bool:
        expires = self.expires
        return expires is not None and expires <= now


class Delivery(msgspec.Struct, frozen=True):
    """A reserved job: the worker holds its lease until it acks, fails or releases it.

    ``token`` identifies this reservation; a stale one (the lease lapsed and the job went
    to someone else) makes ack/fail a no-op that returns False."""

    id: str
    token: int
    attempt: int
    message: bytes


#: a list of records (``list`` itself is shadowed inside brokers by `Broker.list`)
Records = list[JobRecord]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(JobMessage)
_record_decoder = msgspec.msgpack.Decoder(JobRecord)


def encode(message: JobMessage) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> JobMessage:
    """Raise ``msgspec.DecodeError`` (a ValueError) if ``data`` is not a job envelope."""
    return _decoder.decode(data)


def encode_record(record: JobRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> JobRecord:
    return _record_decoder.decode(data)
