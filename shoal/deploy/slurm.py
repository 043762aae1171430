"""`SlurmCluster`: each worker a Slurm batch job; the scheduler in this process.

The scheduler runs on a thread of this process (the login node, usually), listening on the
address of ``interface`` (e.g. ``"ib0"``, so that workers on the compute nodes reach it over
the network they share), or on ``host``. Its address also goes to a *scheduler file* in
``shared_directory``; a job reads the address from there (``scheduler_file=True``) when the
login node's address as seen from the nodes is not the one we can name here.

Each job runs ``shoal worker`` with the cluster's token (from a 0600 file in
``shared_directory``, never in the script) and ``--lifetime``: ``lifetime_margin`` seconds
less than the walltime, less a random stagger, so that workers retire gracefully (their
results moved to other workers first) before Slurm kills them; the cluster's watcher then
submits a replacement. ``array=True`` submits many workers as one ``sbatch --array`` job.
`close()` runs ``scancel`` on every job it submitted. ``sbatch`` failures are raised by
`scale` and retried by the watcher with exponential back-off, then given up on (see
`shoal.deploy.base`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..security.credentials import Security
from ..utils.loop import LoopThread
from .base import Cluster, ClusterError, LaunchError, WorkerUnit

logger = logging.getLogger("shoal.deploy.slurm")

__all__ = ["SlurmCluster", "default_address", "interface_address", "parse_walltime"]

#: squeue states of a job that still holds (or will hold) a worker
_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
          "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def parse_walltime(text: str) -> int:
    """Slurm's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` -> seconds; a bad value names itself."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"walltime {text!r} is not [D-]HH:MM:SS")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def interface_address(interface: str) -> str:
    """The IPv4 address of network ``interface`` (e.g. "ib0"); an unknown one is an error
    that lists those there are."""
    import psutil

    addresses = psutil.net_if_addrs()
    if interface not in addresses:
        raise ValueError(f"no network interface {interface!r} here (there are:"
                         f" {', '.join(sorted(addresses))})")  # fmt: skip
    for addr in addresses[interface]:
        if addr.family == socket.AF_INET:
            return str(addr.address)
    raise ValueError(f"network interface {interface!r} has no IPv4 address")


def default_address() -> str:
    """This machine's address on its default route (what other machines most likely reach
    it at); the hostname's address if there is no route. Raises when that is loopback
    (Debian maps the hostname to 127.0.1.1): then give ``interface=`` or ``host=``."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a UDP connect sends nothing
            address = str(probe.getsockname()[0])
    except OSError:
        address = socket.gethostbyname(socket.gethostname())
    if address.startswith("127."):
        raise ValueError(f"this machine's address is {address} (loopback), which the compute"
                         " nodes cannot reach: give SlurmCluster(interface=...) or host=")  # fmt: skip
    return address


class SlurmCluster(Cluster):
    """Workers as Slurm jobs (see the module's docstring).

    ``cores``, ``memory`` (e.g. "8GB") and ``walltime`` are each job's request, and what its
    worker uses (``cores`` threads, ``memory`` as its memory limit); ``processes`` workers
    per job is always 1 here. ``queue`` (partition), ``account``, ``job_extra`` (more
    ``#SBATCH`` options, e.g. ``["--qos=high"]``), ``prologue`` (shell lines before the
    worker starts, e.g. ``["module load python"]``), ``python`` (on the nodes; default this
    interpreter), ``worker_extra`` (more ``shoal worker`` options).
    """

    def __init__(
        self,
        cores: int = 1,
        memory: str = "2GB",
        walltime: str = "01:00:00",
        *,
        queue: str | None = None,
        account: str | None = None,
        job_name: str = "shoal-worker",
        job_extra: list[str] | None = None,
        prologue: list[str] | None = None,
        interface: str | None = None,
        host: str | None = None,
        port: int = 0,
        scheduler_file: bool = False,
        shared_directory: str | None = None,
        array: bool = False,
        lifetime: float | None = None,
        lifetime_margin: float | None = None,
        lifetime_stagger: float | None = None,
        python: str | None = None,
        worker_extra: list[str] | None = None,
        dashboard_address: str | None = ":0",
        token: str | None = None,
        security: Security | None = None,
        watch_interval: float = 2.0,
        max_launch_failures: int = 5,
        launch_backoff: float = 1.0,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        scancel: str = "scancel",
        command_timeout: float = 60.0,
    ) -> None:
        super().__init__(token=token, security=security, threads_per_worker=cores,
                         watch_interval=watch_interval, max_launch_failures=max_launch_failures,
                         launch_backoff=launch_backoff)  # fmt: skip
        if cores < 1:
            raise ValueError(f"SlurmCluster: cores must be >= 1, got {cores!r}")
        self.cores = cores
        _slurm_memory(memory)  # a bad size fails here, named
        self.memory = memory
        self.walltime = walltime
        walltime_s = parse_walltime(walltime)
        self.queue = queue
        self.account = account
        self.job_name = job_name
        self.job_extra = list(job_extra or [])
        self.prologue = list(prologue or [])
        self.array = array
        self.python = python or sys.executable
        self.worker_extra = list(worker_extra or [])
        self.sbatch, self.squeue, self.scancel = sbatch, squeue, scancel
        self.command_timeout = command_timeout
        self.scheduler_file = scheduler_file
        margin = lifetime_margin if lifetime_margin is not None else max(60.0, 0.05 * walltime_s)
        #: seconds a worker lives before retiring (None: until the walltime kills it)
        self.lifetime = lifetime if lifetime is not None else (
            walltime_s - margin if walltime_s - margin > 0 else None)  # fmt: skip
        self.lifetime_stagger = lifetime_stagger if lifetime_stagger is not None else (
            min(margin, 0.05 * walltime_s))  # fmt: skip
        if interface is not None and host is not None:
            raise ValueError("SlurmCluster: give interface= or host=, not both")
        self.host = interface_address(interface) if interface else (host or default_address())
        self.interface = interface
        self.port = port
        self.dashboard_address = dashboard_address
        self._owned_directory = shared_directory is None
        self.shared_directory = Path(shared_directory or tempfile.mkdtemp(
            prefix="shoal-slurm-", dir=os.path.expanduser("~")))  # fmt: skip
        self.log_directory = self.shared_directory / "logs"
        #: every job id this cluster submitted (array jobs by their id), for close()
        self.submitted: list[str] = []
        self._counter = 0
        #: job id -> consecutive squeue listings without it
        self._misses: dict[str, int] = {}
        self._loop: LoopThread | None = None
        self._scheduler: Any = None
        try:
            self._start_scheduler()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- scheduler

    def _start_scheduler(self) -> None:
        from ..scheduler import Scheduler

        self.log_directory.mkdir(parents=True, exist_ok=True)
        token_file = self.shared_directory / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        self._loop = LoopThread(name="shoal-slurm-scheduler")
        role = None if self.security is None else self.security.for_role("scheduler")
        self._scheduler = Scheduler(self.host, self.port, token=self.token,
                                    dashboard_address=self.dashboard_address, security=role)  # fmt: skip
        self._loop.run(self._scheduler.start(), timeout=60)
        address = self._scheduler.address
        (self.shared_directory / "scheduler.json").write_text(json.dumps({"address": address}))
        self._started(address)

    def _stop_scheduler(self) -> None:
        if self._loop is not None:
            if self._scheduler is not None:
                self._loop.run(self._scheduler.close(close_workers=True), timeout=30)
                self._scheduler = None
            self._loop.stop()
            self._loop = None
        if self._owned_directory:
            shutil.rmtree(self.shared_directory, ignore_errors=True)

    # -------------------------------------------------------------- job script

    def job_script(self, array_size: int | None = None) -> str:
        """The ``sbatch`` script of one worker job (of an array of ``array_size``)."""
        lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={self.job_name}",
                 f"#SBATCH --cpus-per-task={self.cores}", "#SBATCH --ntasks=1",
                 f"#SBATCH --mem={_slurm_memory(self.memory)}",
                 f"#SBATCH --time={self.walltime}"]  # fmt: skip
        out = self.log_directory / ("slurm-%A_%a.out" if array_size else "slurm-%j.out")
        lines.append(f"#SBATCH --output={out}")
        if self.queue:
            lines.append(f"#SBATCH --partition={self.queue}")
        if self.account:
            lines.append(f"#SBATCH --account={self.account}")
        if array_size:
            lines.append(f"#SBATCH --array=0-{array_size - 1}")
        lines += [f"#SBATCH {opt}" for opt in self.job_extra]
        lines += ["", "set -e", *self.prologue]
        if array_size:
            lines.append('NAME="slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"')
        else:
            lines.append('NAME="slurm-${SLURM_JOB_ID}"')
        if self.scheduler_file:
            read = (f"import json; print(json.load(open({str(self.shared_directory / 'scheduler.json')!r}))"
                    "['address'])")  # fmt: skip
            lines.append(f"ADDRESS=$({shlex.quote(self.python)} -c {shlex.quote(read)})")
        else:
            lines.append(f"ADDRESS={shlex.quote(self.scheduler_address)}")
        if self.interface is None:
            lines.append("WORKER_HOST=$(hostname -I | cut -d' ' -f1)")
        else:  # listen on the same network as the scheduler
            lines.append(f"WORKER_HOST=$({shlex.quote(self.python)} -c"
                         f" {shlex.quote(_host_of(self.interface))})")  # fmt: skip
        args = ["-m", "shoal.cli", "worker", "--nthreads", str(self.cores), "--memory-limit",
                self.memory, "--token-file", str(self.shared_directory / "token"),
                "--no-dashboard"]  # fmt: skip
        if self.lifetime:
            args += ["--lifetime", f"{self.lifetime:g}",
                     "--lifetime-stagger", f"{self.lifetime_stagger:g}"]  # fmt: skip
        if self.security is not None:
            args += self.security.for_role("worker").cli_args()
        args += self.worker_extra
        lines.append(f"exec {shlex.quote(self.python)} {' '.join(map(shlex.quote, args))}"
                     ' --name "$NAME" --host "$WORKER_HOST" "$ADDRESS"')
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------- jobs

    def scale(self, n: int | None = None, *, jobs: int | None = None) -> None:
        """``scale(n)`` or ``scale(jobs=n)``: keep ``n`` worker jobs (one worker each)."""
        if (n is None) == (jobs is None):
            raise TypeError("scale: give n or jobs=, one of them")
        super().scale(n if n is not None else jobs)  # type: ignore[arg-type]

    def _launch(self, count: int) -> list[WorkerUnit]:
        self._counter += 1
        if self.array and count > 1:
            job_id = self._submit(self.job_script(array_size=count))
            return [WorkerUnit(f"slurm-{job_id}_{i}", handle=f"{job_id}_{i}") for i in range(count)]
        units = []
        for _ in range(count):
            job_id = self._submit(self.job_script())
            units.append(WorkerUnit(f"slurm-{job_id}", handle=job_id))
        return units

    def _submit(self, script: str) -> str:
        try:
            done = subprocess.run([self.sbatch, "--parsable"], input=script, text=True,
                                  capture_output=True, timeout=self.command_timeout,
                                  check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LaunchError(f"sbatch could not run: {exc}") from None
        if done.returncode != 0:
            raise LaunchError(f"sbatch failed (exit {done.returncode}):"
                              f" {done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
        job_id = done.stdout.strip().split(";")[0]
        if not job_id:
            raise LaunchError(f"sbatch printed no job id: {done.stdout!r}")
        self.submitted.append(job_id)
        return job_id

    def _refresh(self) -> None:
        live = [u for u in self.units.values() if u.state != "ended"]
        if not live:
            return
        states = self._job_states({str(u.handle).split("_")[0] for u in live})
        if states is None:
            return  # squeue failed: know nothing new
        for u in live:
            job = str(u.handle)
            state = states.get(job)
            if state in _ALIVE:
                self._misses.pop(job, None)
                continue
            # Not listed: squeue may lag right after sbatch, so twice in a row means gone.
            self._misses[job] = self._misses.get(job, 0) + 1
            if state is not None or self._misses[job] >= 2:
                logger.info("job %s of worker %s ended (%s)", job, u.name, state or "not listed")
                self._misses.pop(job, None)
                u.state = "ended"

    def _job_states(self, job_ids: set[str]) -> dict[str, str] | None:
        """job id (``123`` or ``123_4``; ``123_[5-7]`` for pending array tasks) -> state."""
        try:
            done = subprocess.run([self.squeue, "-h", "-r", "-o", "%i %T", "--jobs",
                                   ",".join(sorted(job_ids))], capture_output=True, text=True,
                                  timeout=self.command_timeout, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            # squeue fails for ids it no longer knows when *all* of them are gone
            if "Invalid job id" in done.stderr:
                return {}
            return None
        out = {}
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def _cancel(self, units: list[WorkerUnit]) -> None:
        ids = sorted({str(u.handle) for u in units})
        for u in units:
            u.state = "ended"
        if ids:
            self._scancel(ids)

    def _scancel(self, ids: list[str]) -> None:
        try:
            done = subprocess.run([self.scancel, *ids], capture_output=True, text=True,
                                  timeout=self.command_timeout, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"scancel {' '.join(ids)} failed: {exc}") from None
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            raise ClusterError(f"scancel {' '.join(ids)} failed: {done.stderr.strip()}")

    def close(self, timeout: float = 30.0) -> None:
        """Stop adapting, ``scancel`` every job this cluster submitted, stop the scheduler."""
        error: Exception | None = None
        try:
            super().close(timeout)
        except ClusterError as exc:
            error = exc
        if self.submitted:  # also jobs that ended or left the unit list: scancel is idempotent
            ids = sorted(set(self.submitted))
            try:
                self._scancel(ids)
                self._wait_gone(ids, timeout)
            except ClusterError as exc:
                error = error or exc
        if error is not None:
            raise error

    def _wait_gone(self, ids: list[str], timeout: float) -> None:
        """Wait (at most ``timeout`` s) until Slurm lists none of these jobs as alive."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            states = self._job_states(set(ids))
            alive = sorted(j for j, st in (states or {}).items() if st in _ALIVE)
            if states is not None and not alive:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"jobs {alive or ids} still listed by squeue {timeout}s"
                                   " after scancel")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _unit_output(self, unit: WorkerUnit) -> str:
        job = str(unit.handle)
        path = self.log_directory / f"slurm-{job}.out"  # slurm-%j.out, slurm-%A_%a.out
        text = path.read_text(errors="replace") if path.is_file() else "(no output file)"
        return f"job {job}:\n" + "\n".join(text.splitlines()[-20:])

    def get_logs(self) -> dict[str, str]:
        """Each job's output file: file name -> text (the scheduler logs in this process)."""
        out = {}
        if self.log_directory.is_dir():
            for path in sorted(self.log_directory.glob("slurm-*.out")):
                out[path.stem] = path.read_text(errors="replace")
        return out

    def _where(self) -> str:
        return (f"jobs={len(set(self.submitted))} cores={self.cores} memory={self.memory}"
                f" walltime={self.walltime}{' array' if self.array else ''}"
                f"{f' queue={self.queue}' if self.queue else ''}")  # fmt: skip


def _slurm_memory(memory: str) -> str:
    """"8GB" -> "8G", "512MiB" -> "512M", bytes -> "NK"; what ``--mem`` takes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", memory, re.IGNORECASE)
    if not match:
        raise ValueError(f"memory {memory!r} is not a size like '8GB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    if not unit:
        return f"{max(1, int(number // 1024))}K"
    return f"{int(number)}{unit}" if number == int(number) else f"{int(number * 1024)}" + (
        {"K": "", "M": "K", "G": "M", "T": "G"}[unit] or "K")  # fmt: skip


def _host_of(interface: str) -> str:
    """Python that prints ``interface``'s IPv4 address on the node (the worker listens there)."""
    return ("import socket, psutil; print(next(a.address for a in psutil.net_if_addrs()"
            f"[{interface!r}] if a.family == socket.AF_INET))")
