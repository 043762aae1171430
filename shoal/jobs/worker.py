"""`Worker`: takes jobs from a broker and runs them, ``concurrency`` at a time.

Threads in one worker:
- the fetcher reserves jobs while fewer than ``concurrency + prefetch`` are held (prefetch
  is bounded), and hands them to the slots;
- ``concurrency`` slots each run one attempt at a time, inline (``pool="threads"``) or in
  a child process of their own (``pool="processes"``), then ack or fail it;
- the heartbeat renews the leases of all held jobs every third of a lease, so a long job
  is never handed to a second worker while this one lives;
- the scheduler (when the app has schedules) enqueues periodic jobs as their slots come;
- the canceller asks the broker every ``cancel_poll`` seconds which held jobs were
  cancelled: it sets their cancel flag (`shoal.jobs.check_cancelled`) at once and stops
  them by force ``cancel_grace`` seconds later (the child killed, or `JobCancelled` raised
  in the thread). A cancelled job's late ack or fail is refused by the broker.

A job is acknowledged only after it finished (at-least-once): if this process dies, its
leases lapse and the jobs run elsewhere. Broker outages are waited out: every broker call
is retried with backoff until it succeeds or the worker gives up at the end of its grace.

`stop` (what SIGTERM does in ``shoal jobs worker``): stop reserving, hand prefetched jobs
back at once, let running ones finish for up to ``grace`` seconds, then hand those back
too (killing their child processes in process mode).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from msgspec import structs

from .errors import BadSignature, BrokerUnavailable
from .executors import ChildExecutor, InlineExecutor
from .message import Delivery, JobMessage, decode
from .metrics import MetricsServer, WorkerStats
from .periodic import PeriodicScheduler
from .policy.leases import check_lease, renew_interval
from .policy.retries import next_attempt_at
from .runner import Outcome
from .signing import ENV_VAR, args_context, error_context, result_context, sign, sign_optional, unwrap

if TYPE_CHECKING:
    from .app import JobQueue

log = logging.getLogger("shoal.jobs.worker")
T = TypeVar("T")
Pool = Literal["threads", "processes"]

#: the unsigned-payloads warning is logged once per process, not once per worker
_warned_unsigned = False


def _warn_unsigned(url: str) -> None:
    global _warned_unsigned
    if not _warned_unsigned:
        _warned_unsigned = True
        log.warning("job payloads are unsigned: anyone who can write to the broker (%s) can "
                    "run any code on this job worker. Set JobQueue(secret=...) or $%s on "
                    "producers and workers (docs/jobs-signing.md)", url, ENV_VAR)


class _GaveUp(Exception):
    """The worker stopped waiting for the broker (end of grace)."""


class Worker:
    """Runs an app's jobs from ``queues``. Use as a context manager, or `start` / `stop`."""

    def __init__(self, app: JobQueue, *, queues: Sequence[str] = ("default",), concurrency: int = 1,
                 pool: Pool = "threads", prefetch: int | None = None, lease: float | None = None,
                 grace: float = 30.0, schedules: bool = True, name: str | None = None,
                 poll_interval: float = 0.05, cancel_grace: float = 10.0,
                 cancel_poll: float = 0.25, max_jobs_per_child: int | None = None,
                 max_memory_per_child: int | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1") -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if pool not in ("threads", "processes"):
            raise ValueError(f"pool must be 'threads' or 'processes', not {pool!r}")
        self.app = app
        self.broker = app.broker
        self.queues = tuple(queues)
        self.concurrency = concurrency
        self.pool = pool
        self.prefetch = concurrency if prefetch is None else max(0, prefetch)
        self.lease = check_lease(lease if lease is not None else app.lease)
        self.grace = grace
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.poll_interval = poll_interval
        if cancel_grace < 0 or cancel_poll <= 0:
            raise ValueError(f"cancel_grace must be >= 0 and cancel_poll > 0, not "
                             f"{cancel_grace!r} and {cancel_poll!r}")
        self.cancel_grace = cancel_grace
        self.cancel_poll = cancel_poll
        #: held jobs found cancelled -> when to stop them by force (monotonic)
        self._cancelled: dict[str, float] = {}
        self._rand = random.Random()
        self._held: dict[str, int] = {}  #: reserved and not finished: id -> token
        self._running: dict[int, Delivery] = {}  #: slot -> the attempt it runs
        self._cond = threading.Condition()
        self._inbox: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._abandon = threading.Event()  #: set at the end of grace: give up on the broker
        self._stopped = threading.Event()
        if pool != "processes" and (max_jobs_per_child or max_memory_per_child):
            raise ValueError("max_jobs_per_child and max_memory_per_child need pool='processes'")
        for what, value in (("max_jobs_per_child", max_jobs_per_child),
                            ("max_memory_per_child", max_memory_per_child)):
            if value is not None and value < 1:
                raise ValueError(f"{what} must be at least 1, not {value!r}")
        self._executors: list[InlineExecutor | ChildExecutor] = [
            ChildExecutor(max_jobs_per_child, max_memory_per_child) if pool == "processes"
            else InlineExecutor() for _ in range(concurrency)]
        self._threads: list[threading.Thread] = []
        self._slots: list[threading.Thread] = []
        self._scheduler = PeriodicScheduler(app, self._stopping) if schedules and app.schedules else None
        self.processed = 0  #: attempts finished (ok or not) by this worker
        self.stats = WorkerStats()  #: attempts and run times, for ``/metrics``
        self.metrics: MetricsServer | None = None  #: serves ``/metrics`` (``metrics_port``)
        self._metrics_at = None if metrics_port is None else (metrics_host, metrics_port)

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.app.url} queues={','.join(self.queues)}>"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Worker:
        def spawn(target: Callable[..., None], name: str, *args: object) -> threading.Thread:
            t = threading.Thread(target=target, args=args, name=f"shoal-jobs-{name}", daemon=True)
            t.start()
            return t

        if self._metrics_at is not None:
            self.metrics = MetricsServer(self, *self._metrics_at).start()
            log.info("job worker %s: metrics at %s", self.name, self.metrics.url)
        self._slots = [spawn(self._slot, f"slot-{i}", i) for i in range(self.concurrency)]
        self._threads = [spawn(self._fetch, "fetcher"), spawn(self._heartbeat, "heartbeat"),
                         spawn(self._watch_cancels, "canceller")]
        if self._scheduler is not None:
            self._threads.append(spawn(self._scheduler.run, "scheduler"))
        log.info("job worker %s: queues %s, %d %s, broker %s, %s", self.name,
                 ",".join(self.queues), self.concurrency, self.pool, self.app.url,
                 "unsigned" if self.app.signer is None else "signed payloads only")
        if self.app.signer is None:
            _warn_unsigned(self.app.url)
        return self

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has stopped; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Stop: see the module doc. Idempotent; returns when every thread is done."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        grace = self.grace if grace is None else grace
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + grace
        for t in self._threads:
            if t.name.endswith("fetcher") or t.name.endswith("scheduler"):
                t.join(max(0.0, deadline - time.monotonic()) + 5.0)
        for _ in self._slots:
            self._inbox.put(None)
        for t in self._slots:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._running.items())
        if left:
            log.warning("job worker %s: %d jobs still running after %.3gs grace; handing them "
                        "back", self.name, len(left), grace)
        self._abandon.set()
        for slot, delivery in left:
            self._executors[slot].kill()
            self._try(lambda d=delivery: self.broker.release(d.id, d.token))  # type: ignore[misc]
            self._forget(delivery)
        # A killed child's slot returns at once; a thread stuck in a job cannot be stopped:
        # it is a daemon, abandoned here (its late result is ignored, see _execute).
        for t in self._slots:
            t.join(1.0 if self.pool == "processes" else 0.0)
        for executor in self._executors:
            executor.close()
        self._stopped.set()
        for t in self._threads:
            t.join(5.0)
        if self.metrics is not None:
            self.metrics.close()
        log.info("job worker %s stopped after %d attempts", self.name, self.processed)

    # ----------------------------------------------------------------- broker calls

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried while the broker is unavailable, until the end of grace."""
        delay = 0.05
        while True:
            try:
                return fn()
            except BrokerUnavailable as exc:
                if self._abandon.is_set():
                    raise _GaveUp() from exc
                log.warning("job worker %s: broker unavailable (%s); retrying", self.name, exc)
                self._abandon.wait(delay)
                delay = min(delay * 2, 1.0)

    def _try(self, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except BrokerUnavailable as exc:
            log.warning("job worker %s: broker unavailable (%s)", self.name, exc)
            return None

    # ----------------------------------------------------------------- threads

    def _fetch(self) -> None:
        capacity = self.concurrency + self.prefetch
        idle = 0.0005
        while not self._stopping.is_set():
            with self._cond:
                while len(self._held) >= capacity and not self._stopping.is_set():
                    self._cond.wait(0.5)
                room = capacity - len(self._held)
            if self._stopping.is_set():
                break
            try:
                deliveries = self.broker.reserve(self.queues, self.name, self.lease, room)
            except BrokerUnavailable as exc:
                log.warning("job worker %s: broker unavailable (%s); retrying", self.name, exc)
                self._stopping.wait(idle := min(max(idle, 0.05) * 2, 1.0))
                continue
            except Exception:
                log.exception("job worker %s: reserve failed", self.name)
                self._stopping.wait(1.0)
                continue
            if deliveries:
                with self._cond:
                    for d in deliveries:
                        self._held[d.id] = d.token
                for d in deliveries:
                    self._inbox.put(d)
                idle = 0.0005
                continue
            try:
                self.broker.wait_for_work(self.queues, idle)
            except BrokerUnavailable:
                self._stopping.wait(idle)
            idle = min(idle * 2, self.poll_interval)
        # Whatever is prefetched and not started goes back now.
        self._release_inbox()

    def _release_inbox(self) -> None:
        pending: list[Delivery] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item)
        for d in pending:
            self._try(lambda d=d: self.broker.release(d.id, d.token))  # type: ignore[misc]
            self._forget(d)

    def _forget(self, d: Delivery) -> None:
        with self._cond:
            if self._held.get(d.id) == d.token:
                del self._held[d.id]
            self._cond.notify_all()

    def _heartbeat(self) -> None:
        interval = renew_interval(self.lease)
        while not self._stopped.wait(interval):
            with self._cond:
                held = dict(self._held)
            if not held:
                continue
            try:
                lost = self.broker.renew(self.name, held, self.lease)
            except Exception as exc:
                log.warning("job worker %s: could not renew leases (%s)", self.name, exc)
                continue
            if lost:
                # A cancel also takes the lease: such a job stays held (a prefetched one
                # must still be seen, and skipped, by its slot) and is not "lost".
                try:
                    found = self.broker.cancelled(list(lost))
                except Exception:
                    found = set()
                deadline = time.monotonic() + self.cancel_grace
                with self._cond:
                    for job_id in found:
                        self._cancelled.setdefault(job_id, deadline)
                    lost -= self._cancelled.keys()
            if lost:
                log.warning("job worker %s: lost the lease on %d jobs (%s)", self.name, len(lost),
                            ", ".join(sorted(lost)[:5]))
                with self._cond:
                    for job_id in lost:
                        if self._held.get(job_id) == held[job_id]:
                            del self._held[job_id]

    def _watch_cancels(self) -> None:
        """See the module doc. Asks the broker only while jobs are held."""
        told: set[str] = set()  #: running attempts whose flag is set
        while not self._stopped.wait(self.cancel_poll):
            with self._cond:
                # Running ones too: a heartbeat that found the lease gone (the cancel took
                # it) drops the job from _held while its attempt still runs.
                unknown = [i for i in {*self._held, *(d.id for d in self._running.values())}
                           if i not in self._cancelled]
            if unknown:
                try:
                    found = self.broker.cancelled(unknown)
                except Exception as exc:
                    log.warning("job worker %s: could not ask for cancels (%s)", self.name, exc)
                    found = set()
                deadline = time.monotonic() + self.cancel_grace
                with self._cond:
                    for job_id in found:
                        self._cancelled.setdefault(job_id, deadline)
            now = time.monotonic()
            with self._cond:
                running = {d.id: slot for slot, d in self._running.items()}
                for job_id in [i for i in self._cancelled
                               if i not in running and i not in self._held]:
                    del self._cancelled[job_id]
                    told.discard(job_id)
                cancelled = list(self._cancelled.items())
            for job_id, deadline in cancelled:
                slot = running.get(job_id)
                if slot is None:
                    continue
                if job_id not in told:
                    told.add(job_id)
                    log.info("job worker %s: job %s was cancelled; stopping it", self.name, job_id)
                    self._executors[slot].cancel(job_id, hard=False)
                elif now >= deadline:
                    log.warning("job worker %s: cancelled job %s still runs after %.3gs; stopping "
                                "it by force", self.name, job_id, self.cancel_grace)
                    self._executors[slot].cancel(job_id, hard=True)
                    with self._cond:
                        self._cancelled[job_id] = float("inf")  # stopped once is enough

    def _slot(self, index: int) -> None:
        try:
            self._executors[index].prepare()
        except Exception:
            log.exception("job worker %s: could not start a child process", self.name)
        while True:
            d = self._inbox.get()
            if d is None:
                return
            if self._stopping.is_set():
                self._try(lambda d=d: self.broker.release(d.id, d.token))  # type: ignore[misc]
                self._forget(d)
                continue
            if d.id in self._cancelled:  # cancelled while prefetched: nothing to run
                self._forget(d)
                continue
            with self._cond:
                self._running[index] = d
            try:
                self._execute(index, d)
            except _GaveUp:
                pass
            except Exception:
                log.exception("job worker %s: error while handling job %s", self.name, d.id)
            finally:
                with self._cond:
                    self._running.pop(index, None)
                self._forget(d)
                self.processed += 1
            executor = self._executors[index]
            if isinstance(executor, ChildExecutor) and not self._stopping.is_set():
                try:
                    why = executor.recycle_if_due()
                except Exception:
                    log.exception("job worker %s: could not replace a child process", self.name)
                else:
                    if why:
                        log.info("job worker %s: slot %d has a new child process: %s", self.name,
                                 index, why)

    # ----------------------------------------------------------------- one attempt

    def _dead(self, d: Delivery, error: str) -> None:
        log.error("job worker %s: job %s goes to the dead-letter list: %s", self.name, d.id, error)
        self._call(lambda: self.broker.fail(d.id, d.token, error, None, None, None))

    def _execute(self, slot: int, d: Delivery) -> None:
        try:
            message = decode(d.message)
        except Exception as exc:
            self._dead(d, f"UndecodableMessage: {type(exc).__name__}: {exc}")
            return
        job = self.app.jobs.get(message.name)
        if job is None:
            self._dead(d, f"UnknownJob: this worker's app defines no job named {message.name!r}")
            return
        # Nothing from the broker is unpickled before its signature is checked here, in this
        # process: the executor (thread or child) gets verified pickles only.
        signer = self.app.signer
        try:
            payload = unwrap(signer, args_context(d.id, message.name, message.parents,
                                                  message.pass_results),
                             message.payload, f"the arguments of job {d.id} ({message.name})")
        except BadSignature as exc:
            self._dead(d, f"BadSignature: {exc}")
            return
        message = structs.replace(message, payload=payload)
        parents: list[bytes] = []
        if message.parents and message.pass_results:
            records = self._call(lambda: self.broker.get_many(message.parents))
            for pid, record in zip(message.parents, records):
                if record is None or record.status != "succeeded" or record.result is None:
                    self._dead(d, f"ParentResultMissing: the result of parent job {pid} is gone")
                    return
                try:
                    parents.append(unwrap(signer, result_context(pid), record.result,
                                          f"the result of parent job {pid} ({record.name})"))
                except BadSignature as exc:
                    self._dead(d, f"BadSignature: {exc}")
                    return
        started = time.perf_counter()
        outcome = self._executors[slot].run(job, message, parents)
        took = time.perf_counter() - started
        if self._abandon.is_set():
            return  # handed back already
        if d.id in self._cancelled:  # the broker refuses its ack or fail: do not ask
            log.info("job worker %s: cancelled job %s stopped (%s)", self.name, d.id,
                     "finished anyway" if outcome.ok else outcome.error)
            self.stats.record(message.queue, message.name, "cancelled", took)
            return
        self.stats.record(message.queue, message.name, self._finish(d, message, outcome), took)

    def _finish(self, d: Delivery, message: JobMessage, outcome: Outcome) -> str:
        """Ack or fail the attempt; the outcome's name for the metrics."""
        signer = self.app.signer
        if outcome.ok:
            assert outcome.result is not None
            result = sign(signer, result_context(d.id), outcome.result)
            done = self._call(lambda: self.broker.ack(d.id, d.token, result))
            return "succeeded" if done else "stale"
        exception = sign_optional(signer, error_context(d.id), outcome.exception)
        retry_at = next_attempt_at(message, d.attempt, self.broker.clock(), outcome.retryable,
                                   self._rand.random())
        if retry_at is None:
            log.warning("job worker %s: job %s (%s) failed for good after %d attempts: %s",
                        self.name, d.id, message.name, d.attempt, outcome.error)
        done = self._call(lambda: self.broker.fail(d.id, d.token, outcome.error,
                                                   outcome.traceback, exception, retry_at))
        if not done:
            return "stale"
        return "failed" if retry_at is None else "retried"
