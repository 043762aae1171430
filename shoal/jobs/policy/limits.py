"""Rate and concurrency limits shared by every worker, enforced by the broker at `reserve`.

``rate_limit="100/m"`` becomes an interval between starts (0.6 s): a limit key's starts are
spaced at least that far apart (a "generic cell rate" schedule with no burst: the key keeps
the earliest time its next job may start). So in any window of length ``period`` at most
``n`` jobs of the key start. ``max_concurrency=5``: at most five of its jobs running.

A job whose limit is reached is not failed: `reserve` passes it by and sets its ``eta`` to
when it may start (the rate's next slot, or `CONCURRENCY_RECHECK` seconds later for a
concurrency limit), so it waits as a ``scheduled`` job and other jobs go ahead of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: seconds before a job held back by ``max_concurrency`` is looked at again
CONCURRENCY_RECHECK = 0.05

#: most jobs one `reserve` call passes by because of their limits
MAX_HELD_BACK = 100

_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0,
            "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


def parse_rate(text: str) -> float:
    """``"100/m"`` -> 0.6 (seconds between starts). Accepts N/s, N/m, N/h, N/d and
    ``N/10s``."""
    match = _RATE.match(text.lower()) if isinstance(text, str) else None
    if match is None or match.group(3) not in _PERIODS:
        raise ValueError(f"rate_limit must look like '10/s', '100/m', '1000/h' or '5/10s', "
                         f"not {text!r}")
    n = float(match.group(1))
    period = float(match.group(2) or 1.0) * _PERIODS[match.group(3)]
    if n <= 0:
        raise ValueError(f"rate_limit must allow at least one job, not {text!r}")
    return period / n


def check_concurrency(value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"max_concurrency must be a whole number >= 1, not {value!r}")
    return value


def limit_key_of(name: str, limit_key: Callable[..., Any] | None, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> str:
    """The key a job's limits are counted under: its name, and ``limit_key(*args,
    **kwargs)`` when given (``limit_key=lambda user, *_: user.id``: a limit per user)."""
    if limit_key is None:
        return name
    return f"{name}|{limit_key(*args, **kwargs)}"


def next_start(tat: float | None, now: float, interval: float) -> tuple[bool, float]:
    """Rate decision for one job: ``(may start now, new tat or when it may start)``.
    ``tat`` is the earliest time the key's next job may start (None: never started)."""
    if tat is not None and tat > now:
        return False, tat
    return True, now + interval
