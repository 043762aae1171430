"""`JobQueue`: the application object that jobs and schedules are registered on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from .broker import Broker
from .definition import JobFunction, JobOptions, check_priority, seconds
from .errors import DuplicateJob
from .job import Job
from .policy.leases import DEFAULT_LEASE, check_lease
from .schedules import CatchUp, Schedule, every_seconds

if TYPE_CHECKING:
    from .worker import Worker

P = ParamSpec("P")
R = TypeVar("R")


class JobQueue:
    """Jobs, schedules and the broker they go through.

    ``url``: ``"sqlite:///jobs.db"`` (one machine, the default), ``"redis://host:6379/0"``
    (many machines) or ``"memory://"`` (tests, one process). The broker is opened on first
    use, so defining an app at import time connects to nothing. ``lease``: seconds a job
    worker holds a job between heartbeats before another may take it over."""

    def __init__(self, url: str = "sqlite:///jobs.db", *, lease: float = DEFAULT_LEASE,
                 broker: Broker | None = None) -> None:
        self.url = broker.url if broker is not None else url
        self.lease = check_lease(lease)
        self.jobs: dict[str, JobFunction[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        self._broker = broker
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<JobQueue {self.url} jobs={len(self.jobs)} schedules={len(self.schedules)}>"

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    from .brokers import open_broker

                    self._broker = open_broker(self.url)
        return self._broker

    def close(self) -> None:
        """Close the broker's connections (it reopens on next use). A ``memory://`` broker
        is kept: its jobs live nowhere else."""
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
            ) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...

    def job(self, fn: Callable[P, R] | None = None, /, *, name: str | None = None,
            queue: str = "default", retries: int = 3, backoff: timedelta | float = 1.0,
            backoff_max: timedelta | float = 3600.0, priority: int = 0,
            time_limit: timedelta | float | None = None,
            retry_on: tuple[type[BaseException], ...] = (Exception,),
            ) -> JobFunction[P, R] | Callable[[Callable[P, R]], JobFunction[P, R]]:
        """Register a job, as ``@app.job`` or ``@app.job(retries=5, queue="mail")``.

        ``retries``: attempts after the first; ``backoff``: seconds before the first retry,
        doubling each time up to ``backoff_max`` (with ±25% jitter); ``retry_on``: only
        these exceptions are retried; ``time_limit``: seconds one attempt may run;
        ``priority``: higher first, in [-1000, 1000]; ``name``: defaults to
        ``module.qualname``, which must be the same in producers and workers."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")

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

    def get(self, job_id: str) -> Job:
        """The handle of a job by id (it may have been enqueued elsewhere)."""
        return Job(job_id, self.broker)

    def worker(self, **options: Any) -> Worker:
        """A `Worker` for this app, to run in this process (``with app.worker(): ...``)."""
        from .worker import Worker

        return Worker(self, **options)
