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
