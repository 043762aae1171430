"""How long a worker's lease on a job lasts and how often it renews it.

A worker renews every lease a third of the way through it, so two renewals in a row can
fail (a broker restart, a GC pause) before the lease lapses and the job goes to another.
"""

from __future__ import annotations

#: default lease (seconds): how long a dead worker's jobs wait before they run elsewhere
DEFAULT_LEASE = 30.0


def renew_interval(lease: float) -> float:
    return lease / 3.0


def check_lease(lease: float) -> float:
    if not lease > 0:
        raise ValueError(f"lease must be > 0 seconds, not {lease!r}")
    return float(lease)
