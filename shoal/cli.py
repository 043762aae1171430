"""The `shoal` command: scheduler, worker and demo."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

import click

from . import config
from .config_cli import ConfiguredCommand, config_group
from .security.cli import (
    check_key_permissions,
    frame_limits_option,
    resolve_token,
    security_from_options,
    server_options,
)
from .journal.records import JournalError
from .security.credentials import SecurityError
from .security.policy import (
    SCHEDULER_FRAME_LIMITS,
    WORKER_FRAME_LIMITS,
    InsecureBindError,
    check_bind,
)
from .utils.loop import run

DEFAULT_PORT = 8786


def _setup_logging(level: str) -> None:
    from .diagnostics.logs import setup_cli_logging

    setup_cli_logging(level)


#: ``--log-level`` of the servers: one flag; logging.level of shoal.config (SHOAL_LOG_LEVEL)
_log_level = click.option(
    "--log-level", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Logging level of shoal's loggers [env: SHOAL_LOG_LEVEL].")  # fmt: skip


async def _serve_until_signal(server: Any, started: str,
                              after_start: Callable[[], None] | None = None) -> None:
    # Handlers first: whoever reads the address may signal us right after it is printed.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if after_start is not None:
        after_start()
    if getattr(server, "dashboard_link", ""):
        click.echo(f"shoal dashboard at {server.dashboard_link}", err=False)
    click.echo(started.format(address=server.address), err=False)
    waiter = asyncio.ensure_future(server.finished())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await server.close()
    waiter.cancel()
    await asyncio.gather(waiter, stopper, return_exceptions=True)


def parse_resources(text: str) -> dict[str, float]:
    """`config.parse_resources`, a bad item being a usage error of ``--resources``."""
    try:
        return config.parse_resources(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resources") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal")
def main() -> None:
    """shoal: run Python futures and task graphs across many machines.

    Start a scheduler, then workers that join it; connect with shoal.Client(ADDRESS).
    shoal.Client() with no address starts a local cluster instead.
    """


@main.command(cls=ConfiguredCommand)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int,
              help="Port to listen on (0 picks a free one).")
@click.option("--token", default=None,
              help="Shared secret every client and worker must present; 'auto' generates one"
                   " into --token-file [env: SHOAL_TOKEN].")
@server_options
@_log_level
@click.option("--worker-ttl", default=30.0, show_default=True, type=float,
              help="Seconds of silence after which a worker is removed and its work moved.")
@click.option("--dashboard-address", default=":8787", show_default=True,
              help="[HOST]:PORT of the web dashboard, JSON API and /metrics (HOST defaults to"
                   " --host; a port in use falls back to a free one).")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True,
              help="Serve the dashboard.")
@click.option("--jobs-url", default=None,
              help="A shoal.jobs queue for the dashboard and /metrics to show: a broker URL"
                   " (sqlite:///jobs.db, redis://host) or MODULE:APP (which shows its"
                   " schedules too).")
@click.option("--journal", default=None, type=click.Path(dir_okay=False),
              help="Record every state change in this file; started on an existing journal,"
                   " the scheduler replays it and carries on (see docs/journal.md).")
@click.option("--journal-fsync-interval", default=0.05, show_default=True, type=float,
              help="Seconds between fsyncs of the journal (the most a kill may lose).")
@click.option("--restart-grace", default=30.0, show_default=True, type=float,
              help="After a replay, seconds for the previous run's clients to come back"
                   " before their holds end.")
def scheduler(host: str, port: int, token: str | None, tls_ca_file: str | None,
              tls_cert: str | None, tls_key: str | None, insecure: bool,
              token_file: str | None, max_frame_bytes: str, log_level: str, worker_ttl: float,
              dashboard_address: str, dashboard: bool, jobs_url: str | None,
              journal: str | None, journal_fsync_interval: float,
              restart_grace: float) -> None:  # fmt: skip
    """Run a scheduler; prints the address workers and clients connect to.

    Beyond loopback it needs TLS (--tls-*) or a token (--token, --token auto), or
    --insecure: whoever can reach it can run code on the workers.
    """
    from .scheduler import Scheduler

    _setup_logging(log_level)
    security = security_from_options(tls_ca_file, tls_cert, tls_key)
    check_key_permissions(tls_key)
    limits = frame_limits_option(max_frame_bytes, SCHEDULER_FRAME_LIMITS)
    # A --token-file counts as a token here (it is read just below, with its own errors).
    _check_bind(f"{'tls' if security else 'tcp'}://{host}:{port}", security,
                token or token_file, insecure, "the scheduler")  # fmt: skip
    token = resolve_token(token, token_file, may_generate=True)
    try:
        server = Scheduler(host, port, token=token, worker_ttl=worker_ttl,
                           dashboard_address=dashboard_address if dashboard else None,
                           jobs=jobs_url, security=security, insecure=insecure,
                           frame_limits=limits, journal=journal,
                           journal_fsync_interval=journal_fsync_interval,
                           restart_grace=restart_grace)  # fmt: skip
    except ValueError as exc:
        hint = ("--journal-fsync-interval" if "fsync" in str(exc) else "--restart-grace"
                if "restart_grace" in str(exc) else "--dashboard-address")  # fmt: skip
        raise click.BadParameter(str(exc), param_hint=hint) from None
    try:
        run(_serve_until_signal(server, "shoal scheduler listening at {address}"))
    except (InsecureBindError, SecurityError, JournalError) as exc:
        raise click.ClickException(str(exc)) from None


def _check_bind(address: str, security: object, token: str | None, insecure: bool,
                what: str) -> None:  # fmt: skip
    """Fail before anything starts (`Scheduler` and `Worker` check again themselves)."""
    try:
        check_bind(address, tls=security is not None, token=token, insecure=insecure, what=what)
    except InsecureBindError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(cls=ConfiguredCommand)
@click.argument("scheduler_address")
@click.option("--nthreads", default=1, show_default=True, type=int,
              help="Threads that run tasks in this worker.")
@click.option("--name", default=None, help="A name for this worker (default: worker-PID).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface this worker listens on for peers fetching its data.")
@click.option("--port", default=0, show_default=True, type=int, help="Port for peers (0: any).")
@click.option("--token", default=None,
              help="Shared secret the scheduler expects [env: SHOAL_TOKEN].")
@server_options
@click.option("--memory-limit", default="auto", show_default=True,
              help='Memory this worker may use: bytes, a size ("4GB", "512MiB"), a fraction of'
                   ' the machine ("0.5"), "auto" (the machine\'s memory) or 0 (no limit).')
@click.option("--memory-fractions", default="0.6,0.7,0.8,0.95,0.1", show_default=True,
              help="Fractions of the memory limit: TARGET (spill results beyond it), SPILL"
                   " (keep the process's memory under it by spilling), PAUSE (start no new"
                   " task above it), TERMINATE (the nanny restarts the worker), TRANSFER"
                   " (inputs fetched from peers at once); 'none' turns one off.")
@click.option("--nanny/--no-nanny", default=True, show_default=True,
              help="Run the worker in a child process that a nanny restarts when it dies or"
                   " outgrows its memory (--no-nanny: in this process).")
@click.option("--resources", default="", help='Abstract resources tasks can ask for, e.g. "GPU=2,MEM=16e9".')
@click.option("--connect-timeout", default=10.0, show_default=True, type=float,
              help="Seconds to wait for the scheduler before giving up.")
@click.option("--heartbeat-interval", default=0.5, show_default=True, type=float,
              help="Seconds between heartbeats to the scheduler.")
@click.option("--death-timeout", default=60.0, show_default=True, type=float,
              help="Seconds to keep trying to reconnect to a lost scheduler before exiting.")
@_log_level
@click.option("--dashboard-address", default=":0", show_default=True,
              help="[HOST]:PORT of the worker's /metrics and /health server (HOST defaults to"
                   " --host; :0 a free port). Its URL is told to the scheduler.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True,
              help="Serve /metrics and /health.")
@click.option("--lifetime", default=None, type=float,
              help="Seconds after which the worker retires gracefully (its results move to"
                   " other workers, then it exits 0): set it under a batch job's walltime.")
@click.option("--lifetime-stagger", default=0.0, show_default=True, type=float,
              help="Take a random 0..N seconds off --lifetime, so workers started together"
                   " leave at different times.")
def worker(scheduler_address: str, nthreads: int, name: str | None, host: str, port: int,
           token: str | None, tls_ca_file: str | None, tls_cert: str | None,
           tls_key: str | None, insecure: bool, token_file: str | None, max_frame_bytes: str,
           memory_limit: str, memory_fractions: str, nanny: bool,
           resources: str, connect_timeout: float, heartbeat_interval: float,
           death_timeout: float, log_level: str, dashboard_address: str,
           dashboard: bool, lifetime: float | None, lifetime_stagger: float) -> None:
    """Run a worker that joins the scheduler at SCHEDULER_ADDRESS (e.g. tcp://host:8786).

    By default a nanny (this process) runs the worker in a child process and starts a new
    one when it dies; SIGTERM or SIGINT stops both.
    """
    from .worker.memory import MemoryFractions, parse_memory_limit

    _setup_logging(log_level)
    security = security_from_options(tls_ca_file, tls_cert, tls_key)
    check_key_permissions(tls_key)
    limits = frame_limits_option(max_frame_bytes, WORKER_FRAME_LIMITS)
    token = resolve_token(token, token_file, may_generate=False)
    _check_bind(f"{'tls' if security else 'tcp'}://{host}:{port}", security, token, insecure,
                "the worker")  # fmt: skip
    try:
        limit = parse_memory_limit(memory_limit)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory-limit") from None
    try:
        fractions = MemoryFractions.parse(memory_fractions)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory-fractions") from None
    if lifetime is not None:
        from .worker.lifetime import effective_lifetime

        try:
            lifetime = effective_lifetime(lifetime, lifetime_stagger)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--lifetime") from None
    if nanny:
        _run_nanny(scheduler_address, nthreads=nthreads, name=name, host=host, port=port,
                   token=token, memory_limit=limit, memory_fractions=fractions,
                   resources=parse_resources(resources), security=security, insecure=insecure,
                   worker_args=["--connect-timeout", str(connect_timeout),
                                "--max-frame-bytes", max_frame_bytes,
                                "--heartbeat-interval", str(heartbeat_interval),
                                "--death-timeout", str(death_timeout), "--log-level", log_level,
                                *(["--lifetime", str(lifetime)] if lifetime else []),
                                *(["--dashboard-address", dashboard_address] if dashboard
                                  else [])])  # fmt: skip
        return
    from .worker.server import Worker

    server = Worker(scheduler_address, nthreads=nthreads, name=name, host=host, port=port,
                    token=token, memory_limit=limit, connect_timeout=connect_timeout,
                    resources=parse_resources(resources), heartbeat_interval=heartbeat_interval,
                    reconnect_timeout=death_timeout, memory_fractions=fractions,
                    dashboard_address=dashboard_address if dashboard else None,
                    security=security, insecure=insecure, frame_limits=limits)
    lifetime_tasks: list[asyncio.Future[None]] = []  # a reference, so it is not collected

    def after_start() -> None:
        if lifetime:  # see shoal.worker.lifetime
            from .worker.lifetime import retire_at_lifetime

            lifetime_tasks.append(asyncio.ensure_future(retire_at_lifetime(server, lifetime)))

    try:
        run(_serve_until_signal(server, "shoal worker listening at {address}", after_start))
    except (ConnectionError, InsecureBindError, ValueError) as exc:  # bad address, TLS mix-up
        raise click.ClickException(str(exc)) from exc


def _run_nanny(scheduler_address: str, name: str | None, **options: Any) -> None:
    """``shoal worker`` with a nanny: the worker in a child process, restarted on death."""
    from .cluster.nanny import Nanny, WorkerStartError

    def started(nanny: Nanny) -> None:
        if nanny.status == "restarting":
            click.echo(f"shoal worker restarted, listening at {nanny.address}")

    supervisor = Nanny(scheduler_address, name=name or f"worker-{os.getpid()}", on_start=started,
                       **options)  # fmt: skip
    try:
        run(_serve_until_signal(supervisor, "shoal worker listening at {address}"))
    except WorkerStartError as exc:
        raise click.ClickException(str(exc)) from exc
    if supervisor.status == "failed":
        raise click.ClickException(supervisor.error)


@main.command()
@click.option("--tasks", default=10_000, show_default=True, type=int,
              help="Monte Carlo tasks to run.")
@click.option("--n-workers", default=None, type=int, help="Worker processes (default: one per core).")
def demo(tasks: int, n_workers: int | None) -> None:
    """A short showcase on a local cluster: Monte Carlo, a task graph, an error."""
    from .demo import run_demo

    run_demo(tasks=tasks, n_workers=n_workers or os.cpu_count() or 1)


def _add_jobs_commands() -> None:
    """``shoal jobs ...``: durable job workers and queue tools (shoal.jobs)."""
    from .jobs.cli import jobs

    main.add_command(jobs)


def _add_certs_commands() -> None:
    """``shoal certs init|issue``: the cluster's TLS certificates."""
    from .security.cli import certs

    main.add_command(certs)


_add_certs_commands()
main.add_command(config_group)  # shoal config show


_add_jobs_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
