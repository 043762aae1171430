"""The broker interface: every backend (memory, SQLite, Redis) keeps jobs the same way.

A job's life, which every broker implements atomically, one call at a time::

    enqueue ──> waiting ──(last parent succeeded)──> queued ──(reserve)──> running
                   │                                  ▲  │                 │
                   │                  (eta passes)    │  └─ scheduled <────┤ fail, attempts left
                   │                                  │                    │  (backoff = eta)
                   └─(a parent failed/cancelled)─> failed <── fail, none left┤
                                                      │                    │
                                        retry (dead-letter) ──> queued     └─ ack ──> succeeded

- ``reserve`` gives a job to one worker under a LEASE (``lease`` seconds from now) that the
  worker renews while the job runs; it bumps ``attempts``. A job whose lease lapses (its
  worker died or hung without heartbeats) is queued again by the next ``reserve``, or, if
  it has used all its attempts, failed to the dead-letter list: at-least-once delivery,
  never twice at once while the holder lives.
- ``ack``/``fail``/``release`` take the reservation's token: a worker whose lease lapsed
  and went to another cannot finish or hand back the new holder's attempt (a late ``ack``
  still records the result if the job has not finished yet, so the work is not wasted).
- Children are released by the broker in the call that finishes their last parent: no
  one polls for them. A failed or cancelled parent fails (cancels) its waiting children
  and theirs, each with a reason naming the parent.
- Each call reads the time once from ``self.clock`` (epoch seconds), so tests can drive
  leases and delays with a fake clock. Workers on many machines should have synchronised
  clocks: skew must stay well below the lease.

`shoal.jobs.testing.check_broker` runs the conformance checks on any implementation.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from .message import Delivery, Filter, JobMessage, JobRecord, Records

Clock = Callable[[], float]


class Broker(ABC):
    """Durable storage of jobs, leases and schedule slots. Thread-safe."""

    #: the URL it was opened from (``memory://``, ``sqlite:///path``, ``redis://host``)
    url: str = ""
    #: True when separate processes can share it (not ``memory://``)
    shared: bool = True

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock

    # --------------------------------------------------------------- producing

    @abstractmethod
    def enqueue(self, message: JobMessage) -> tuple[str, bool]:
        """Store a job; return ``(id, created)``.

        With ``message.key`` already used by a job, store nothing and return that job's id
        and False. With parents, the job waits for them (and fails or is cancelled at once
        if one already has); an unknown parent id raises ``KeyError``."""

    def enqueue_many(self, messages: Sequence[JobMessage]) -> list[tuple[str, bool]]:
        """Store many jobs; return ``(id, created)`` for each, in order.

        The same as `enqueue` on each message in turn: a key used by an existing job or by
        an earlier message of the batch returns that job's id (and False); a message may name
        an earlier one of the batch as a parent. Unlike separate calls, an unknown parent
        raises ``KeyError`` before anything is stored. Backends store a batch in one step
        (memory: one lock; SQLite: one transaction; Redis: one script call per chunk of
        `ENQUEUE_CHUNK` messages, each chunk atomic). This default calls `enqueue` on each,
        after checking parents."""
        if not messages:
            return []
        check_parents(messages, lambda ids: [self.get(i) is not None for i in ids])
        return [self.enqueue(m) for m in messages]

    # --------------------------------------------------------------- consuming

    @abstractmethod
    def reserve(self, queues: Sequence[str], worker: str, lease: float, limit: int) -> list[Delivery]:
        """Lease up to ``limit`` ready jobs from ``queues`` to ``worker``: highest priority
        first, then oldest ``eta``. Lapsed leases are dealt with first (see module doc)."""

    @abstractmethod
    def renew(self, worker: str, held: dict[str, int], lease: float) -> set[str]:
        """Extend the leases of ``held`` (id -> token); return the ids no longer held."""

    @abstractmethod
    def ack(self, job_id: str, token: int, result: bytes) -> bool:
        """The attempt succeeded with ``result`` (pickled): finish the job, release its
        children. False if the job had finished already."""

    @abstractmethod
    def fail(self, job_id: str, token: int, error: str, traceback: str | None,
             exception: bytes | None, retry_at: float | None) -> bool:
        """The attempt failed. With ``retry_at``, schedule the job again then; without, it
        fails for good into the dead-letter list and fails its children. False if the
        reservation is stale (someone else holds the job now, or it finished)."""

    @abstractmethod
    def release(self, job_id: str, token: int) -> bool:
        """Hand an unfinished job back (worker shutting down): queued again at once, and
        the attempt is not counted. False if the reservation is stale."""

    def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Block until work may be ready in ``queues`` or ``timeout`` passes (a hint; the
        worker calls `reserve` after it either way). Default: sleep."""
        time.sleep(timeout)

    # --------------------------------------------------------------- managing

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None if unknown (or purged)."""

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        return [self.get(job_id) for job_id in job_ids]

    @abstractmethod
    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished (waiting, scheduled, queued or running) and its
        waiting descendants: it is ``cancelled`` at once, durably. A running job's worker
        learns it from `cancelled` and stops the attempt; its later ack/fail is refused, so a
        cancel racing the finish ends in one of the two, never both, and never a retry.
        False if the job has finished (or is unknown)."""

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` are cancelled (a worker asks this about the jobs it holds).
        Default: read their records."""
        ids = list(job_ids)
        return {i for i, r in zip(ids, self.get_many(ids)) if r is not None and r.status == "cancelled"}

    @abstractmethod
    def retry(self, job_id: str) -> bool:
        """Queue a dead-lettered job again with fresh attempts; the descendants it failed
        wait for it again. False if it is not in the dead-letter list."""

    @abstractmethod
    def list(self, status: Filter | None = None, queue: str | None = None,
             limit: int = 100) -> Records:
        """Jobs in ``status`` (``"dead"`` lists the dead-letter list), newest first for
        finished ones, next-to-run first for the rest."""

    @abstractmethod
    def dead(self, limit: int = 100) -> Records:
        """The dead-letter list, most recent first."""

    def dead_count(self) -> int:
        """How many jobs the dead-letter list holds. Default: list them all."""
        return len(self.dead(limit=2**62))

    @abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """``{queue: {status: n}}`` for statuses with at least one job. SQLite and Redis
        answer from counters kept as jobs change, not by reading every job, so that
        ``shoal jobs status`` stays quick on a deep queue."""

    @abstractmethod
    def purge(self, queue: str | None = None, finished_before: float | None = None,
              pending: bool = False) -> int:
        """Delete finished jobs (finished before ``finished_before`` if given) and, with
        ``pending``, also jobs not yet started, in ``queue`` or all queues. Running jobs
        are never purged. Returns how many were deleted."""

    # --------------------------------------------------------------- schedules

    @abstractmethod
    def schedule_last(self, name: str) -> float | None:
        """The last slot (epoch seconds) fired for schedule ``name``, or None."""

    @abstractmethod
    def schedule_advance(self, name: str, slot: float) -> None:
        """Record ``slot`` as fired for ``name`` (never moves backwards)."""

    def close(self) -> None:
        """Release connections. The broker must not be used afterwards."""


#: Messages per atomic step in `Broker.enqueue_many` where a backend splits a batch.
ENQUEUE_CHUNK = 1000


def check_parents(messages: Sequence[JobMessage],
                   exist: Callable[[list[str]], list[bool]]) -> None:
    """Raise ``KeyError`` for the first parent that is neither an earlier message of the
    batch nor a job ``exist`` finds (asked once, for all outside parents together)."""
    earlier: set[str] = set()
    outside: dict[str, None] = {}
    for m in messages:
        for pid in m.parents:
            if pid not in earlier:
                outside[pid] = None
        earlier.add(m.id)
    if outside:
        ids = list(outside)
        missing = [pid for pid, ok in zip(ids, exist(ids)) if not ok]
        if missing:
            raise KeyError(f"unknown parent job {missing[0]!r}")
