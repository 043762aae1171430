"""When a failed attempt runs again: exponential backoff with jitter, capped.

Pure: the caller passes the time and a random number in [0, 1).
"""

from __future__ import annotations

from ..message import JobMessage


def backoff_delay(attempt: int, base: float, cap: float, rand: float = 0.5, jitter: float = 0.25) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): ``base * 2**(attempt
    - 1)``, capped at ``cap``, then spread by ±``jitter`` (a fraction) so that jobs that
    failed together do not all retry at the same instant."""
    if base <= 0:
        return 0.0
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return max(0.0, delay * (1.0 + jitter * (2.0 * rand - 1.0)))


def next_attempt_at(message: JobMessage, attempt: int, now: float, retryable: bool,
                    rand: float = 0.5) -> float | None:
    """When to run the job again after attempt ``attempt`` failed, or None if this was its
    last (attempts used up, or the error is not one to retry)."""
    if not retryable or attempt >= message.max_attempts:
        return None
    return now + backoff_delay(attempt, message.backoff, message.backoff_max, rand)
