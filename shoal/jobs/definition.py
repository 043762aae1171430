"""`JobFunction`: a function registered with `JobQueue.job`, and how it is enqueued."""

from __future__ import annotations

import time
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .message import MAX_PRIORITY, MIN_PRIORITY, JobMessage, KeyUntil
from .payload import dump_arguments
from .policy.keys import check_key_until
from .policy.limits import limit_key_of
from .signing import args_context, sign

if TYPE_CHECKING:
    from .app import JobQueue
    from .job import Job

P = ParamSpec("P")
R = TypeVar("R")


def seconds(value: timedelta | float | None, what: str) -> float | None:
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out < 0:
        raise ValueError(f"{what} must not be negative, not {value!r}")
    return out


def new_job_id(now: float) -> str:
    """32 hex digits: milliseconds since the epoch (12), then 80 random bits (20), like a
    UUIDv7. Ids made one after the other sort together, so a broker's id index grows at its
    end instead of at random places (SQLite's enqueue rate stays flat as the table grows)."""
    return f"{int(now * 1000) & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


def check_priority(priority: int) -> int:
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], not {priority}")
    return int(priority)


@dataclass(frozen=True)
class JobOptions:
    """A job's defaults; `enqueue` may override some per call."""

    name: str
    queue: str = "default"
    retries: int = 3
    backoff: float = 1.0  #: seconds before the first retry, doubling each time
    backoff_max: float = 3600.0
    priority: int = 0
    time_limit: float | None = None
    #: exceptions worth retrying; any other fails the job at once
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    result_ttl: float | None = None  #: seconds a finished record is kept (None: the app's)
    rate: float | None = None  #: seconds between starts across the cluster (``rate_limit``)
    max_concurrency: int | None = None  #: running at once across the cluster
    #: ``limit_key(*args, **kwargs)``: count the limits per this value, not per job
    limit_key: Callable[..., Any] | None = None


class JobFunction(Generic[P, R]):
    """A job: call it to run it here, `delay` or `enqueue` it to run on a job worker."""

    def __init__(self, app: JobQueue, fn: Callable[P, R], options: JobOptions) -> None:
        self.app = app
        self.fn = fn
        self.options = options
        self.name = options.name
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<JobFunction {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue a call with the job's default options."""
        return self.enqueue(args=args, kwargs=kwargs)

    def enqueue(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        delay: timedelta | float | None = None,
        at: datetime | float | None = None,
        priority: int | None = None,
        key: str | None = None,
        queue: str | None = None,
        after: Iterable[Job | JobMessage | str] = (),
        pass_results: bool = True,
        retries: int | None = None,
        time_limit: timedelta | float | None = None,
        key_until: KeyUntil = "forever",
        unique_for: timedelta | float | None = None,
        result_ttl: timedelta | float | None = None,
    ) -> Job:
        """Store a call to run on a job worker; return its `Job` handle.

        ``delay`` (seconds or timedelta) or ``at`` (aware datetime or epoch seconds): not
        before then. ``key``: enqueue is idempotent; a second call with the same key
        returns the first job (``handle.created`` is False) while the key holds:
        ``key_until="forever"`` (while the job's record exists), ``"start"`` (until it
        starts), ``"finish"`` (until it finishes), and at most ``unique_for`` seconds
        if given; then the next enqueue with the key stores a new job.
        ``result_ttl``: seconds the finished job's record and result are kept (default:
        the job's, else the app's; None: until purged). ``after``: jobs that must
        succeed first; then this one is called as ``fn(*parent_results, *args, **kwargs)``
        with their results in the order given (``pass_results=False``: ``fn(*args,
        **kwargs)``). If one of them fails or is cancelled, so is this job.
        Arguments that cannot be pickled raise `shoal.SerializationError` naming them.
        Inside ``with app.batch():`` the job is kept and sent with the batch."""
        return self.app._submit(self.prepare(
            args, kwargs, delay=delay, at=at, priority=priority, key=key, queue=queue,
            after=after, pass_results=pass_results, retries=retries, time_limit=time_limit,
            key_until=key_until, unique_for=unique_for, result_ttl=result_ttl))

    def prepare(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        delay: timedelta | float | None = None,
        at: datetime | float | None = None,
        priority: int | None = None,
        key: str | None = None,
        queue: str | None = None,
        after: Iterable[Job | JobMessage | str] = (),
        pass_results: bool = True,
        retries: int | None = None,
        time_limit: timedelta | float | None = None,
        key_until: KeyUntil = "forever",
        unique_for: timedelta | float | None = None,
        result_ttl: timedelta | float | None = None,
    ) -> JobMessage:
        """The envelope `enqueue` would store, not stored: give many to
        `JobQueue.enqueue_many`. Same arguments as `enqueue`; ``after`` may name envelopes
        sent earlier in the same `enqueue_many` call."""
        from .job import Job

        opts = self.options
        now = time.time()
        eta = 0.0
        if delay is not None and at is not None:
            raise ValueError("give delay= or at=, not both")
        if delay is not None:
            eta = now + (seconds(delay, "delay") or 0.0)
        elif at is not None:
            if isinstance(at, datetime):
                if at.tzinfo is None:
                    raise ValueError("at= must be an aware datetime (with tzinfo) or epoch seconds")
                eta = at.timestamp()
            else:
                eta = float(at)
        parents = tuple(p.id if isinstance(p, (Job, JobMessage)) else str(p) for p in after)
        n_retries = opts.retries if retries is None else retries
        if n_retries < 0:
            raise ValueError(f"retries must be >= 0, not {n_retries}")
        job_id = new_job_id(now)
        payload = dump_arguments(self.name, tuple(args), dict(kwargs or {}))
        check_key_until(key_until)
        hold = seconds(unique_for, "unique_for")
        if (hold is not None or key_until != "forever") and key is None:
            raise ValueError("key_until= and unique_for= need a key=")
        ttl = seconds(result_ttl, "result_ttl")
        if ttl is None:
            ttl = opts.result_ttl if opts.result_ttl is not None else self.app.result_ttl
        limited = opts.rate is not None or opts.max_concurrency is not None
        return JobMessage(
            id=job_id,
            name=self.name,
            queue=queue or opts.queue,
            payload=sign(self.app.signer, args_context(job_id, self.name, parents, pass_results),
                         payload),
            priority=check_priority(opts.priority if priority is None else priority),
            max_attempts=n_retries + 1,
            backoff=opts.backoff,
            backoff_max=opts.backoff_max,
            time_limit=opts.time_limit if time_limit is None else seconds(time_limit, "time_limit"),
            eta=eta,
            created=now,
            key=key,
            parents=parents,
            pass_results=pass_results,
            result_ttl=ttl,
            key_until=key_until,
            key_expires=None if hold is None else now + hold,
            limit_key=(limit_key_of(self.name, opts.limit_key, tuple(args), dict(kwargs or {}))
                       if limited else None),
            rate=opts.rate,
            max_concurrency=opts.max_concurrency,
        )

    def enqueue_many(self, calls: Iterable[Sequence[Any]], *, delay: timedelta | float | None = None,
                     at: datetime | float | None = None, priority: int | None = None,
                     queue: str | None = None, retries: int | None = None,
                     time_limit: timedelta | float | None = None) -> list[Job]:
        """Enqueue one job per argument tuple in ``calls``, all with the same options, in a
        few broker calls (`JobQueue.enqueue_many`): ``send.enqueue_many([("ada",), ("bob",)])``.
        For keyword arguments, keys or parents per job, give `prepare` envelopes to
        `JobQueue.enqueue_many`."""
        messages = []
        for args in calls:
            if not isinstance(args, (tuple, list)):
                raise TypeError(f"each call is a tuple of arguments, e.g. [(1,), (2,)], "
                                f"not {type(args).__name__}")
            messages.append(self.prepare(args, delay=delay, at=at, priority=priority,
                                         queue=queue, retries=retries, time_limit=time_limit))
        return self.app.enqueue_many(messages)
