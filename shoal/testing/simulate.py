"""The scheduler simulator: the real `SchedulerState` against simulated workers, in virtual time.

No sockets, no threads, no clock: an event queue (a heap ordered by virtual time) plays the
workers and the network, and feeds the pure scheduler core through ``handle`` exactly as the
scheduler server does (events in, instructions out). Only the workers are simulated:

- a worker has ``nthreads`` slots; on `ComputeTask` it fetches the inputs it lacks from a
  holder named in ``who_has`` (``latency + nbytes / bandwidth``; transfers into one worker
  share its link, one after another), then runs the task for its duration, then reports
  `TaskFinished` (with the task's virtual start and stop, so the core learns durations);
- fetched inputs are kept and announced (`ReplicasAdded`), as `WorkerState` does with AddKeys;
- `FreeKeys` drops data; a freed task that is running keeps its thread until it ends and its
  outcome is dropped (as `WorkerState`'s ``cancelled`` state); asked again meanwhile, it resumes;
- `AcquireReplicas`, `RefreshWhoHas`, `CloseWorker` and `RestartWorker` are obeyed; `WakeAt`
  feeds a `Tick` back at its time (and, optionally, a Tick every ``tick_interval``);
- every message (scheduler <-> worker, worker <-> worker) takes ``latency`` seconds; events
  that reach the scheduler at the same virtual time go to ``handle`` in one call (the server
  batches what arrives in one loop tick the same way).

Task durations and result sizes live in the `Workload`'s side tables, keyed by task key: the
specs' function bytes are opaque stand-ins and nothing is ever unpickled.

Workloads (`WORKLOADS`): a wide map, a tree reduction, a random DAG, a dask-array-like
blockwise sum with a tree reduction, and ``million`` (that array workload at 1,000,000 tasks on
1,000 workers). `simulate` returns a `SimResult`: transitions per second of the core (wall time
inside ``handle`` only), core memory per task, makespan against lower bounds (total work /
threads, and the critical path), bytes moved, steals.

Run ``python -m shoal.testing.simulate --help``.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import json
import math
import pstats
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..core.scheduler_events import (
    DataMissing,
    Instruction,
    KeysReleased,
    ReplicasAdded,
    SchedulerEvent,
    TaskFinishedEvent,
    TasksSubmitted,
    Tick,
    ToClient,
    ToWorker,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from ..core.scheduler_state import SchedulerState
from ..protocol.messages import (
    AcquireReplicas,
    CloseWorker,
    ComputeTask,
    FreeKeys,
    KeyErred,
    KeyInMemory,
    KeyLost,
    Msg,
    RefreshWhoHas,
    RestartWorker,
    TaskFinished,
    TaskSpec,
)
from ..protocol.serialize import Serialized

__all__ = [
    "WORKLOADS",
    "SimResult",
    "Simulation",
    "Workload",
    "array_reduction",
    "core_memory_per_task",
    "main",
    "random_dag",
    "random_placement_bytes",
    "simulate",
    "spec_memory_per_task",
    "tree_reduction",
    "wide_map",
]

#: Stand-ins for a cloudpickled function and its pickled arguments, shared by every task (as
#: a `Client.map` shares one function's bytes): the scheduler never looks inside.
SIM_FUNCTION = b"shoal-simulated-function"
SIM_ARGS = Serialized([b""])

MB = 1_000_000


# ---------------------------------------------------------------------- workloads


@dataclass(slots=True)
class Workload:
    """A task graph with what the simulated workers need to know about each task.

    ``keys`` are in topological order (a task comes after its dependencies).
    """

    name: str
    keys: list[str]
    #: key -> keys it depends on
    deps: dict[str, list[str]]
    #: key -> seconds it runs
    duration: dict[str, float]
    #: key -> bytes of its result
    nbytes: dict[str, int]
    #: keys the client holds futures for
    wanted: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def specs(self) -> list[TaskSpec]:
        """The tasks as a client submits them (opaque function and arguments)."""
        deps = self.deps
        return [TaskSpec(k, SIM_FUNCTION, SIM_ARGS, tuple(deps[k])) for k in self.keys]

    def total_work(self) -> float:
        return math.fsum(self.duration.values())

    def critical_path(self) -> float:
        """The longest chain of durations (transfers not counted)."""
        finish: dict[str, float] = {}
        duration, deps = self.duration, self.deps
        for k in self.keys:
            finish[k] = duration[k] + max((finish[d] for d in deps[k]), default=0.0)
        return max(finish.values(), default=0.0)


class _Builder:
    def __init__(self, name: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.w = Workload(name, [], {}, {}, {}, [])

    def add(self, key: str, deps: list[str], duration: float, nbytes: int) -> str:
        w = self.w
        w.keys.append(key)
        w.deps[key] = deps
        w.duration[key] = duration
        w.nbytes[key] = nbytes
        return key


def wide_map(n: int, seed: int = 0) -> Workload:
    """``n`` independent tasks of 50-150 ms, 1 MB results, all held by the client."""
    b = _Builder("map", seed)
    rng = b.rng
    for i in range(n):
        b.add(f"map-{i}", [], rng.uniform(0.05, 0.15), MB)
    b.w.wanted = list(b.w.keys)
    return b.w


def tree_reduction(n: int, seed: int = 0, fan_in: int = 8) -> Workload:
    """About ``n`` tasks: leaves of 100 ms making 10 MB each, reduced ``fan_in`` at a time
    (20 ms per reduce, 10 MB out) to one root the client holds."""
    b = _Builder("tree", seed)
    rng = b.rng
    leaves = max(1, round(n * (fan_in - 1) / fan_in))
    level = [b.add(f"leaf-{i}", [], rng.uniform(0.05, 0.15), 10 * MB) for i in range(leaves)]
    depth = 0
    while len(level) > 1:
        depth += 1
        level = [b.add(f"reduce{depth}-{j}", level[i:i + fan_in], rng.uniform(0.01, 0.03),
                       10 * MB)
                 for j, i in enumerate(range(0, len(level), fan_in))]  # fmt: skip
    b.w.wanted = level
    return b.w


def random_dag(n: int, seed: int = 0, window: int = 1000) -> Workload:
    """``n`` tasks, each depending on 0-3 random tasks among the ``window`` before it;
    durations exponential (mean 100 ms), result sizes log-uniform from 1 KB to 10 MB; the
    client holds every sink (task nothing depends on)."""
    b = _Builder("dag", seed)
    rng = b.rng
    used: set[str] = set()
    for i in range(n):
        lo = max(0, i - window)
        k = min(i - lo, rng.choice((0, 1, 1, 2, 2, 3)))
        deps = [f"dag-{j}" for j in sorted(rng.sample(range(lo, i), k))] if k else []
        used.update(deps)
        b.add(f"dag-{i}", deps, rng.expovariate(10.0), int(10 ** rng.uniform(3, 7)))
    b.w.wanted = [k for k in b.w.keys if k not in used]
    return b.w


def array_reduction(n: int, seed: int = 0, split_every: int = 32) -> Workload:
    """A dask-array-like ``(a + b).sum()``, about ``n`` tasks: per chunk, two loads (200 ms,
    8 MB), a blockwise add (50 ms, 8 MB) and a chunk sum (20 ms, 8 bytes); the partial sums
    are tree-reduced ``split_every`` at a time (1 ms each) to one scalar the client holds."""
    b = _Builder("array", seed)
    rng = b.rng
    chunks = max(1, round(n / (4 + 1 / (split_every - 1))))
    level: list[str] = []
    for i in range(chunks):
        a = b.add(f"ones-{i}", [], rng.uniform(0.15, 0.25), 8 * MB)
        c = b.add(f"random-{i}", [], rng.uniform(0.15, 0.25), 8 * MB)
        s = b.add(f"add-{i}", [a, c], rng.uniform(0.04, 0.06), 8 * MB)
        level.append(b.add(f"sum-{i}", [s], rng.uniform(0.015, 0.025), 8))
    depth = 0
    while len(level) > 1:
        depth += 1
        level = [b.add(f"sum-agg{depth}-{j}", level[i:i + split_every], 0.001, 8)
                 for j, i in enumerate(range(0, len(level), split_every))]  # fmt: skip
    b.w.wanted = level
    return b.w


WORKLOADS: dict[str, Callable[[int, int], Workload]] = {
    "map": wide_map,
    "tree": tree_reduction,
    "dag": random_dag,
    "array": array_reduction,
}
#: name -> (workload, tasks, workers, threads per worker) run by ``--workload NAME``
PRESETS: dict[str, tuple[str, int, int, int]] = {
    "million": ("array", 1_000_000, 1000, 4),
}


def random_placement_bytes(workload: Workload, workers: int, seed: int = 0) -> int:
    """Bytes moved if every task ran on a uniformly random worker (each input fetched once
    per worker that needs it): the baseline a placement policy must beat."""
    rng = random.Random(seed)
    where = {k: rng.randrange(workers) for k in workload.keys}
    moved = 0
    nbytes = workload.nbytes
    for k in workload.keys:
        here = where[k]
        seen: set[str] = set()
        for d in workload.deps[k]:
            if where[d] != here and d not in seen:
                seen.add(d)
                moved += nbytes[d]
    return moved


# ----------------------------------------------------------------------- workers


class SimWorker:
    """A simulated worker: slots, data, fetches; obeys the scheduler's messages."""

    __slots__ = ("address", "alive", "bytes_in", "cancelled", "data", "incoming", "link_free",
                 "nthreads", "ready", "running", "tasks", "tasks_run", "waiting")  # fmt: skip

    def __init__(self, address: str, nthreads: int) -> None:
        self.address = address
        self.nthreads = nthreads
        #: key -> bytes held
        self.data: dict[str, int] = {}
        #: key -> its ComputeTask, while waiting for inputs or ready (not yet running)
        self.tasks: dict[str, ComputeTask] = {}
        #: key -> inputs it still waits for
        self.waiting: dict[str, set[str]] = {}
        #: heap of (priority, key) of tasks whose inputs are all here (stale entries skipped)
        self.ready: list[tuple[tuple[int, int], str]] = []
        #: key -> virtual start time, of tasks holding a thread
        self.running: dict[str, float] = {}
        #: running keys that were freed: their outcome is dropped when they end
        self.cancelled: set[str] = set()
        #: input key -> (its size, keys here waiting for it; None: keep it, AcquireReplicas)
        self.incoming: dict[str, tuple[int, list[str] | None]] = {}
        #: when the incoming link is free again
        self.link_free = 0.0
        self.tasks_run = 0
        self.bytes_in = 0
        self.alive = True


# ------------------------------------------------------------------------ results


@dataclass(slots=True)
class SimResult:
    """What one simulated run measured. Times are virtual seconds unless named ``wall``."""

    workload: str
    tasks: int
    workers: int
    threads: int
    bandwidth: float
    seed: int
    #: every wanted key reached memory (and the client was told so)
    completed: bool
    #: virtual time at which the last wanted key was reported in memory
    makespan: float
    #: total task time / total threads
    bound_work: float
    #: longest chain of task durations
    bound_critical_path: float
    #: scheduler state transitions during the run (submit to completion, then the release)
    transitions: int
    #: wall seconds spent inside ``SchedulerState.handle``
    handle_wall_s: float
    #: ``handle`` calls
    handle_calls: int
    #: wall seconds of the whole simulation (core + simulated workers)
    total_wall_s: float
    #: bytes fetched worker to worker
    bytes_moved: int
    #: transfers worker to worker
    transfers: int
    #: tasks with inputs run on a worker holding fewer of their input bytes than another
    #: holder did when the task was assigned (placement chose to move data: a steal)
    steals: int
    #: tasks that ran to completion on a worker, including runs whose outcome was dropped
    runs: int
    #: runs whose outcome was dropped (freed while running)
    cancelled_runs: int
    #: `DataMissing` reports (a worker was told of a holder that had no copy)
    missing_data: int
    #: messages addressed to workers that had left
    to_dead_workers: int
    #: tasks run per worker (address -> count)
    tasks_per_worker: dict[str, int] = field(default_factory=dict)
    #: after the client released every key: tasks the core still holds
    tasks_left_after_release: int = -1
    #: ... and keys the simulated workers still hold
    worker_keys_left_after_release: int = -1
    #: core memory per task, bytes (`core_memory_per_task`), when measured
    core_bytes_per_task: float | None = None
    #: client-side spec memory per task, bytes (`spec_memory_per_task`), when measured
    spec_bytes_per_task: float | None = None
    #: keys that ended erred or were never reported
    problems: list[str] = field(default_factory=list)
    #: cProfile top functions inside ``handle`` (when profiled)
    profile: str = ""

    @property
    def lower_bound(self) -> float:
        return max(self.bound_work, self.bound_critical_path)

    @property
    def transitions_per_s(self) -> float:
        return self.transitions / self.handle_wall_s if self.handle_wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["lower_bound"] = self.lower_bound
        d["transitions_per_s"] = self.transitions_per_s
        d["makespan_over_bound"] = self.makespan / self.lower_bound if self.lower_bound else 0
        return d


# --------------------------------------------------------------------- simulation

# Kinds of events in the queue (ints: cheap to compare in the heap).
_TO_SCHEDULER = 0
_TO_WORKER = 1
_TASK_DONE = 2
_FETCH_DONE = 3
_TICK = 4
_KILL = 5


class Simulation:
    """One run: the scheduler core, simulated workers, and a heap of timed events.

    Mutate only through `run`. ``state`` may be passed in (e.g. a validating one in tests).
    """

    def __init__(
        self,
        workload: Workload,
        workers: int = 8,
        threads: int = 2,
        bandwidth: float = 100e6,
        latency: float = 0.001,
        seed: int = 0,
        tick_interval: float | None = None,
        state: SchedulerState | None = None,
        release: bool = True,
        profile: bool = False,
    ) -> None:
        self.workload = workload
        self.state = state if state is not None else SchedulerState()
        self.seed = seed
        self.nthreads = threads
        self.bandwidth = bandwidth
        self.latency = latency
        self.tick_interval = tick_interval
        self.release = release
        self.profiler = cProfile.Profile() if profile else None
        self.workers: dict[str, SimWorker] = {
            f"sim://w{i}": SimWorker(f"sim://w{i}", threads) for i in range(workers)
        }
        #: every worker that ever ran (the dead too)
        self.all_workers = list(self.workers.values())
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object, object]] = []
        self._seq = 0
        self._ticks: set[float] = set()
        self._ids = 0
        self.client = "sim-client"
        #: wanted key -> the last report the client got (KeyInMemory / KeyErred / KeyLost)
        self.reports: dict[str, Msg] = {}
        self._wanted = set(workload.wanted)
        self._wanted_in_memory = 0
        self.makespan = 0.0
        self.handle_wall = 0.0
        self.handle_calls = 0
        self.bytes_moved = 0
        self.transfers = 0
        self.steals = 0
        self.runs = 0
        self.cancelled_runs = 0
        self.missing_data = 0
        self.to_dead = 0

    # ----------------------------------------------------------------- plumbing

    def _push(self, when: float, kind: int, a: object, b: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b))

    def _sid(self, name: str) -> str:
        self._ids += 1
        return f"{name}-{self._ids}"

    def _handle(self, events: list[SchedulerEvent]) -> None:
        """Feed ``events`` to the core and carry out its instructions."""
        t0 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
            out = self.state.handle(events, self.now)
            self.profiler.disable()
        else:
            out = self.state.handle(events, self.now)
        self.handle_wall += time.perf_counter() - t0
        self.handle_calls += 1
        self._instructions(out)

    def _instructions(self, out: list[Instruction]) -> None:
        arrive = self.now + self.latency
        for inst in out:
            if isinstance(inst, ToWorker):
                msg = inst.msg
                if isinstance(msg, ComputeTask) and msg.who_has:
                    self._count_steal(inst.address, msg)
                self._push(arrive, _TO_WORKER, inst.address, msg)
            elif isinstance(inst, ToClient):
                msg = inst.msg
                if isinstance(msg, (KeyInMemory, KeyErred, KeyLost)):
                    key = msg.key
                    if key in self._wanted:
                        before = self.reports.get(key)
                        was = isinstance(before, KeyInMemory)
                        now_in = isinstance(msg, KeyInMemory)
                        self.reports[key] = msg
                        if now_in and not was:
                            self._wanted_in_memory += 1
                            if self._wanted_in_memory == len(self._wanted):
                                self.makespan = self.now
                        elif was and not now_in:
                            self._wanted_in_memory -= 1
            elif isinstance(inst, WakeAt) and inst.when not in self._ticks:
                self._ticks.add(inst.when)
                self._push(max(inst.when, self.now), _TICK, None, None)

    def _count_steal(self, address: str, msg: ComputeTask) -> None:
        held: dict[str, int] = {}
        for dep, holders in msg.who_has.items():
            size = msg.nbytes.get(dep, 0)
            for h in holders:
                held[h] = held.get(h, 0) + size
        if held and held.get(address, 0) < max(held.values()):
            self.steals += 1

    def _to_scheduler(self, event: SchedulerEvent) -> None:
        self._push(self.now + self.latency, _TO_SCHEDULER, event, None)

    # ------------------------------------------------------------------ workers

    def _deliver(self, w: SimWorker, msg: Msg) -> None:
        if isinstance(msg, ComputeTask):
            self._compute(w, msg)
        elif isinstance(msg, FreeKeys):
            for key in msg.keys:
                w.data.pop(key, None)
                if key in w.running:
                    w.cancelled.add(key)
                elif w.tasks.pop(key, None) is not None:
                    w.waiting.pop(key, None)  # a ready entry is skipped when popped
        elif isinstance(msg, AcquireReplicas):
            for key, holders in msg.who_has.items():
                if key not in w.data and key not in w.incoming:
                    self._fetch(w, key, holders, msg.nbytes.get(key, 0), None)
        elif isinstance(msg, RefreshWhoHas):
            pass  # fetches start at once here: there is no pending fetch to redirect
        elif isinstance(msg, CloseWorker):
            self._leave(w, msg.reason, graceful=True)
        elif isinstance(msg, RestartWorker):
            w.data.clear()
            w.tasks.clear()
            w.waiting.clear()
            w.ready.clear()
            w.cancelled.update(w.running)
        else:  # pragma: no cover - a message kind the simulator does not know yet
            raise TypeError(f"simulated worker cannot handle {msg!r}")

    def _compute(self, w: SimWorker, msg: ComputeTask) -> None:
        key = msg.key
        if key in w.running:
            w.cancelled.discard(key)  # freed, then asked again: the run resumes
            return
        if key in w.tasks:
            return  # a duplicate
        if key in w.data:  # already here (a replica): report it, as WorkerState does
            self._to_scheduler(TaskFinishedEvent(self._sid("finished"), w.address, TaskFinished(
                key, w.data[key], "sim", self.now, self.now)))  # fmt: skip
            return
        w.tasks[key] = msg
        missing: set[str] = set()
        for dep, holders in msg.who_has.items():
            if dep in w.data:
                continue
            missing.add(dep)
            pending = w.incoming.get(dep)
            if pending is None:
                self._fetch(w, dep, holders, msg.nbytes.get(dep, 0), [key])
            elif pending[1] is not None:
                pending[1].append(key)
        if missing:
            w.waiting[key] = missing
        else:
            heapq.heappush(w.ready, (msg.priority, key))
            self._start(w)

    def _fetch(self, w: SimWorker, key: str, holders: Sequence[str], nbytes: int,
               waiters: list[str] | None) -> None:  # fmt: skip
        valid = [h for h in holders if h != w.address and h in self.workers
                 and key in self.workers[h].data]  # fmt: skip
        if not valid:
            # Every holder named lacks it (as a fetch that fails would find): tell the
            # scheduler, which refreshes the holders or recomputes and reassigns.
            for h in holders:
                if h != w.address:
                    self.missing_data += 1
                    self._to_scheduler(DataMissing(self._sid("missing"), w.address, key, h))
            return
        w.incoming[key] = (nbytes, waiters)
        start = max(self.now, w.link_free)
        w.link_free = start + nbytes / self.bandwidth
        self.transfers += 1
        self.bytes_moved += nbytes
        w.bytes_in += nbytes
        self._push(w.link_free + self.latency, _FETCH_DONE, w, key)

    def _fetch_done(self, w: SimWorker, key: str) -> None:
        nbytes, waiters = w.incoming.pop(key)
        if waiters is not None:
            # (a key freed and asked again while this input was in flight is listed twice)
            waiters = [k for k in dict.fromkeys(waiters) if k in w.waiting]
            if not waiters:
                return  # everything here that needed it was freed: drop it
        w.data[key] = nbytes
        self._to_scheduler(ReplicasAdded(self._sid("add-keys"), w.address, [key], [nbytes]))
        started = False
        for k in waiters or ():
            missing = w.waiting[k]
            missing.discard(key)
            if not missing:
                del w.waiting[k]
                heapq.heappush(w.ready, (w.tasks[k].priority, k))
                started = True
        if started:
            self._start(w)

    def _start(self, w: SimWorker) -> None:
        while w.ready and len(w.running) < w.nthreads:
            _, key = heapq.heappop(w.ready)
            if w.tasks.pop(key, None) is None:
                continue  # freed meanwhile
            w.running[key] = self.now
            self._push(self.now + self.workload.duration[key], _TASK_DONE, w, key)

    def _task_done(self, w: SimWorker, key: str) -> None:
        start = w.running.pop(key)
        self.runs += 1
        w.tasks_run += 1
        if key in w.cancelled:
            w.cancelled.discard(key)
            self.cancelled_runs += 1
        else:
            nbytes = self.workload.nbytes[key]
            w.data[key] = nbytes
            self._to_scheduler(TaskFinishedEvent(self._sid("finished"), w.address, TaskFinished(
                key, nbytes, "sim", start, self.now)))  # fmt: skip
        self._start(w)

    def kill(self, at: float, address: str) -> None:
        """Worker ``address`` dies at virtual time ``at``: its data and running tasks are
        lost; the scheduler hears `WorkerLeft` one latency later. (A transfer from it that
        already started completes: the model reserves a transfer's bytes when it starts.)"""
        self._push(at, _KILL, address, None)

    def _leave(self, w: SimWorker, reason: str, graceful: bool) -> None:
        w.alive = False
        del self.workers[w.address]
        self._to_scheduler(WorkerLeft(self._sid("left"), w.address, reason, graceful))

    # --------------------------------------------------------------------- run

    def done(self) -> bool:
        return self._wanted_in_memory == len(self._wanted)

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._handle([WorkerJoined(self._sid("joined"), a, w.nthreads, name=a)
                      for a, w in self.workers.items()])  # fmt: skip
        self._handle([TasksSubmitted(self._sid("submit"), self.client, self.workload.specs(),
                                     list(self.workload.wanted))])  # fmt: skip
        if self.tick_interval:
            self._push(self.tick_interval, _TICK, "heartbeat", None)
        self._loop()
        done = self.done()
        if not self._wanted:
            self.makespan = 0.0
        tasks_left = workers_left = -1
        if self.release and done:
            self._handle([KeysReleased(self._sid("release"), self.client,
                                       list(self.workload.wanted))])  # fmt: skip
            self._loop()
            tasks_left = len(self.state.tasks)
            workers_left = sum(len(w.data) + len(w.tasks) for w in self.workers.values())
        problems = [f"{k}: {type(m).__name__}" for k, m in self.reports.items()
                    if not isinstance(m, KeyInMemory)]  # fmt: skip
        problems += [f"{k}: never reported" for k in self.workload.wanted if k not in self.reports]
        profile = ""
        if self.profiler is not None:
            s = io.StringIO()
            pstats.Stats(self.profiler, stream=s).sort_stats("tottime").print_stats(15)
            profile = s.getvalue()
        wl = self.workload
        nthreads = sum(w.nthreads for w in self.all_workers) or 1
        return SimResult(
            workload=wl.name, tasks=len(wl), workers=len(self.all_workers), threads=self.nthreads,
            bandwidth=self.bandwidth, seed=self.seed, completed=done, makespan=self.makespan,
            bound_work=wl.total_work() / nthreads, bound_critical_path=wl.critical_path(),
            transitions=sum(self.state.transition_counts.values()),
            handle_wall_s=self.handle_wall, handle_calls=self.handle_calls,
            total_wall_s=time.perf_counter() - wall0, bytes_moved=self.bytes_moved,
            transfers=self.transfers, steals=self.steals, runs=self.runs,
            cancelled_runs=self.cancelled_runs, missing_data=self.missing_data,
            to_dead_workers=self.to_dead,
            tasks_per_worker={w.address: w.tasks_run for w in self.all_workers},
            tasks_left_after_release=tasks_left, worker_keys_left_after_release=workers_left,
            problems=problems[:20], profile=profile,
        )  # fmt: skip

    def _loop(self) -> None:
        heap = self._heap
        pop = heapq.heappop
        while heap:
            when, _, kind, a, b = pop(heap)
            self.now = when
            if kind == _TO_SCHEDULER:
                assert isinstance(a, SchedulerEvent)
                events = [a]
                while heap and heap[0][0] == when and heap[0][2] == _TO_SCHEDULER:
                    ev = pop(heap)[3]
                    assert isinstance(ev, SchedulerEvent)
                    events.append(ev)
                self._handle(events)
            elif kind == _TASK_DONE:
                assert isinstance(a, SimWorker) and isinstance(b, str)
                if a.alive:
                    self._task_done(a, b)
            elif kind == _TO_WORKER:
                assert isinstance(a, str) and isinstance(b, Msg)
                w = self.workers.get(a)
                if w is None:
                    self.to_dead += 1
                else:
                    self._deliver(w, b)
            elif kind == _FETCH_DONE:
                assert isinstance(a, SimWorker) and isinstance(b, str)
                if a.alive:
                    self._fetch_done(a, b)
            elif kind == _KILL:
                dying = self.workers.get(str(a))
                if dying is not None:
                    self._leave(dying, "killed by the simulation", graceful=False)
            else:  # _TICK
                self._ticks.discard(when)
                if a == "heartbeat":
                    if self.done() or not heap:
                        continue
                    assert self.tick_interval
                    self._push(when + self.tick_interval, _TICK, "heartbeat", None)
                self._handle([Tick(self._sid("tick"))])


# ------------------------------------------------------------------------ memory


def spec_memory_per_task(workload: Workload) -> float:
    """Bytes per task of the client-side graph: the `TaskSpec` list as submitted (keys and
    dependency lists included; the shared function and argument stand-ins not)."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    specs = workload.specs()
    after = tracemalloc.get_traced_memory()[0]
    if not tracing:
        tracemalloc.stop()
    n = len(specs)
    del specs
    return (after - before) / max(1, n)


def core_memory_per_task(workload: Workload) -> float:
    """Bytes per task the scheduler core allocates and keeps for a submitted graph.

    Measured with tracemalloc around ``handle(TasksSubmitted)`` on a fresh `SchedulerState`
    with no workers (every task rests in ``waiting``/``no-worker``, none has run): the
    `TaskState` records, the key index, dependency/dependent sets, the client's hold, group
    counts and the bounded story log; the specs themselves are the client's (not counted).
    """
    specs = workload.specs()
    state = SchedulerState()
    event = TasksSubmitted("submit", "client", specs, list(workload.wanted))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    out = state.handle([event], 0.0)
    del out
    after = tracemalloc.get_traced_memory()[0]
    if not tracing:
        tracemalloc.stop()
    return (after - before) / max(1, len(specs))


# ---------------------------------------------------------------------- entry points


def simulate(
    workload: str | Workload = "map",
    tasks: int = 1000,
    workers: int = 8,
    threads: int = 2,
    bandwidth: float = 100e6,
    latency: float = 0.001,
    seed: int = 0,
    tick_interval: float | None = None,
    memory: bool = False,
    validate: bool = False,
    profile: bool = False,
    progress: float | None = None,
    kill: int = 0,
) -> SimResult:
    """Build ``workload`` (a name in `WORKLOADS` or a `Workload`) and run it once.

    ``progress``: print the core's progress to stderr every this many wall seconds.
    ``kill``: this many random workers die at random times within the work bound."""
    wl = WORKLOADS[workload](tasks, seed) if isinstance(workload, str) else workload
    spec_bytes = core_bytes = None
    if memory:
        spec_bytes = spec_memory_per_task(wl)
        core_bytes = core_memory_per_task(wl)
    sim = Simulation(wl, workers, threads, bandwidth, latency, seed, tick_interval,
                     state=SchedulerState(validate=validate), profile=profile)  # fmt: skip
    rng = random.Random(seed)
    bound = wl.total_work() / (workers * threads)
    for address in rng.sample(sorted(sim.workers), min(kill, workers - 1)):
        sim.kill(rng.uniform(0, bound), address)
    stop = threading.Event()
    if progress:
        threading.Thread(target=_watch, args=(sim, progress, stop), daemon=True).start()
    try:
        result = sim.run()
    finally:
        stop.set()
    result.spec_bytes_per_task = spec_bytes
    result.core_bytes_per_task = core_bytes
    return result


def _watch(sim: Simulation, every: float, stop: threading.Event) -> None:
    """Print the core's progress to stderr every ``every`` wall seconds (a debugging aid for
    long runs: one ``handle`` call may take minutes, and this shows how far it got)."""
    t0 = time.perf_counter()
    while not stop.wait(every):
        try:
            transitions = sum(list(sim.state.transition_counts.values()))
            by_state = dict(sim.state.groups.states)
        except RuntimeError:  # changed size while read: try next time
            continue
        print(f"[{time.perf_counter() - t0:7.0f} s] virtual t={sim.now:.2f}"
              f" transitions={transitions:,} handle calls={sim.handle_calls:,}"
              f" tasks by state={ {k: v for k, v in by_state.items() if v} }",
              file=sys.stderr, flush=True)  # fmt: skip


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_table(results: Sequence[SimResult]) -> str:
    """One row per run: the figures the issue asks for."""
    cols = ["workload", "tasks", "workers x thr", "transitions/s", "core B/task", "spec B/task",
            "makespan s", "work bound", "crit. path", "ratio", "moved", "steals", "done",
            "wall s"]  # fmt: skip
    rows = []
    for r in results:
        rows.append([
            r.workload, f"{r.tasks:,}", f"{r.workers} x {r.threads}",
            f"{r.transitions_per_s:,.0f}",
            "-" if r.core_bytes_per_task is None else f"{r.core_bytes_per_task:,.0f}",
            "-" if r.spec_bytes_per_task is None else f"{r.spec_bytes_per_task:,.0f}",
            f"{r.makespan:,.2f}", f"{r.bound_work:,.2f}", f"{r.bound_critical_path:,.2f}",
            f"{r.makespan / r.lower_bound:.2f}" if r.lower_bound else "-",
            _fmt_bytes(r.bytes_moved), f"{r.steals:,}", "yes" if r.completed else "NO",
            f"{r.total_wall_s:,.1f}",
        ])  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [*WORKLOADS, *PRESETS, "all"]
    p = argparse.ArgumentParser(
        prog="python -m shoal.testing.simulate",
        description="Run the real scheduler core against simulated workers in virtual time.",
        epilog="ratio = makespan / max(work bound, critical path). 'million' = the array "
               "workload at 1,000,000 tasks on 1,000 workers x 4 threads (flags override). "
               "'all' runs every workload (not the preset).")  # fmt: skip
    p.add_argument(
        "--workload",
        choices=names,
        default="all",
        help="a workload, the 'million' preset, or 'all' workloads (default)",
    )
    p.add_argument("--tasks", type=int, default=None, help="about this many tasks (default 10,000)")
    p.add_argument("--workers", type=int, default=None, help="simulated workers (default 50)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default 2)")
    p.add_argument("--bandwidth", type=float, default=100e6, help="bytes/s (default 100e6)")
    p.add_argument("--latency", type=float, default=0.001, help="seconds per message")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick", type=float, default=None, help="also Tick every this many s")
    p.add_argument(
        "--kill",
        type=int,
        default=0,
        metavar="N",
        help="N random workers die at random times during the run",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the tracemalloc measures")
    p.add_argument("--validate", action="store_true", help="check core invariants each call")
    p.add_argument("--profile", action="store_true", help="cProfile top-15 inside handle")
    p.add_argument(
        "--progress",
        type=float,
        default=None,
        metavar="S",
        help="print the core's progress to stderr every S wall seconds",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    args = p.parse_args(argv)
    if args.workload in PRESETS:
        name, tasks, workers, threads = PRESETS[args.workload]
        runs = [(name, args.tasks or tasks, args.workers or workers, args.threads or threads)]
    else:
        todo = list(WORKLOADS) if args.workload == "all" else [args.workload]
        runs = [(n, args.tasks or 10_000, args.workers or 50, args.threads or 2) for n in todo]
    results = []
    for name, tasks, workers, threads in runs:
        r = simulate(name, tasks, workers, threads, args.bandwidth, args.latency, args.seed,
                     args.tick, memory=not args.no_memory, validate=args.validate,
                     profile=args.profile, progress=args.progress, kill=args.kill)  # fmt: skip
        results.append(r)
        if args.json:
            d = r.as_dict()
            d.pop("tasks_per_worker")
            print(json.dumps(d), flush=True)
        elif args.profile:
            print(f"--- {name}: cProfile inside handle (top 15 by own time)\n{r.profile}")
    if not args.json:
        print(format_table(results))
        for r in results:
            if r.problems or not r.completed:
                print(f"{r.workload}: NOT COMPLETED; {r.problems}")
    return 0 if all(r.completed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
