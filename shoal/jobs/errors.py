"""Errors `shoal.jobs` raises."""

from __future__ import annotations

from ..exceptions import ShoalError


class JobError(ShoalError):
    """Base of the job queue's errors."""


class BrokerUnavailable(JobError, ConnectionError):
    """The broker cannot be reached now (Redis down, SQLite locked too long); retry later."""


class JobFailed(JobError):
    """A job failed after its last attempt (or was failed by a parent); ``result()`` raises
    this when the job's own exception cannot be rebuilt, else that exception, with this
    as its cause's context. ``error`` is ``"Type: message"``, ``traceback`` the worker's."""

    def __init__(self, job_id: str, error: str, traceback: str | None = None) -> None:
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error
        self.traceback = traceback


class JobCancelled(JobError):
    """The job was cancelled (or a parent of it was)."""


class ResultExpired(JobError, KeyError):
    """The job is gone from the broker: its ``result_ttl`` passed (or it was purged)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class ParentFailed(JobError):
    """A job it waited for failed or was cancelled, so it will not run."""


class TimeLimitExceeded(JobError):
    """An attempt ran past its ``time_limit`` and was stopped; counted as a failed attempt."""


class BadSignature(JobError):
    """A stored payload, argument or result has no valid signature (see `shoal.jobs.signing`):
    it is never unpickled. A job worker dead-letters the job with this reason; ``result()``
    raises it."""


class UnknownJob(JobError):
    """A message names a job this worker's app does not define."""


class DuplicateJob(JobError):
    """Two jobs registered under one name in one app."""
