"""`SSHCluster`: the scheduler on the first host, workers on the others, over ``ssh``.

Every process runs in its own ``ssh -o BatchMode=yes HOST sh -c ...`` session (the system
``ssh``: its config, keys and agent apply; BatchMode never prompts). The remote command
reads the cluster's token from its stdin (it never appears on a command line), starts
``python -m shoal.cli scheduler|worker`` in the background, and then reads stdin to its
end: when our end of the pipe closes (`close`, or this process dying) the remote shell
stops the shoal process (SIGTERM, SIGKILL after 10 s). So nothing outlives the cluster
even if ``ssh`` is killed.

The scheduler listens on the first host's name as given (or ``scheduler_host``), workers on
their own host's name: give the names (or addresses) the hosts reach each other by. The
remote hosts need shoal installed for ``remote_python`` and, with ``security=``, the TLS
files at the same paths.
"""

from __future__ import annotations

import collections
import logging
import re
import shlex
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Any

from ..security.credentials import Security
from .base import Cluster, ClusterError, LaunchError, WorkerUnit

logger = logging.getLogger("shoal.deploy.ssh")

__all__ = ["SSHCluster", "remote_command"]

#: the remote side: token from stdin, shoal in the background, stop it at EOF on stdin
_REMOTE = (
    'IFS= read -r SHOAL_TOKEN; export SHOAL_TOKEN; {command} </dev/null & pid=$!; '
    'trap "kill -TERM $pid 2>/dev/null" HUP TERM; cat >/dev/null; kill -TERM $pid 2>/dev/null; '
    'i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
    'kill -KILL $pid 2>/dev/null; wait $pid'
)


def remote_command(argv: Sequence[str]) -> str:
    """The shell command run on the remote host for shoal's ``argv``."""
    return _REMOTE.format(command=" ".join(shlex.quote(a) for a in argv))


class _Remote:
    """One ssh session running one shoal process; its output kept (bounded) for logs."""

    def __init__(self, ssh: list[str], host: str, argv: list[str], token: str,
                 what: str) -> None:  # fmt: skip
        self.host = host
        self.what = what
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.address = ""
        self._address_seen = threading.Event()
        self.proc = subprocess.Popen([*ssh, host, remote_command(argv)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(token + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # ssh already failed: its output says why
        self._reader = threading.Thread(target=self._read, name=f"shoal-ssh-{host}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream: IO[str] | None = self.proc.stdout
        assert stream is not None
        for line in stream:
            line = line.rstrip("\n")
            self.lines.append(line)
            match = re.search(r"listening at (\S+)", line)
            if match and not self.address:
                self.address = match.group(1)
                self._address_seen.set()
        stream.close()
        self._address_seen.set()  # ended: wake whoever waits

    def wait_address(self, timeout: float) -> str:
        """The address the process printed once it listened; `LaunchError` if it ended or
        stayed silent for ``timeout`` seconds, with its output."""
        if not self._address_seen.wait(timeout) or not self.address:
            self.stop(5)
            raise LaunchError(f"{self.what} on {self.host} did not start within {timeout}s:"
                              f"\n{self.output(30)}")  # fmt: skip
        return self.address

    def output(self, n: int | None = None) -> str:
        lines = list(self.lines)
        return "\n".join(lines[-n:] if n else lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """EOF on the remote's stdin (it stops shoal), then wait; kill ssh if it lingers."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)


class SSHCluster(Cluster):
    """``hosts[0]`` runs the scheduler, ``hosts[1:]`` the workers (one each, more with
    ``workers_per_host``); `scale(n)` starts or stops workers round-robin over them.

    ``ssh_options``: more ``ssh`` arguments (``["-i", key, "-p", "2222"]``); ``ssh``: the
    ssh command itself (a list: e.g. ``["ssh"]``); ``remote_python``: the interpreter on the
    hosts; ``scheduler_port``; ``nthreads``, ``memory_limit`` and ``worker_options`` (more
    ``shoal worker`` options); ``scheduler_options`` (more ``shoal scheduler`` options).
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        workers_per_host: int = 1,
        ssh: Sequence[str] = ("ssh",),
        ssh_options: Sequence[str] = (),
        remote_python: str = "python3",
        scheduler_port: int = 8786,
        scheduler_host: str | None = None,
        dashboard_address: str | None = ":8787",
        nthreads: int = 1,
        memory_limit: str = "auto",
        worker_options: Sequence[str] = (),
        scheduler_options: Sequence[str] = (),
        token: str | None = None,
        security: Security | None = None,
        connect_timeout: float = 60.0,
        watch_interval: float = 2.0,
    ) -> None:
        super().__init__(token=token, security=security, threads_per_worker=nthreads,
                         watch_interval=watch_interval, connect_timeout=connect_timeout)  # fmt: skip
        hosts = list(hosts)
        if len(hosts) < 2:
            raise ValueError(f"SSHCluster needs at least 2 hosts (the scheduler's, then the"
                             f" workers'), got {hosts!r}")  # fmt: skip
        self.hosts = hosts
        self.worker_hosts = hosts[1:]
        self.workers_per_host = workers_per_host
        self._ssh = [*ssh, "-o", "BatchMode=yes", "-T", *ssh_options]
        self.remote_python = remote_python
        self.scheduler_host = scheduler_host or hosts[0]
        self.scheduler_port = scheduler_port
        self.dashboard_address = dashboard_address
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.worker_options = list(worker_options)
        self.scheduler_options = list(scheduler_options)
        self._scheduler: _Remote | None = None
        self._counter = 0
        try:
            self._start_scheduler()
            self.scale(len(self.worker_hosts) * workers_per_host)
            self.wait_for_workers(self.target, timeout=connect_timeout,
                                  fail_on_launch_error=True)  # fmt: skip
        except BaseException:
            try:
                self.close()
            except ClusterError as exc:
                logger.warning("cleaning up after a failed start: %s", exc)
            raise

    def _tls(self, role: str) -> list[str]:
        return [] if self.security is None else self.security.for_role(role).cli_args()

    def _start_scheduler(self) -> None:
        argv = [self.remote_python, "-m", "shoal.cli", "scheduler", "--host",
                self.scheduler_host, "--port", str(self.scheduler_port), *self._tls("scheduler")]  # fmt: skip
        if self.dashboard_address is None:
            argv.append("--no-dashboard")
        else:
            argv += ["--dashboard-address", self.dashboard_address]
        argv += self.scheduler_options
        self._scheduler = _Remote(self._ssh, self.hosts[0], argv, self.token, "shoal scheduler")
        address = self._scheduler.wait_address(self.connect_timeout)
        self._started(address)

    def _stop_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()

    def _launch(self, count: int) -> list[WorkerUnit]:
        units: list[WorkerUnit] = []
        for _ in range(count):
            host = self._next_host(units)
            name = f"ssh-{host}-{self._counter}"
            self._counter += 1
            argv = [self.remote_python, "-m", "shoal.cli", "worker", self.scheduler_address,
                    "--name", name, "--host", host, "--nthreads", str(self.nthreads),
                    "--memory-limit", self.memory_limit, *self._tls("worker"),
                    *self.worker_options]  # fmt: skip
            remote = _Remote(self._ssh, host, argv, self.token, f"shoal worker {name}")
            units.append(WorkerUnit(name, where=host, handle=remote))
        return units

    def _next_host(self, launching: list[WorkerUnit]) -> str:
        """The worker host running the fewest of our workers (the first on a tie)."""
        load = {h: 0 for h in self.worker_hosts}
        for u in [*self.units.values(), *launching]:
            if u.state != "ended" and u.where in load:
                load[u.where] += 1
        return min(self.worker_hosts, key=lambda h: load[h])

    def _refresh(self) -> None:
        for u in self.units.values():
            if u.state != "ended" and not u.handle.alive:
                u.state = "ended"

    def _cancel(self, units: list[WorkerUnit]) -> None:
        for u in units:
            u.state = "ended"
        # EOF to all first, then wait: they stop in parallel.
        for u in units:
            stdin = u.handle.proc.stdin
            if stdin is not None and not stdin.closed:
                try:
                    stdin.close()
                except OSError:
                    pass
        for u in units:
            u.handle.stop()

    def _unit_output(self, unit: WorkerUnit) -> str:
        return f"on {unit.where}:\n{unit.handle.output(20)}"

    def get_logs(self) -> dict[str, str]:
        """The output of the scheduler and each worker's ssh session: name -> text."""
        out = {}
        if self._scheduler is not None:
            out["scheduler"] = self._scheduler.output()
        for name, unit in self.units.items():
            out[name] = unit.handle.output()
        return out

    def _where(self) -> str:
        return f"scheduler_host={self.hosts[0]} worker_hosts={','.join(self.worker_hosts)}"

    def __getstate__(self) -> Any:
        raise TypeError("an SSHCluster cannot be pickled (it owns ssh processes)")
