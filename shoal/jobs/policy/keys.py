"""How long an idempotency key holds (``enqueue(key=..., key_until=..., unique_for=...)``).

A key names one job while it *holds*; an `enqueue` with a key that holds returns that job,
and one with a key that no longer holds stores a new job that takes the key over. The
memory and SQLite brokers call `key_holds`; the Redis scripts repeat it (common.lua).
"""

from __future__ import annotations

from ..message import FINISHED, UNSTARTED

#: accepted values of ``key_until``
KEY_UNTIL = ("forever", "start", "finish")


def check_key_until(value: str) -> str:
    if value not in KEY_UNTIL:
        raise ValueError(f"key_until must be one of {', '.join(map(repr, KEY_UNTIL))}, not {value!r}")
    return value


def key_holds(status: str, finished: float | None, result_ttl: float | None, key_until: str,
              key_expires: float | None, now: float) -> bool:
    """Whether a job in ``status`` still holds its key at ``now``: its record has not
    expired (``result_ttl``), ``unique_for`` has not passed, and it has not started
    (``key_until="start"``) or finished (``"finish"``) yet."""
    if finished is not None and result_ttl is not None and finished + result_ttl <= now:
        return False
    if key_expires is not None and key_expires <= now:
        return False
    if key_until == "start":
        return status in UNSTARTED
    if key_until == "finish":
        return status not in FINISHED
    return True
