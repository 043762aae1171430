"""`Job`: the handle `enqueue` and `delay` return, a view of one job in the broker."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import BadSignature, JobCancelled, JobFailed, ParentFailed, ResultExpired
from .message import FINISHED, JobRecord, Status
from .payload import load
from .signing import Signer, error_context, result_context, unwrap

if TYPE_CHECKING:
    from .batch import Batch
    from .broker import Broker


class Job:
    """A job in a broker, by id. Every property reads the broker afresh.

    ``created`` is False when `enqueue` found a job with the same ``key`` and returned it
    instead of storing a new one.

    A handle from inside ``with app.batch():`` may name a job not sent yet: reading it
    (``status``, ``result()``, ``record``..., or ``id`` / ``created`` when it has a key,
    since the key may name an older job) sends the batch first.

    With a ``signer`` (the app's secret), ``result()`` unpickles only a correctly signed
    result or exception, and raises `BadSignature` otherwise."""

    __slots__ = ("_batch", "_created", "_id", "_keyed", "broker", "signer")

    def __init__(self, job_id: str, broker: Broker, created: bool = True,
                 batch: Batch | None = None, keyed: bool = False, *,
                 signer: Signer | None = None) -> None:
        self._id = job_id
        self.broker = broker
        self.signer = signer
        self._created = created
        #: the batch holding this job until it is sent (None once sent)
        self._batch = batch
        #: enqueued with a key: its id is known only once sent (the key may be taken)
        self._keyed = keyed

    def _settle(self) -> None:
        batch = self._batch
        if batch is not None:
            batch.flush()

    @property
    def id(self) -> str:
        if self._batch is not None and self._keyed:
            self._settle()
        return self._id

    @property
    def created(self) -> bool:
        if self._batch is not None and self._keyed:
            self._settle()
        return self._created

    @property
    def pending(self) -> bool:
        """True while the job waits in a batch, not yet sent to the broker."""
        return self._batch is not None

    def __repr__(self) -> str:
        return f"<Job {self._id}{' (not sent yet)' if self._batch is not None else ''}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def record(self) -> JobRecord:
        self._settle()
        record = self.broker.get(self._id)
        if record is None:
            raise ResultExpired(f"job {self.id} is not in the broker: its result_ttl passed, or "
                                f"it was purged, or no job has this id")
        if record.expired(self.broker.clock()):
            raise ResultExpired(f"job {self.id} ({record.name}) {record.status} at "
                                f"{_utc(record.finished)} and expired at {_utc(record.expires)} "
                                f"(result_ttl={record.result_ttl:g}s)")
        return record

    @property
    def status(self) -> Status:
        return self.record.status

    @property
    def attempts(self) -> int:
        """Attempts started so far (a worker lost mid-attempt counts one)."""
        return self.record.attempts

    @property
    def last_error(self) -> str | None:
        """``"Type: message"`` of the last failed attempt, or why the broker failed it."""
        return self.record.last_error

    @property
    def traceback(self) -> str | None:
        return self.record.traceback

    def done(self) -> bool:
        return self.record.status in FINISHED

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its value. Raises the job's own exception
        (its cause a `shoal.RemoteTraceback`) or `JobFailed` if it failed, `JobCancelled`
        if it was cancelled, ``TimeoutError`` if ``timeout`` seconds pass first, and
        `BadSignature` (unpickling nothing) if the app has a secret and the stored result
        or exception is unsigned or its signature does not match."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while True:
            record = self.record
            if record.status in FINISHED:
                return _outcome(record, self.signer)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {record.status} after {timeout}s")
            left = 0.05 if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 0.05)

    def cancel(self) -> bool:
        """Cancel the job, whatever it waits for or if it runs, and its waiting descendants
        with it; False if it has finished. The cancel is stored in the broker: ``status`` is
        ``cancelled`` at once, ``result()`` raises `JobCancelled`, nothing retries it. A
        running attempt is told (`shoal.jobs.check_cancelled` raises in it) and stopped by
        force after its worker's ``cancel_grace``; if it finished first, this returns False
        and the job keeps its result."""
        self._settle()
        return self.broker.cancel(self._id)

    def retry(self) -> bool:
        """Run a dead-lettered job again with fresh attempts."""
        self._settle()
        return self.broker.retry(self._id)


def _utc(ts: float | None) -> str:
    if ts is None:
        return "?"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _outcome(record: JobRecord, signer: Signer | None) -> Any:
    if record.status == "succeeded":
        if record.result is None:
            return None
        return load(unwrap(signer, result_context(record.id), record.result,
                           f"the result of job {record.id} ({record.name})"))
    if record.status == "cancelled":
        raise JobCancelled(f"job {record.id} ({record.name}) was cancelled"
                           + (f": {record.last_error}" if record.last_error else ""))
    if record.last_error and record.last_error.startswith("ParentFailed:"):
        raise ParentFailed(f"job {record.id} ({record.name}) did not run: {record.last_error}")
    failure = JobFailed(record.id, record.last_error or "unknown error", record.traceback)
    if record.result is not None:
        try:
            data = unwrap(signer, error_context(record.id), record.result,
                          f"the exception of failed job {record.id} ({record.name})")
        except BadSignature as bad:
            raise BadSignature(f"{bad} (the job failed: {record.last_error})") from None
        try:
            exc = load(data)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            from ..exceptions import RemoteTraceback

            if record.traceback:
                exc.__cause__ = RemoteTraceback(record.traceback)
            raise exc
    raise failure
