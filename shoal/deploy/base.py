"""The interface every deployed cluster shares (`SSHCluster`, `SlurmCluster`).

A cluster starts a scheduler somewhere and *worker units* elsewhere (an ``ssh`` session
running ``shoal worker``, a batch job). It is used synchronously::

    with SlurmCluster(cores=4, memory="8GB", walltime="01:00:00") as cluster:
        cluster.scale(10)            # or cluster.adapt(minimum=0, maximum=50)
        with shoal.Client(cluster) as client:
            ...

What the base keeps:

- ``token``: every cluster has one (generated unless given), which its scheduler requires
  and its workers and `Client(cluster)` present; ``security``: optional TLS credentials
  passed on to every process it starts;
- the units it started (``units``: name -> `WorkerUnit`) and the number it should keep
  (``target``). A *watcher* thread compares the two every ``watch_interval`` seconds and
  starts replacements for units that ended (a worker at its lifetime, a job that died).
  Failing launches back off exponentially and, after ``max_launch_failures`` in a row, stop
  with ``status = "failed"`` and the reason in ``errors``: never a loop;
- `scale(n)`: more units are launched at once; fewer cancels units not connected yet first,
  then retires connected workers through the scheduler (their results move first);
- `adapt(...)` (`shoal.deploy.adaptive`); `close()` stops everything it started, also after
  errors (every subclass's ``_stop_all`` is idempotent).

Subclasses implement `_launch` (start ``count`` units, return them), `_cancel` (stop units at
once), `_refresh` (mark the units that ended), `_stop_scheduler`, `get_logs` and `_where`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..security.credentials import Security
from .adaptive import Adaptive, AdaptivePolicy, Decision, Observation, WorkerLoad

if TYPE_CHECKING:
    from ..client.client import Client

logger = logging.getLogger("shoal.deploy")

__all__ = ["Cluster", "ClusterError", "LaunchError", "WorkerUnit"]

UnitState = Literal["launched", "leaving", "ended"]

_C = TypeVar("_C", bound="Cluster")


class ClusterError(RuntimeError):
    """The cluster could not start, launch workers or talk to its scheduler."""


class LaunchError(ClusterError):
    """Starting worker units failed (e.g. ``sbatch`` refused the job); says why."""


@dataclass
class WorkerUnit:
    """One thing a cluster started that runs one worker: a job, an ssh session."""

    #: the worker's name (what the scheduler lists), unique within the cluster
    name: str
    #: launched: submitted or running; leaving: being retired or cancelled; ended: gone
    state: UnitState = "launched"
    #: where it runs (host, node), once known
    where: str = ""
    #: the subclass's handle on it (a job id, a process)
    handle: Any = None
    #: when it was launched (time.time())
    launched_at: float = field(default_factory=time.time)
    #: its worker has been seen connected to the scheduler
    connected: bool = False


class Cluster:
    """Base of the deployed clusters (see the module's docstring)."""

    def __init__(self, *, token: str | None = None, security: Security | None = None,
                 threads_per_worker: int = 1, watch_interval: float = 2.0,
                 max_launch_failures: int = 5, launch_backoff: float = 1.0,
                 launch_backoff_max: float = 60.0, connect_timeout: float = 30.0) -> None:  # fmt: skip
        #: the shared secret of this cluster's scheduler (generated unless given)
        self.token = token if token is not None else secrets.token_urlsafe(32)
        #: TLS credentials handed to every process this cluster starts (None: plain TCP)
        self.security = security
        self.threads_per_worker = threads_per_worker
        self.scheduler_address = ""
        self.watch_interval = watch_interval
        self.max_launch_failures = max_launch_failures
        self.launch_backoff = launch_backoff
        self.launch_backoff_max = launch_backoff_max
        self.connect_timeout = connect_timeout
        #: name -> unit, for every unit launched and not yet forgotten
        self.units: dict[str, WorkerUnit] = {}
        #: units to keep launched
        self.target = 0
        #: "created", "running", "failed" (launches gave up: see ``errors``), "closed"
        self.status = "created"
        #: launch failures, newest last: (time, message)
        self.errors: list[tuple[float, str]] = []
        self._failures_in_a_row = 0
        self._next_launch_at = 0.0
        #: guards ``units``, ``target`` and the launch bookkeeping (user, watcher, adaptive)
        self._lock = threading.RLock()
        self._control: Client | None = None
        self._adaptive: Adaptive | None = None
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------ subclass hooks

    def _launch(self, count: int) -> list[WorkerUnit]:
        raise NotImplementedError

    def _cancel(self, units: list[WorkerUnit]) -> None:
        raise NotImplementedError

    def _refresh(self) -> None:
        """Mark units that ended (``state = "ended"``)."""
        raise NotImplementedError

    def _stop_scheduler(self) -> None:
        raise NotImplementedError

    def get_logs(self) -> dict[str, str]:
        """The output of the scheduler and of each worker unit: name -> text."""
        raise NotImplementedError

    def _where(self) -> str:
        """Where the scheduler and workers run, for the repr."""
        raise NotImplementedError

    # --------------------------------------------------------------- lifecycle

    def _started(self, scheduler_address: str) -> None:
        """The scheduler listens at ``scheduler_address``: connect, start watching."""
        from ..client.client import Client

        self.scheduler_address = scheduler_address
        client_security = None if self.security is None else self.security.for_role("client")
        self._control = Client(scheduler_address, token=self.token, security=client_security,
                               timeout=self.connect_timeout, set_as_default=False,
                               name=f"{type(self).__name__}-control")  # fmt: skip
        self.status = "running"
        self._watcher = threading.Thread(target=self._watch, name="shoal-deploy-watch",
                                         daemon=True)  # fmt: skip
        self._watcher.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop adapting, stop every unit and the scheduler this cluster started."""
        if self.status == "closed":
            return
        self.status = "closed"
        if self._adaptive is not None:
            self._adaptive.stop(timeout)
        self._stop_watch.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout)
        errors: list[str] = []
        with self._lock:
            live = [u for u in self.units.values() if u.state != "ended"]
            try:
                if live:
                    self._cancel(live)
            except Exception as exc:  # noqa: BLE001 - keep closing; reported below
                errors.append(f"stopping workers: {exc}")
        if self._control is not None:
            try:
                self._control.close(timeout=10)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"closing the control client: {exc}")
            self._control = None
        try:
            self._stop_scheduler()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"stopping the scheduler: {exc}")
        if errors:
            raise ClusterError(f"closing {type(self).__name__}: " + "; ".join(errors))

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            live = sum(u.state == "launched" for u in self.units.values())
        return (f"<{type(self).__name__} {self.status} scheduler={self.scheduler_address}"
                f" workers={live}/{self.target} {self._where()}>")  # fmt: skip

    @property
    def dashboard_link(self) -> str:
        """The scheduler's dashboard URL ("" when it has none)."""
        try:
            return str(self._info().get("dashboard") or "")
        except ClusterError:
            return ""

    # ----------------------------------------------------------------- scaling

    def scale(self, n: int) -> None:
        """Keep ``n`` workers: launch more at once, or cancel (not yet connected ones first)
        and retire (results moved first) the extra ones. Raises `LaunchError` when the
        launch fails (the watcher then retries with back-off)."""
        self._scale(n, retry_now=True)

    def _scale(self, n: int, retry_now: bool) -> None:
        """`scale`; ``retry_now``: forget earlier launch failures (a user's call does; the
        adaptive loop's repeated calls do not, so its failing launches stay backed off)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"scale: n must be an int >= 0, got {n!r}")
        self._check_running()
        with self._lock:
            self.target = n
            if retry_now:
                self._failures_in_a_row = 0
                self._next_launch_at = 0.0
                if self.status == "failed":
                    self.status = "running"
            self._refresh()
            live = [u for u in self.units.values() if u.state == "launched"]
            extra = len(live) - n
        if extra > 0:
            self._shrink(live, extra)
        elif extra < 0:
            self._launch_missing(raise_errors=True)

    def _shrink(self, live: list[WorkerUnit], extra: int) -> None:
        connected = self._connected()
        waiting = [u for u in live if u.name not in connected]
        waiting.sort(key=lambda u: -u.launched_at)  # the newest are furthest from starting
        cancel = waiting[:extra]
        retire_names = [u.name for u in live if u.name in connected][: extra - len(cancel)]
        with self._lock:
            for u in cancel:
                u.state = "leaving"
        if cancel:
            self._cancel(cancel)
        if retire_names:
            self.retire(retire_names)

    def retire(self, names_or_addresses: list[str] | tuple[str, ...]) -> list[str]:
        """Retire these workers gracefully (not replaced); returns the addresses retired."""
        info = self._info()
        by_address = {a: w["name"] for a, w in info["workers"].items()}
        names = [by_address.get(x, x) for x in names_or_addresses]
        with self._lock:
            for name in names:
                unit = self.units.get(name)
                if unit is not None and unit.state == "launched":
                    unit.state = "leaving"
            self.target = max(0, min(self.target, self._count("launched")))
        control = self._control_client()
        gone: list[str] = control.retire_workers(names, timeout=60)
        return gone

    def _count(self, state: UnitState) -> int:
        return sum(u.state == state for u in self.units.values())

    def _launch_missing(self, raise_errors: bool = False) -> None:
        with self._lock:
            if self.status != "running" or time.monotonic() < self._next_launch_at:
                return  # given up, or backing off: not a loop of failing launches
            missing = self.target - self._count("launched")
            if missing <= 0:
                return
            try:
                for unit in self._launch(missing):
                    self.units[unit.name] = unit
            except LaunchError as exc:
                self._launch_failed(str(exc))
                if raise_errors:
                    raise
                return
            self._failures_in_a_row = 0

    def _launch_failed(self, message: str) -> None:
        self._failures_in_a_row += 1
        self.errors.append((time.time(), message))
        del self.errors[:-100]
        if self._failures_in_a_row >= self.max_launch_failures:
            self.status = "failed"
            logger.error("%s: %d launches failed in a row; giving up until scale() is called"
                         " again. Last: %s", type(self).__name__, self._failures_in_a_row,
                         message)  # fmt: skip
            return
        delay = min(self.launch_backoff_max,
                    self.launch_backoff * 2 ** (self._failures_in_a_row - 1))  # fmt: skip
        self._next_launch_at = time.monotonic() + delay
        logger.warning("%s: launching workers failed (%d in a row), retrying in %.0fs: %s",
                       type(self).__name__, self._failures_in_a_row, delay, message)  # fmt: skip

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.watch_interval):
            try:
                self._watch_once()
            except Exception:  # noqa: BLE001 - logged; tried again next time
                logger.exception("%s: watching the workers failed", type(self).__name__)

    def _watch_once(self) -> None:
        """Forget ended units; one that ended before its worker ever connected is a failed
        launch (backed off like an ``sbatch`` error); launch what is missing."""
        connected = self._connected()
        with self._lock:
            launched = {n for n, u in self.units.items() if u.state == "launched"}
            for name in connected & launched:
                self.units[name].connected = True
            self._refresh()
            for name in [n for n, u in self.units.items() if u.state == "ended"]:
                unit = self.units.pop(name)
                if name in launched and not unit.connected:
                    self._launch_failed(f"worker {name} ended before it joined the scheduler:"
                                        f" {self._unit_output(unit)}")  # fmt: skip
        self._launch_missing()

    def _unit_output(self, unit: WorkerUnit) -> str:
        """The last lines a unit printed (for error messages)."""
        return ""

    # ---------------------------------------------------------------- adaptive

    def adapt(self, minimum: int = 0, maximum: int = 10, target_duration: float = 5.0,
              wait_count: int = 3, interval: float = 1.0,
              max_pending: int | None = None) -> Adaptive:  # fmt: skip
        """Scale with the work (see `shoal.deploy.adaptive`); replaces an earlier `adapt`.
        ``max_pending``: most workers launched and not yet connected (default: ``maximum``)."""
        self._check_running()
        policy = AdaptivePolicy(minimum, maximum, target_duration, wait_count,
                                max_pending if max_pending is not None else max(1, maximum))  # fmt: skip
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, policy, interval)
        return self._adaptive

    def adaptive_observe(self) -> Observation:
        info = self._info()
        workers = tuple(WorkerLoad(a, int(w["nthreads"]), int(w["processing"]), int(w["nbytes"]))
                        for a, w in info["workers"].items())  # fmt: skip
        connected = {w["name"] for w in info["workers"].values()}
        with self._lock:
            self._refresh()
            pending = sum(u.state == "launched" and u.name not in connected
                          for u in self.units.values())  # fmt: skip
        load = info.get("workload") or {}
        return Observation(workers, pending, int(load.get("tasks", 0)),
                           float(load.get("seconds", 0.0)), self.threads_per_worker)  # fmt: skip

    def adaptive_apply(self, decision: Decision) -> None:
        if decision.retire:
            self.retire(decision.retire)
        if decision.scale_to is not None:
            self._scale(decision.scale_to, retry_now=False)

    # ----------------------------------------------------------------- helpers

    def _check_running(self) -> None:
        if self.status in ("created", "closed"):
            raise ClusterError(f"{type(self).__name__} is {self.status}")

    def _control_client(self) -> Client:
        if self._control is None:
            raise ClusterError(f"{type(self).__name__} has no scheduler connection"
                               f" ({self.status})")  # fmt: skip
        return self._control

    def _info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self._control_client().scheduler_info()
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001 - named for the caller
            raise ClusterError(f"cannot reach the scheduler at {self.scheduler_address}:"
                               f" {exc}") from exc  # fmt: skip
        return info

    def _connected(self) -> set[str]:
        """Names of the workers connected to the scheduler now."""
        return {w["name"] for w in self._info()["workers"].values()}

    def wait_for_workers(self, n: int, timeout: float = 120.0,
                         fail_on_launch_error: bool = False) -> float:  # fmt: skip
        """Wait until ``n`` workers are connected; returns the seconds it took, or raises
        `TimeoutError` naming how many came (and the launch errors, if any). With
        ``fail_on_launch_error`` a launch failing meanwhile raises `LaunchError` at once."""
        start = time.monotonic()
        errors_before = len(self.errors)
        delay = 0.05
        while True:
            count = len(self._info()["workers"])
            if count >= n:
                return time.monotonic() - start
            if fail_on_launch_error and len(self.errors) > errors_before:
                raise LaunchError(self.errors[-1][1])
            if time.monotonic() - start > timeout:
                last = self.errors[-1][1] if self.errors else "no launch error"
                raise TimeoutError(f"{count} of {n} workers connected within {timeout}s"
                                   f" ({last})")  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
