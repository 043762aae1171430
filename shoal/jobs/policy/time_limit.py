"""Time limits of attempts: when one is over, and how an overrun is reported.

Pure: the caller passes the times. The worker enforces the limit: in process mode it kills
the child process running the attempt; in thread mode it raises `TimeLimitExceeded` inside
the job's thread, which Python delivers only when that thread next runs Python bytecode (a
job blocked in C code, like ``time.sleep`` or a socket read, stops when that call returns).
"""

from __future__ import annotations

from ..errors import TimeLimitExceeded


def deadline(started: float, limit: float | None) -> float | None:
    """The monotonic time by which an attempt started at ``started`` must end."""
    return None if limit is None else started + limit


def remaining(deadline_at: float | None, now: float) -> float | None:
    """Seconds left before ``deadline_at`` (never negative), None if there is no limit."""
    return None if deadline_at is None else max(0.0, deadline_at - now)


def overrun(limit: float) -> TimeLimitExceeded:
    return TimeLimitExceeded(f"the attempt ran longer than its time limit of {limit:g}s and was stopped")
