"""``shoal jobs ...``: run job workers and look after a queue.

QUEUE arguments take a broker URL (``sqlite:///jobs.db``, ``redis://host``) or an app
reference ``module:attribute`` (whose broker is then used).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from .app import JobQueue
    from .broker import Broker


def load_app(ref: str) -> JobQueue:
    """``"package.module:attr"`` -> the `JobQueue` there (the current directory is importable)."""
    import importlib

    from .app import JobQueue

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"{ref!r} is not MODULE:ATTRIBUTE (e.g. myapp:app)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {ref!r}: {exc}") from exc
    if not isinstance(found, JobQueue):
        raise click.BadParameter(f"{ref!r} is a {type(found).__name__}, not a shoal.jobs.JobQueue")
    return found


def open_queue(target: str) -> Broker:
    if "://" in target:
        from .brokers import open_broker

        try:
            return open_broker(target)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return load_app(target).broker


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _short(text: str | None, width: int = 70) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


@click.group()
def jobs() -> None:
    """Durable background jobs: workers, and tools to inspect and repair a queue."""


@jobs.command()
@click.argument("app_ref", metavar="APP")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Jobs run at once by this worker.")
@click.option("--queues", "-Q", default="default", show_default=True,
              help="Comma-separated queues to take jobs from.")
@click.option("--pool", default="threads", show_default=True,
              type=click.Choice(["threads", "processes"]),
              help="Run jobs in threads, or in child processes (hard time limits).")
@click.option("--prefetch", default=None, type=click.IntRange(0),
              help="Jobs reserved beyond those running (default: as many as --concurrency).")
@click.option("--lease", default=None, type=float, help="Lease seconds (default: the app's).")
@click.option("--grace", default=30.0, show_default=True, type=float,
              help="Seconds running jobs get to finish after SIGTERM before they are handed back.")
@click.option("--schedules/--no-schedules", default=True, show_default=True,
              help="Also enqueue the app's periodic jobs when due.")
@click.option("--cancel-grace", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Seconds a cancelled running job gets to stop on its own (check_cancelled) "
                   "before it is stopped by force.")
@click.option("--max-jobs-per-child", default=None, type=click.IntRange(1),
              help="Processes pool: replace a slot's child process after this many jobs.")
@click.option("--max-memory-per-child", default=None,
              help="Processes pool: replace a slot's child process after a job that leaves it "
                   "above this resident size (e.g. 500MB, 1GiB).")
@click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics server binds to.")
@click.option("--name", default=None, help="Worker name (default: host-pid-random).")
@click.option("--scheduler", default=None,
              help="A shoal scheduler to connect to at start, so that jobs (in the threads "
                   "pool) can submit work to it with shoal.get_client().")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def worker(app_ref: str, concurrency: int, queues: str, pool: str, prefetch: int | None,
           lease: float | None, grace: float, schedules: bool, cancel_grace: float,
           max_jobs_per_child: int | None, max_memory_per_child: str | None,
           metrics_port: int | None, metrics_host: str,
           name: str | None, scheduler: str | None, log_level: str) -> None:
    """Run a job worker for APP (module:attribute) until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    max_memory = None
    if max_memory_per_child is not None:
        from ..worker.memory import parse_bytes

        try:
            max_memory = parse_bytes(max_memory_per_child)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-memory-per-child") from None
    if pool != "processes" and (max_jobs_per_child or max_memory):
        raise click.UsageError("--max-jobs-per-child and --max-memory-per-child need "
                               "--pool processes")
    app = load_app(app_ref)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    w = app.worker(queues=[q.strip() for q in queues.split(",") if q.strip()],
                   concurrency=concurrency, pool=pool, prefetch=prefetch, lease=lease,
                   grace=grace, schedules=schedules, name=name, cancel_grace=cancel_grace,
                   max_jobs_per_child=max_jobs_per_child, max_memory_per_child=max_memory,
                   metrics_port=metrics_port, metrics_host=metrics_host)
    client = None
    if scheduler is not None:
        from ..client.client import Client

        client = Client(scheduler)
    try:
        w.start()
        click.echo(f"shoal jobs worker {w.name} ready"
                   + (f"; metrics at {w.metrics.url}" if w.metrics is not None else ""), err=False)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        click.echo(f"shoal jobs worker {w.name}: stopping (grace {grace:g}s)", err=True)
        w.stop()
    finally:
        app.close()
        if client is not None:
            client.close()


@jobs.command()
@click.argument("target", metavar="QUEUE")
def status(target: str) -> None:
    """Jobs per queue and status."""
    broker = open_queue(target)
    counts = broker.counts()
    order = ["waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled"]
    rows = [[q, *(str(per.get(s, 0)) for s in order)] for q, per in sorted(counts.items())]
    _table(["queue", *order], rows)
    n_dead = broker.dead_count()
    line = f"dead-letter list: {n_dead} jobs"
    if n_dead:
        latest = broker.dead(limit=_REASONS_OF)
        reasons = Counter(_reason(r.last_error) for r in latest)
        line += (f"; by reason{'' if len(latest) == n_dead else f' (latest {len(latest):,})'}: "
                 + ", ".join(f"{why}: {n}" for why, n in reasons.most_common()))
    click.echo(line)
    broker.close()


#: `status` sums up the reasons of this many dead-lettered jobs (the most recent)
_REASONS_OF = 1000


def _reason(error: str | None) -> str:
    """The error type a dead-letter reason starts with (``BadSignature``, ``ValueError``)."""
    head = (error or "").partition(":")[0].strip()
    return head if head and " " not in head else "other"


@jobs.command("list")
@click.argument("target", metavar="QUEUE")
@click.option("--state", "--status", "status_", default=None,
              type=click.Choice(["waiting", "scheduled", "queued", "running", "succeeded",
                                 "failed", "cancelled", "dead"]))
@click.option("--queue", default=None, help="Only this queue.")
@click.option("--limit", default=50, show_default=True, type=int)
def list_jobs(target: str, status_: Any, queue: str | None, limit: int) -> None:
    """List jobs (finished ones newest first, the rest next-to-run first). Finished jobs
    are the retained history: kept until their result_ttl passes or they are purged."""
    broker = open_queue(target)
    records = broker.list(status_, queue=queue, limit=limit)
    _table(["id", "name", "queue", "status", "attempts", "finished", "run time", "last error"],
           [[r.id, r.name, r.queue, r.status, f"{r.attempts}/{r.max_attempts}", _when(r.finished),
             "" if r.run_time is None else f"{r.run_time:.3f}s", _short(r.last_error)]
            for r in records])
    broker.close()


@jobs.command()
@click.argument("target", metavar="QUEUE")
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--traceback", "show_tb", is_flag=True, help="Print each job's traceback too.")
def dead(target: str, limit: int, show_tb: bool) -> None:
    """The dead-letter list: jobs that failed after their last attempt, or could not run."""
    broker = open_queue(target)
    records = broker.dead(limit=limit)
    _table(["id", "name", "queue", "attempts", "failed at", "error"],
           [[r.id, r.name, r.queue, str(r.attempts), _when(r.finished), _short(r.last_error)]
            for r in records])
    if show_tb:
        for r in records:
            if r.traceback:
                click.echo(f"\n--- {r.id} ({r.name})\n{r.traceback.rstrip()}")
    broker.close()


@jobs.command()
@click.argument("target", metavar="QUEUE")
@click.argument("job_ids", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Retry every job in the dead-letter list.")
def retry(target: str, job_ids: tuple[str, ...], all_dead: bool) -> None:
    """Run dead-lettered jobs again (with fresh attempts)."""
    if not job_ids and not all_dead:
        raise click.UsageError("give job ids or --all-dead")
    broker = open_queue(target)
    ids = list(job_ids) + ([r.id for r in broker.dead(limit=1_000_000)] if all_dead else [])
    done = [i for i in ids if broker.retry(i)]
    for i in set(ids) - set(done):
        click.echo(f"{i}: not in the dead-letter list", err=True)
    click.echo(f"retried {len(done)} jobs")
    broker.close()
    if len(done) < len(set(ids)):
        sys.exit(1)


@jobs.command()
@click.argument("target", metavar="QUEUE")
@click.argument("job_ids", nargs=-1, required=True)
def cancel(target: str, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs (queued, delayed, waiting or running) and their waiting descendants."""
    broker = open_queue(target)
    missed = 0
    for job_id in job_ids:
        if broker.cancel(job_id):
            click.echo(f"{job_id}: cancelled")
            continue
        missed += 1
        record = broker.get(job_id)
        click.echo(f"{job_id}: " + ("no such job" if record is None
                                    else f"not cancelled: it has {record.status} already"), err=True)
    broker.close()
    if missed:
        sys.exit(1)


@jobs.command()
@click.argument("target", metavar="QUEUE")
@click.option("--queue", default=None, help="Only this queue.")
@click.option("--older-than", default=None, type=float,
              help="Only jobs finished more than this many seconds ago.")
@click.option("--pending", is_flag=True, help="Also delete jobs that have not started.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(target: str, queue: str | None, older_than: float | None, pending: bool, yes: bool) -> None:
    """Delete finished jobs (and with --pending, unstarted ones). Running jobs stay."""
    what = "finished" + (" and pending" if pending else "") + " jobs"
    if not yes:
        click.confirm(f"Delete {what}{' in ' + queue if queue else ''}?", abort=True)
    broker = open_queue(target)
    before = None if older_than is None else time.time() - older_than
    n = broker.purge(queue=queue, finished_before=before, pending=pending)
    click.echo(f"purged {n} jobs")
    broker.close()
