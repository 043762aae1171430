"""`JobQueue`: the application object that jobs and schedules are registered on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import batch as _batch
from .batch import Batch
from .broker import Broker
from .definition import JobFunction, JobOptions, check_priority, seconds
from .errors import DuplicateJob
from .job import Job
from .message import JobMessage
from .policy.leases import DEFAULT_LEASE, check_lease
from .policy.limits import check_concurrency, parse_rate
from .schedules import CatchUp, Schedule, every_seconds
from .signing import SecretSetting, Signer

if TYPE_CHECKING:
    from .worker import Worker

P = ParamSpec("P")
R = TypeVar("R")


class JobQueue:
    """Jobs, schedules and the broker they go through.

    ``url``: ``"sqlite:///jobs.db"`` (one machine, the default), ``"redis://host:6379/0"``
    (many machines) or ``"memory://"`` (tests, one process). The broker is opened on first
    use, so defining an app at import time connects to nothing. ``lease``: seconds a job
    worker holds a job between heartbeats before another may take it over.

    ``secret``: sign every stored pickle (arguments, results, exceptions) with HMAC-SHA256,
    and unpickle nothing whose signature is missing or wrong (job workers dead-letter such
    a job; ``result()`` raises `BadSignature`). One secret of at least 16 bytes, or a list
    (the first signs, any verifies: for rotation). Default: ``$SHOAL_JOBS_SECRET`` (comma
    separated). Without either, anyone who can write to the broker can run code on every
    job worker (see docs/jobs-signing.md).

    ``result_ttl``: seconds a finished job's record and result are kept (per job:
    ``@app.job(result_ttl=)``); expired ones are deleted by the brokers' own calls, with no
    process to run, and ``result()`` on one raises `ResultExpired`. None: until purged."""

    def __init__(self, url: str = "sqlite:///jobs.db", *, lease: float = DEFAULT_LEASE,
                 broker: Broker | None = None, secret: SecretSetting | None = None,
                 result_ttl: timedelta | float | None = None) -> None:
        self.url = broker.url if broker is not None else url
        self.lease = check_lease(lease)
        #: seconds finished jobs are kept, unless a job says otherwise (None: until purged)
        self.result_ttl = seconds(result_ttl, "result_ttl")
        #: signs and checks stored pickles; None: unsigned (``secret`` and the env var unset)
        self.signer: Signer | None = Signer.from_setting(secret)
        self.jobs: dict[str, JobFunction[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        self._broker = broker
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        signed = "" if self.signer is None else " signed"
        return (f"<JobQueue {self.url}{signed} jobs={len(self.jobs)} "
                f"schedules={len(self.schedules)}>")

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    from .brokers import open_broker

                    self._broker = open_broker(self.url)
        return self._broker

    def close(self) -> None:
        """Send the jobs of an open ``app.batch()`` block of this context, then close the
        broker's connections (it reopens on next use). A ``memory://`` broker is kept: its
        jobs live nowhere else."""
        open_batch = _batch.current.get()
        if open_batch is not None and open_batch.app is self:
            open_batch.flush()
        with self._lock:
            broker = self._broker
            if broker is None or not broker.shared:
                return
            self._broker = None
        broker.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ registering

    @overload
    def job(self, fn: Callable[P, R], /) -> JobFunction[P, R]: ...

    @overload
    def job(self, fn: None = None, /, *, name: str | None = ..., queue: str = ...,
            retries: int = ..., backoff: timedelta | float = ...,
            backoff_max: timedelta | float = ..., priority: int = ...,
            time_limit: timedelta | float | None = ...,
            retry_on: tuple[type[BaseException], ...] = ...,
            result_ttl: timedelta | float | None = ...,
            rate_limit: str | None = ..., max_concurrency: int | None = ...,
            limit_key: Callable[..., Any] | None = ...,
            ) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...

    def job(self, fn: Callable[P, R] | None = None, /, *, name: str | None = None,
            queue: str = "default", retries: int = 3, backoff: timedelta | float = 1.0,
            backoff_max: timedelta | float = 3600.0, priority: int = 0,
            time_limit: timedelta | float | None = None,
            retry_on: tuple[type[BaseException], ...] = (Exception,),
            result_ttl: timedelta | float | None = None,
            rate_limit: str | None = None, max_concurrency: int | None = None,
            limit_key: Callable[..., Any] | None = None,
            ) -> JobFunction[P, R] | Callable[[Callable[P, R]], JobFunction[P, R]]:
        """Register a job, as ``@app.job`` or ``@app.job(retries=5, queue="mail")``.

        ``retries``: attempts after the first; ``backoff``: seconds before the first retry,
        doubling each time up to ``backoff_max`` (with ±25% jitter); ``retry_on``: only
        these exceptions are retried; ``time_limit``: seconds one attempt may run;
        ``priority``: higher first, in [-1000, 1000]; ``name``: defaults to
        ``module.qualname``, which must be the same in producers and workers.
        ``result_ttl``: seconds its finished records are kept (default: the app's).
        ``rate_limit`` (``"100/m"``) and ``max_concurrency``: limits across every worker,
        enforced by the broker; a job over its limit waits. ``limit_key``: a function of
        the job's arguments; the limits then hold per value (e.g. per user)."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        rate = None if rate_limit is None else parse_rate(rate_limit)
        check_concurrency(max_concurrency)
        if limit_key is not None and rate is None and max_concurrency is None:
            raise ValueError("limit_key= needs rate_limit= or max_concurrency=")

        def register(f: Callable[P, R]) -> JobFunction[P, R]:
            options = JobOptions(
                name=name or f"{f.__module__}.{f.__qualname__}",
                queue=queue,
                retries=retries,
                backoff=seconds(backoff, "backoff") or 0.0,
                backoff_max=seconds(backoff_max, "backoff_max") or 0.0,
                priority=check_priority(priority),
                time_limit=seconds(time_limit, "time_limit"),
                retry_on=tuple(retry_on),
                result_ttl=seconds(result_ttl, "result_ttl"),
                rate=rate,
                max_concurrency=max_concurrency,
                limit_key=limit_key,
            )
            if options.name in self.jobs:
                raise DuplicateJob(f"a job named {options.name!r} is registered already")
            jf = JobFunction(self, f, options)
            self.jobs[options.name] = jf
            return jf

        return register if fn is None else register(fn)

    def periodic(self, cron: str | None = None, *, every: timedelta | float | None = None,
                 tz: str = "UTC", catch_up: CatchUp = "skip", args: tuple[Any, ...] = (),
                 kwargs: dict[str, Any] | None = None, name: str | None = None,
                 **job_options: Any) -> Callable[[Callable[..., R]], JobFunction[..., R]]:
        """Register a job that job workers enqueue on a schedule: a cron expression
        (``"*/5 * * * *"``, read in time zone ``tz``) or a fixed interval (``every=``).
        Each slot runs once however many workers run schedulers. ``catch_up``: what to do
        about slots missed while no scheduler ran: ``"skip"`` them or run ``"once"``.
        Other keywords are `job` options."""

        def register(f: Callable[..., R]) -> JobFunction[..., R]:
            jf: JobFunction[..., R] = self.job(name=name, **job_options)(f)
            schedule = Schedule(
                name=jf.name, job=jf.name, cron=cron,
                every=None if every is None else every_seconds(every), tz=tz,
                catch_up=catch_up, args=tuple(args), kwargs=dict(kwargs or {}),
            )
            self.schedules[schedule.name] = schedule
            return jf

        return register

    # ------------------------------------------------------------ using

    def enqueue_many(self, messages: Iterable[JobMessage]) -> list[Job]:
        """Store many jobs, from `JobFunction.prepare`, in few broker calls (memory: one;
        SQLite: one transaction; Redis: one script call per 1,000); their handles, in order.

        The same as enqueueing each in turn (keys already used, here or earlier in the
        batch, return the existing job with ``created`` False; a job may come after an
        earlier one of the batch), except that an unknown parent raises ``KeyError`` before
        anything is stored. Inside ``app.batch()`` the batch is sent first, to keep order."""
        batch = list(messages)
        open_batch = _batch.current.get()
        if open_batch is not None and open_batch.app is self:
            open_batch.flush()
        broker = self.broker
        return [Job(job_id, broker, created, signer=self.signer)
                for job_id, created in broker.enqueue_many(batch)]

    def batch(self, size: int = 500) -> Batch:
        """``with app.batch(): ...``: jobs enqueued in the block (``delay``, ``enqueue``,
        this app, this thread or task) are sent ``size`` at a time with `enqueue_many`, and
        the rest when the block ends, even by an exception.

        Durability: ``delay()`` returns at once, and the job is stored only when its batch
        is sent. A crash (or ``os._exit``) inside the block loses jobs not sent yet;
        leaving the block, ``batch.flush()``, ``app.close()`` or reading a handle
        (``status``, ``result()``...) sends them. Outside a block, ``delay()`` returns only
        once the job is stored, as always."""
        return Batch(self, size)

    def _submit(self, message: JobMessage) -> Job:
        open_batch = _batch.current.get()
        if open_batch is not None and open_batch.app is self:
            return open_batch.add(message)
        job_id, created = self.broker.enqueue(message)
        return Job(job_id, self.broker, created, signer=self.signer)

    def get(self, job_id: str) -> Job:
        """The handle of a job by id (it may have been enqueued elsewhere)."""
        return Job(job_id, self.broker, signer=self.signer)

    def worker(self, **options: Any) -> Worker:
        """A `Worker` for this app, to run in this process (``with app.worker(): ...``)."""
        from .worker import Worker

        return Worker(self, **options)
