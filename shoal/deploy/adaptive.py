"""Adaptive scaling: as many workers as the queued work needs, between a minimum and a maximum.

The policy (`AdaptivePolicy.recommend`) is plain logic over an `Observation` of the cluster,
with no I/O and no clock, so it is tested without a cluster:

- **up**: the work not yet done is worth ``workload_seconds`` (each task counted at its
  group's mean duration); finishing it within ``target_duration`` takes
  ``workload_seconds / target_duration`` threads, i.e. that many workers of ``nthreads``
  threads, and never more workers than there are tasks to run (many tiny tasks ask for few
  workers). Scaling up happens at once, but never leaves more than ``max_pending`` workers
  requested and not yet connected (a batch queue is not flooded with jobs).
- **down**: only after ``wait_count`` consecutive recommendations below the current size,
  so a load that comes and goes does not make workers come and go. The workers retired are
  idle ones holding the least data, and retirement goes through the scheduler's
  ``retire_workers``: their results move to other workers first, so nothing is lost or
  recomputed.

`Adaptive` runs the policy every ``interval`` seconds on a thread, against any cluster that
implements `AdaptiveTarget` (`LocalCluster`, `SSHCluster`, `SlurmCluster`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger("shoal.deploy.adaptive")

__all__ = ["Adaptive", "AdaptivePolicy", "AdaptiveTarget", "Decision", "Observation",
           "WorkerLoad"]  # fmt: skip


@dataclass(frozen=True)
class WorkerLoad:
    """One connected worker, as the scheduler sees it."""

    address: str
    nthreads: int
    #: tasks running or assigned there
    processing: int
    #: bytes of results it holds
    nbytes: int


@dataclass(frozen=True)
class Observation:
    """What the policy looks at: connected workers, requested ones, the work left."""

    workers: tuple[WorkerLoad, ...]
    #: workers asked for (jobs submitted, processes starting) that have not connected yet
    pending: int
    #: tasks not done yet (waiting, queued or running)
    workload_tasks: int
    #: their expected seconds of work in total
    workload_seconds: float
    #: threads of a worker this cluster would start
    threads_per_worker: int = 1


@dataclass(frozen=True)
class Decision:
    """``scale_to``: the number of workers to have (connected + pending) after this step;
    ``retire``: addresses to retire now (for a scale-down). Neither: hold."""

    scale_to: int | None = None
    retire: tuple[str, ...] = ()
    #: why, for the log and for tests
    reason: str = ""


@dataclass
class AdaptivePolicy:
    """Recommends a cluster size (see the module's docstring). Mutate only through
    `recommend`: it counts consecutive scale-down recommendations."""

    minimum: int = 0
    maximum: int = 10
    #: seconds in which the queued work should be done
    target_duration: float = 5.0
    #: consecutive low recommendations before workers are retired
    wait_count: int = 3
    #: most workers requested and not yet connected at any time
    max_pending: int = 10
    #: consecutive recommendations below the current size so far
    low_count: int = field(default=0)

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum:
            raise ValueError(f"adapt: need 0 <= minimum <= maximum, got minimum={self.minimum}"
                             f" maximum={self.maximum}")  # fmt: skip
        if not self.target_duration > 0:
            raise ValueError(f"adapt: target_duration must be > 0 seconds, got"
                             f" {self.target_duration!r}")  # fmt: skip
        if self.wait_count < 1:
            raise ValueError(f"adapt: wait_count must be >= 1, got {self.wait_count!r}")
        if self.max_pending < 1:
            raise ValueError(f"adapt: max_pending must be >= 1, got {self.max_pending!r}")

    def desired(self, obs: Observation) -> int:
        """Workers the work needs, within [minimum, maximum]."""
        threads = max(1, obs.threads_per_worker)
        need = 0
        if obs.workload_tasks > 0:
            by_time = math.ceil(obs.workload_seconds / self.target_duration / threads)
            by_tasks = math.ceil(obs.workload_tasks / threads)
            need = max(1, min(by_time, by_tasks))
        return min(self.maximum, max(self.minimum, need))

    def recommend(self, obs: Observation) -> Decision:
        connected = len(obs.workers)
        have = connected + obs.pending
        want = self.desired(obs)
        if want > have or want > connected:
            self.low_count = 0
            if want <= have:
                return Decision(reason=f"waiting for {obs.pending} pending workers")
            room = max(0, self.max_pending - obs.pending)
            target = min(want, have + room)
            if target <= have:
                return Decision(reason=f"{obs.pending} workers pending (cap {self.max_pending})")
            return Decision(scale_to=target, reason=f"workload {obs.workload_seconds:.1f}s in"
                            f" {obs.workload_tasks} tasks wants {want} workers")  # fmt: skip
        if want == connected and obs.pending == 0:
            self.low_count = 0
            return Decision(reason="steady")
        self.low_count += 1
        if self.low_count < self.wait_count:
            return Decision(reason=f"low {self.low_count}/{self.wait_count}")
        self.low_count = 0
        extra = connected - want
        # Idle workers holding the least data go first; busy ones only if need be.
        ranked = sorted(obs.workers, key=lambda w: (w.processing > 0, w.nbytes, w.address))
        retire = tuple(w.address for w in ranked[:extra])
        return Decision(scale_to=want, retire=retire,
                        reason=f"{want} workers are enough for {obs.workload_tasks} tasks")  # fmt: skip


class AdaptiveTarget(Protocol):
    """What `Adaptive` needs of a cluster; called from the adaptive thread."""

    def adaptive_observe(self) -> Observation: ...

    def adaptive_apply(self, decision: Decision) -> None:
        """Retire ``decision.retire`` (gracefully, not replaced), then have
        ``decision.scale_to`` workers (connected + pending)."""


class Adaptive:
    """Runs `AdaptivePolicy` against ``target`` every ``interval`` seconds on a thread,
    until `stop`. A failing step is logged and the next one tried (never a tight loop)."""

    def __init__(self, target: AdaptiveTarget, policy: AdaptivePolicy,
                 interval: float = 1.0) -> None:  # fmt: skip
        if not interval > 0:
            raise ValueError(f"adapt: interval must be > 0 seconds, got {interval!r}")
        self.target = target
        self.policy = policy
        self.interval = interval
        #: the decisions that changed something, newest last: (time, decision)
        self.log: list[tuple[float, Decision]] = []
        #: the last error of a step ("" when the last step worked)
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-adaptive", daemon=True)
        self._thread.start()

    def step(self) -> Decision:
        decision = self.policy.recommend(self.target.adaptive_observe())
        if decision.scale_to is not None or decision.retire:
            logger.info("adaptive: %s -> %s workers%s", decision.reason, decision.scale_to,
                        f", retiring {list(decision.retire)}" if decision.retire else "")  # fmt: skip
            self.target.adaptive_apply(decision)
            self.log.append((time.time(), decision))
            del self.log[:-1000]
        return decision

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
                self.error = ""
            except Exception as exc:  # noqa: BLE001 - logged; the next step tries again
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("adaptive step failed: %s", self.error)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and wait for a step in progress (at most ``timeout`` seconds)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
