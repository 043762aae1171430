"""Cancelling a running job: the flag a job checks, and the calls it checks it with.

Inside a job, ``shoal.jobs.is_cancelled()`` says whether someone cancelled it, and
``shoal.jobs.check_cancelled()`` raises `JobCancelled` if so: call it between steps of a
long job to stop cleanly. The worker sets the flag as soon as it learns of the cancel
(``Worker(cancel_poll=)``), and stops the attempt by force ``cancel_grace`` seconds later:
it kills the child process (``pool="processes"``), or raises `JobCancelled` inside the
job's thread (``pool="threads"``; delivered when the thread next runs Python code).

The flag is per thread: a job's own helper threads do not see it (pass it on with
`current_flag`). Outside a job, ``is_cancelled()`` is False.
"""

from __future__ import annotations

import threading

from .errors import JobCancelled


class CancelFlag:
    """Set once, never cleared. A plain attribute: setting it takes no lock, so a signal
    handler (in a child process) may set it."""

    __slots__ = ("job_id", "set")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.set = False


_local = threading.local()


def current_flag() -> CancelFlag | None:
    """The flag of the job this thread runs, or None outside a job."""
    flag: CancelFlag | None = getattr(_local, "flag", None)
    return flag


def install(flag: CancelFlag | None) -> None:
    """Make ``flag`` this thread's (None: leave the job)."""
    _local.flag = flag


def is_cancelled() -> bool:
    """True if the job running in this thread has been cancelled."""
    flag = current_flag()
    return flag is not None and flag.set


def check_cancelled() -> None:
    """Raise `JobCancelled` if the job running in this thread has been cancelled."""
    flag = current_flag()
    if flag is not None and flag.set:
        raise JobCancelled(f"job {flag.job_id} was cancelled")
