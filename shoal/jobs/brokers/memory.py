"""``memory://``: the broker in one process's memory, for tests and single-process use.

It is the reference implementation of `shoal.jobs.broker.Broker` in plain Python: one lock,
dicts and heaps with lazy deletion. `join` waits until queues drain, for deterministic tests.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Sequence

from msgspec import structs

from ..broker import Broker, Clock
from ..message import FINISHED, Delivery, Filter, JobMessage, JobRecord, Records, Status, encode
from ..policy.keys import key_holds
from ..policy.limits import CONCURRENCY_RECHECK, MAX_HELD_BACK, next_start


class _Job:
    __slots__ = ("children", "failed_by", "key_expires", "key_until", "lease", "limit_key",
                 "max_concurrency", "message", "pending", "rate", "record", "seq", "token")

    def __init__(self, record: JobRecord, message: bytes, seq: int) -> None:
        self.record = record
        self.message = message
        self.token = 0
        self.lease = 0.0
        self.pending = 0  #: parents not yet succeeded
        self.children: list[str] = []
        self.seq = seq
        self.failed_by: str | None = None  #: the parent that failed (or cancelled) it
        self.key_until = "forever"
        self.key_expires: float | None = None
        self.limit_key: str | None = None
        self.rate: float | None = None
        self.max_concurrency: int | None = None


class MemoryBroker(Broker):
    shared = False

    def __init__(self, url: str = "memory://", clock: Clock = time.time) -> None:
        super().__init__(clock)
        self.url = url
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._keys: dict[str, str] = {}
        self._ready: dict[str, list[tuple[int, int, str]]] = {}  #: (-priority, seq, id)
        self._delayed: list[tuple[float, int, str]] = []  #: (eta, seq, id)
        self._leases: list[tuple[float, str, int]] = []
        self._schedules: dict[str, float] = {}
        self._seq = itertools.count()
        self._with_ttl = 0  #: jobs ever stored with a result_ttl (0: never sweep)
        self._next_sweep = 0.0
        self._tats: dict[str, float] = {}  #: limit key -> earliest next start (rate)
        self._limited_running: dict[str, set[str]] = {}  #: limit key -> ids (pruned on read)

    # ----------------------------------------------------------------- helpers

    def _push(self, job: _Job, now: float) -> None:
        """Queue ``job`` (status ``queued`` already): ready now, or delayed until its eta.
        Heap entries are never removed; one whose seq is no longer the job's is stale."""
        r = job.record
        job.seq = next(self._seq)
        if r.eta <= now:
            heapq.heappush(self._ready.setdefault(r.queue, []), (-r.priority, job.seq, r.id))
        else:
            heapq.heappush(self._delayed, (r.eta, job.seq, r.id))
        self._changed.notify_all()

    def _live(self, seq: int, job_id: str) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.seq != seq or job.record.status != "queued":
            return None
        return job

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, job_id = heapq.heappop(self._delayed)
            job = self._live(seq, job_id)
            if job is not None:
                r = job.record
                heapq.heappush(self._ready.setdefault(r.queue, []), (-r.priority, seq, job_id))

    def _finish_children(self, job: _Job, status: Status, reason: str, now: float) -> None:
        stack = [job]
        while stack:
            parent = stack.pop()
            for child_id in parent.children:
                child = self._jobs.get(child_id)
                if child is None or child.record.status != "waiting":
                    continue
                child.record.status = status
                child.record.finished = now
                child.record.last_error = reason
                child.failed_by = parent.record.id
                stack.append(child)

    def _fail_dead(self, job: _Job, error: str, traceback: str | None, exception: bytes | None,
                   now: float) -> None:
        r = job.record
        r.status, r.dead, r.finished, r.worker = "failed", True, now, None
        r.last_error, r.traceback, r.result = error, traceback, exception
        job.token += 1
        self._finish_children(job, "failed", f"ParentFailed: parent job {r.id} ({r.name}) "
                              f"failed: {error}", now)
        self._changed.notify_all()

    def _reclaim(self, now: float) -> None:
        while self._leases and self._leases[0][0] <= now:
            _, job_id, token = heapq.heappop(self._leases)
            job = self._jobs.get(job_id)
            if job is None or job.token != token or job.record.status != "running":
                continue
            if job.lease > now:  # renewed since; its newer heap entry stays
                continue
            r = job.record
            error = f"WorkerLost: worker {r.worker} stopped renewing its lease (attempt {r.attempts})"
            if r.attempts >= r.max_attempts:
                self._fail_dead(job, error, None, None, now)
            else:
                r.status, r.eta, r.worker, r.last_error = "queued", now, None, error
                job.token += 1
                self._push(job, now)

    def _key_owner(self, key: str, now: float) -> str | None:
        """The job that holds ``key`` now, or None (see `policy.keys`)."""
        job_id = self._keys.get(key)
        job = None if job_id is None else self._jobs.get(job_id)
        if job is None:
            return None
        r = job.record
        status = self._view(job, now).status
        if key_holds(status, r.finished, r.result_ttl, job.key_until, job.key_expires, now):
            return job_id
        return None

    def _sweep(self, now: float) -> None:
        """Delete expired finished jobs (``result_ttl``): at most once a second, and only
        once a job with a TTL was stored."""
        if not self._with_ttl or now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        doomed = [i for i, j in self._jobs.items() if j.record.expired(now)]
        self._drop(doomed)

    def _drop(self, doomed: list[str]) -> None:
        for job_id in doomed:
            job = self._jobs.pop(job_id)
            key = job.record.key
            if key is not None and self._keys.get(key) == job_id:
                del self._keys[key]

    def _limited(self, job: _Job, now: float) -> float | None:
        """None if ``job`` may start now under its limits (and count it), else when to look
        at it again (see `policy.limits`)."""
        key = job.limit_key
        assert key is not None
        if job.max_concurrency is not None:
            running = self._limited_running.setdefault(key, set())
            for other in list(running):
                o = self._jobs.get(other)
                if o is None or o.record.status != "running":
                    running.discard(other)
            if len(running) >= job.max_concurrency:
                return now + CONCURRENCY_RECHECK
        if job.rate is not None:
            ok, when = next_start(self._tats.get(key), now, job.rate)
            if not ok:
                return when
            self._tats[key] = when
        if job.max_concurrency is not None:
            self._limited_running[key].add(job.record.id)
        return None

    # --------------------------------------------------------------- producing

    def enqueue(self, message: JobMessage) -> tuple[str, bool]:
        with self._lock:
            return self._enqueue(message, self.clock())

    def enqueue_many(self, messages: Sequence[JobMessage]) -> list[tuple[str, bool]]:
        with self._lock:
            # Check every parent before storing anything: the batch is all or nothing.
            created: set[str] = set()
            keys: set[str] = set()
            for m in messages:
                for pid in m.parents:
                    if pid not in self._jobs and pid not in created:
                        raise KeyError(f"unknown parent job {pid!r}")
                if m.key is None or (self._key_owner(m.key, self.clock()) is None
                                     and m.key not in keys):
                    created.add(m.id)
                    if m.key is not None:
                        keys.add(m.key)
            now = self.clock()
            return [self._enqueue(m, now) for m in messages]

    def _enqueue(self, message: JobMessage, now: float) -> tuple[str, bool]:
        self._sweep(now)
        if message.key is not None:
            owner = self._key_owner(message.key, now)
            if owner is not None:
                return owner, False
            old = self._jobs.get(self._keys.get(message.key, ""))
            if old is not None:  # its key no longer holds: the new job takes it over
                old.record.key = None
        parents = [self._jobs.get(p) for p in message.parents]
        for pid, parent in zip(message.parents, parents):
            if parent is None:
                raise KeyError(f"unknown parent job {pid!r}")
        record = JobRecord(
            id=message.id, name=message.name, queue=message.queue, status="queued",
            priority=message.priority, max_attempts=message.max_attempts,
            eta=max(message.eta, 0.0), created=now, parents=message.parents, key=message.key,
            result_ttl=message.result_ttl,
        )
        job = _Job(record, encode(message), next(self._seq))
        job.key_until, job.key_expires = message.key_until, message.key_expires
        if message.limit_key is not None:
            job.limit_key, job.rate = message.limit_key, message.rate
            job.max_concurrency = message.max_concurrency
        if message.result_ttl is not None:
            self._with_ttl += 1
        self._jobs[message.id] = job
        if message.key is not None:
            self._keys[message.key] = message.id
        bad = next((p for p in parents if p is not None and p.record.status in ("failed", "cancelled")), None)
        for parent in parents:
            assert parent is not None
            parent.children.append(message.id)
            if parent.record.status != "succeeded":
                job.pending += 1
        if bad is not None:
            verb = "failed" if bad.record.status == "failed" else "was cancelled"
            record.status = bad.record.status
            record.finished = now
            job.failed_by = bad.record.id
            what = "ParentFailed" if verb == "failed" else "ParentCancelled"
            record.last_error = f"{what}: parent job {bad.record.id} ({bad.record.name}) {verb}"
            if bad.record.status == "failed":
                record.last_error += f": {bad.record.last_error}"
        elif job.pending:
            record.status = "waiting"
        else:
            self._push(job, now)
        return message.id, True

    # --------------------------------------------------------------- consuming

    def reserve(self, queues: Sequence[str], worker: str, lease: float, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        with self._lock:
            now = self.clock()
            self._sweep(now)
            self._reclaim(now)
            self._promote(now)
            held_back = 0
            while len(out) < limit and held_back < MAX_HELD_BACK:
                best: tuple[int, int, str] | None = None
                best_queue = ""
                for q in queues:
                    heap = self._ready.get(q)
                    while heap and self._live(heap[0][1], heap[0][2]) is None:
                        heapq.heappop(heap)
                    if heap and (best is None or heap[0] < best):
                        best, best_queue = heap[0], q
                if best is None:
                    break
                heapq.heappop(self._ready[best_queue])
                job = self._jobs[best[2]]
                r = job.record
                if job.limit_key is not None:
                    wait = self._limited(job, now)
                    if wait is not None:  # over its limit: it waits, others go ahead
                        r.eta = wait
                        self._push(job, now)
                        held_back += 1
                        continue
                r.status, r.worker, r.started = "running", worker, now
                r.attempts += 1
                job.token += 1
                job.lease = now + lease
                heapq.heappush(self._leases, (job.lease, r.id, job.token))
                out.append(Delivery(r.id, job.token, r.attempts, job.message))
        return out

    def renew(self, worker: str, held: dict[str, int], lease: float) -> set[str]:
        lost: set[str] = set()
        with self._lock:
            now = self.clock()
            for job_id, token in held.items():
                job = self._jobs.get(job_id)
                if job is None or job.token != token or job.record.status != "running":
                    lost.add(job_id)
                    continue
                job.lease = now + lease
                heapq.heappush(self._leases, (job.lease, job_id, token))
        return lost

    def ack(self, job_id: str, token: int, result: bytes) -> bool:
        with self._lock:
            now = self.clock()
            self._sweep(now)
            job = self._jobs.get(job_id)
            if job is None or job.record.status in FINISHED:
                return False
            r = job.record
            r.status, r.result, r.finished, r.worker = "succeeded", result, now, None
            job.token += 1
            for child_id in job.children:
                child = self._jobs.get(child_id)
                if child is None or child.record.status != "waiting":
                    continue
                child.pending -= 1
                if child.pending <= 0:
                    child.record.status = "queued"
                    child.record.eta = max(child.record.eta, now)
                    self._push(child, now)
            self._changed.notify_all()
            return True

    def fail(self, job_id: str, token: int, error: str, traceback: str | None,
             exception: bytes | None, retry_at: float | None) -> bool:
        with self._lock:
            now = self.clock()
            job = self._jobs.get(job_id)
            if job is None or job.token != token or job.record.status != "running":
                return False
            if retry_at is None:
                self._fail_dead(job, error, traceback, exception, now)
                return True
            r = job.record
            r.status, r.eta, r.worker = "queued", retry_at, None
            r.last_error, r.traceback = error, traceback
            job.token += 1
            self._push(job, now)
            return True

    def release(self, job_id: str, token: int) -> bool:
        with self._lock:
            now = self.clock()
            job = self._jobs.get(job_id)
            if job is None or job.token != token or job.record.status != "running":
                return False
            r = job.record
            r.status, r.worker, r.eta = "queued", None, now
            r.attempts = max(0, r.attempts - 1)
            job.token += 1
            self._push(job, now)
            return True

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        with self._lock:
            return {i for i in job_ids
                    if (job := self._jobs.get(i)) is not None and job.record.status == "cancelled"}

    def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        with self._lock:
            self._changed.wait(timeout)

    # --------------------------------------------------------------- managing

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._view(job)

    def _view(self, job: _Job, now: float | None = None) -> JobRecord:
        r = job.record
        copy = structs.replace(r)
        if r.status == "queued" and r.eta > (self.clock() if now is None else now):
            copy.status = "scheduled"
        return copy

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            now = self.clock()
            job = self._jobs.get(job_id)
            if job is None or job.record.status not in ("waiting", "queued", "running"):
                return False
            r = job.record
            if r.status == "running":
                r.last_error = (f"Cancelled: while running on worker {r.worker} "
                                f"(attempt {r.attempts})")
            r.status, r.finished, r.worker = "cancelled", now, None
            job.token += 1
            self._finish_children(job, "cancelled", f"ParentCancelled: parent job {r.id} "
                                  f"({r.name}) was cancelled", now)
            self._changed.notify_all()
            return True

    def retry(self, job_id: str) -> bool:
        with self._lock:
            now = self.clock()
            job = self._jobs.get(job_id)
            if job is None or not job.record.dead:
                return False
            r = job.record
            r.status, r.dead, r.attempts, r.eta, r.finished = "queued", False, 0, now, None
            r.result = None
            job.token += 1
            self._push(job, now)
            stack = [job]
            while stack:
                parent = stack.pop()
                for child_id in parent.children:
                    child = self._jobs.get(child_id)
                    if child is None or child.failed_by != parent.record.id:
                        continue
                    if child.record.status not in ("failed", "cancelled") or child.record.dead:
                        continue
                    others = [self._jobs.get(p) for p in child.record.parents]
                    if any(o is None or o.record.status in ("failed", "cancelled") for o in others):
                        continue
                    child.failed_by = None
                    child.record.status, child.record.finished = "waiting", None
                    child.record.last_error = None
                    child.pending = sum(1 for o in others if o is not None and o.record.status != "succeeded")
                    stack.append(child)
            return True

    def list(self, status: Filter | None = None, queue: str | None = None,
             limit: int = 100) -> Records:
        with self._lock:
            now = self.clock()
            views = [self._view(j, now) for j in self._jobs.values()
                     if (queue is None or j.record.queue == queue) and not j.record.expired(now)]
        if status == "dead":
            views = [v for v in views if v.dead]
        elif status is not None:
            views = [v for v in views if v.status == status]
        views.sort(key=lambda v: (-(v.finished or 0.0), -v.priority, v.eta, v.created))
        return views[:limit]

    def dead(self, limit: int = 100) -> Records:
        return self.list("dead", limit=limit)

    def dead_count(self) -> int:
        with self._lock:
            return sum(1 for job in self._jobs.values() if job.record.dead)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for job in self._jobs.values():
                v = self._view(job)
                per = out.setdefault(v.queue, {})
                per[v.status] = per.get(v.status, 0) + 1
        return out

    def purge(self, queue: str | None = None, finished_before: float | None = None,
              pending: bool = False) -> int:
        with self._lock:
            doomed = []
            for job_id, job in self._jobs.items():
                r = job.record
                if queue is not None and r.queue != queue:
                    continue
                if r.status in FINISHED:
                    if finished_before is None or (r.finished or 0.0) < finished_before:
                        doomed.append(job_id)
                elif pending and r.status in ("waiting", "queued"):
                    doomed.append(job_id)
            self._drop(doomed)
            return len(doomed)

    # --------------------------------------------------------------- schedules

    def schedule_last(self, name: str) -> float | None:
        with self._lock:
            return self._schedules.get(name)

    def schedule_advance(self, name: str, slot: float) -> None:
        with self._lock:
            self._schedules[name] = max(slot, self._schedules.get(name, slot))

    # --------------------------------------------------------------- testing

    def join(self, timeout: float = 10.0) -> None:
        """Block until no job is queued (and due), waiting or running; TimeoutError after
        ``timeout`` seconds. Jobs scheduled for later do not count."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                now = self.clock()
                busy = [j for j in self._jobs.values() if j.record.status in ("waiting", "running")
                        or (j.record.status == "queued" and j.record.eta <= now)]
                if not busy:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(busy)} jobs still pending after {timeout}s")
                self._changed.wait(min(left, 0.05))
