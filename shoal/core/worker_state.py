"""The worker's brain: a pure state machine deciding what to fetch, run and drop.

`WorkerState.handle(events, now)` is the only way to change it; the worker server runs the
instructions (fetch from a peer, run on a thread, delete data, tell the scheduler) and feeds
the outcomes back as events. The data itself lives in the server's store; this keeps sizes.

Task states on a worker:

    waiting  -> ready -> executing -> memory      (tasks the scheduler asked us to run; a task
                                                  that fails is reported and forgotten)
    fetch -> flight -> memory                     (inputs held by other workers)
    executing --FreeKeys--> cancelled --ComputeTask, same spec--> executing (resumed)
    cancelled --ComputeTask, another spec--> cancelled, with the new spec waiting (the thread
                                                  cannot be stopped); when the old run ends
                                                  its outcome is dropped --> waiting/ready
    cancelled --FreeKeys--> cancelled (a waiting new spec is dropped too)
    executing/long-running --ComputeTask, another spec--> cancelled, the new spec waiting
                                                  (as if freed first: a late message)
    waiting/ready --ComputeTask, another spec--> waiting/ready, for the new spec
    memory (made here, unreported) --ComputeTask, another spec--> waiting (data dropped)
    executing --Secede--> long-running --Rejoin (once a slot is free)--> executing
                                                 (a task that waits on other tasks gives its
                                                 thread slot back; it still reports its result)
    fetch/flight --ComputeTask--> waiting         (the scheduler recomputes a lost input here;
                                                  the flight's data is dropped if it lands)
    a run that ends without a result we keep --> fetch, if a task here waits for it as an input

A key names a result, but a key may be reused for other work (a cancelled future's explicit
key, submitted again with another function): only a run of the spec last asked for
(`same_spec`: its function and arguments) is ever reported as the key's result. A result
kept unreported for a task here (a cancelled run's) is dropped if the key is then asked
for with another spec.

Invariants (checked by `validate_state`):
- a running task's ``run`` is the spec its thread runs; a reported ``executing`` or
  ``long-running`` task runs the spec the scheduler last asked for (``compute``); a
  ``cancelled`` task's ``compute`` is None (freed) or another spec, to run once it ends;
  only running tasks and results in memory have a ``run`` (in memory: the spec that made
  it here; None for data fetched or put here);
- tasks holding a thread slot (`executing`: state ``executing``, or ``cancelled`` while
  holding one) never exceed ``nthreads``; seceded tasks (`long_running`: ``long-running``,
  or ``cancelled`` after seceding) hold none; every running task is in exactly one of them;
- a ``waiting`` task waits on exactly its dependencies that are not in memory;
- every key in flight belongs to exactly one in-flight gather, and every key of an in-flight
  gather is in flight (or was put here meanwhile and left the gather);
- a key in memory is kept for a reason: the scheduler counts on it, or a task here needs it;
- unless ``paused`` (memory is short: `PauseEvent`), no task is left ready while a thread
  slot is free;
- every task holding a slot in a lane is its lane's head; the tasks queued behind a head
  (handed ahead: state ``executing`` or ``cancelled``, they hold no slot) are at most
  ``lookahead`` per lane, and every busy task is holding a slot, seceded, or queued.

Tasks back to back: each thread slot is a lane, a run queue the server's thread works
through. With ``lookahead`` > 0, once every slot is busy, up to ``lookahead`` ready tasks per
lane are handed ahead (`Execute` with the lane of a running task), so the thread that
finishes one task starts the next itself. The outcomes come back in the lane's order, so
the head ending passes its slot to the next in the lane. A task queued but not started is
taken back with `Revoke` (freed, another spec asked for, the worker pauses, a seceded task
waits to rejoin); it ends with `ExecuteSkipped`, or with its run's outcome if a thread
took it first: never run unknown, never lost. A head that secedes leaves its lane, which
goes on (on another thread) with the next task.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ..protocol.messages import (
    AddKeys,
    ComputeTask,
    LongRunning,
    MissingData,
    TaskErred,
    TaskFinished,
)
from .worker_events import (
    AcquireReplicasEvent,
    ComputeTaskEvent,
    DataPut,
    Execute,
    ExecuteDone,
    ExecuteFailed,
    ExecuteSkipped,
    FreeKeysEvent,
    GatherDep,
    GatherDone,
    GatherFailed,
    PauseEvent,
    RefreshWhoHasEvent,
    Rejoin,
    RejoinEvent,
    ReleaseData,
    Revoke,
    SecedeEvent,
    ToScheduler,
    WorkerEvent,
    WorkerInstruction,
)

WTaskStateName = Literal[
    "waiting", "ready", "executing", "long-running", "cancelled", "memory", "fetch", "flight"
]

#: Stop adding keys to one gather once it carries this many bytes.
GATHER_BATCH_BYTES = 64 * 2**20
#: Peers we fetch from at the same time.
MAX_CONCURRENT_GATHERS = 16


class WorkerTask:
    """The worker's record of one key (a task to run, or an input to fetch)."""

    __slots__ = ("key", "state", "priority", "compute", "dependencies", "dependents",
                 "waiting_for", "who_has", "nbytes", "wanted", "run", "lane")  # fmt: skip

    def __init__(self, key: str, state: WTaskStateName) -> None:
        self.key = key
        self.state: WTaskStateName = state
        self.priority: tuple[int, int] = (0, 0)
        #: the scheduler's instruction, for tasks we run (None for fetched inputs, and for
        #: cancelled runs nobody wants any more)
        self.compute: ComputeTask | None = None
        #: the spec the task's thread runs (set while it runs: ``executing``,
        #: ``long-running``, ``cancelled``); differs from ``compute`` only when cancelled
        self.run: ComputeTask | None = None
        self.dependencies: set[WorkerTask] = set()
        self.dependents: set[WorkerTask] = set()
        self.waiting_for: set[WorkerTask] = set()
        #: peers that hold this key, as the scheduler last said (for inputs to fetch)
        self.who_has: list[str] = []
        self.nbytes = 0
        #: the scheduler counts on this worker to keep the key (computed, reported, scattered)
        self.wanted = False
        #: the lane (thread slot's run queue) it is in: its head, or queued behind it
        self.lane: int | None = None

    def __repr__(self) -> str:
        return f"<WorkerTask {self.key!r} {self.state}>"


class WorkerState:
    """What one worker holds, runs and fetches. Mutate only through `handle`."""

    def __init__(self, address: str, nthreads: int, validate: bool = False,
                 transfer_limit: int | None = None, lookahead: int = 0) -> None:  # fmt: skip
        self.address = address
        self.nthreads = max(1, nthreads)
        self.tasks: dict[str, WorkerTask] = {}
        self.ready: list[tuple[tuple[int, int], str]] = []  # heap of (priority, key)
        #: running tasks that hold a thread slot (at most ``nthreads``)
        self.executing: set[WorkerTask] = set()
        #: running tasks that gave their slot back (`SecedeEvent`); not bounded
        self.long_running: set[WorkerTask] = set()
        #: long-running tasks waiting for a slot again, first come first served
        self.rejoining: list[WorkerTask] = []
        #: tasks handed ahead per lane, behind the running one (0: none, start one at a time)
        self.lookahead = max(0, lookahead)
        #: lane -> its tasks in run order: the head holds a slot, the rest are queued
        self.lanes: dict[int, list[WorkerTask]] = {}
        self._next_lane = 0
        #: queued tasks taken back (`Revoke`), until they end (`ExecuteSkipped` or an outcome)
        self.revoking: set[WorkerTask] = set()
        self.in_flight: dict[str, list[str]] = {}  # peer -> keys being fetched
        #: tasks that were put in "fetch" (some may have moved on since; pruned lazily)
        self.fetch_candidates: set[WorkerTask] = set()
        #: memory is short (`PauseEvent`): start no task and no fetch until it is not
        self.paused = False
        #: bytes of inputs in flight at most (None: no limit); a lone key may exceed it
        self.transfer_limit = transfer_limit
        self.validate = validate
        self.nbytes_in_memory = 0
        self._now = 0.0
        self._stimulus = ""
        self._out: list[WorkerInstruction] = []

    # ------------------------------------------------------------------ entry

    def handle(self, events: Sequence[WorkerEvent], now: float) -> list[WorkerInstruction]:
        self._now = now
        out: list[WorkerInstruction] = []
        self._out = out
        for event in events:
            self._stimulus = event.stimulus_id
            _HANDLERS[type(event)](self, event)
        self._start_fetches()
        self._start_tasks()
        self._out = []
        if self.validate:
            self.validate_state()
        return out

    # -------------------------------------------------------------- handlers

    def _handle_compute(self, ev: ComputeTaskEvent) -> None:
        msg = ev.msg
        ts = self.tasks.get(msg.key)
        if ts is None:
            ts = WorkerTask(msg.key, "waiting")
            self.tasks[msg.key] = ts
        elif ts.state == "cancelled":
            ts.wanted = True
            ts.compute = msg
            assert ts.run is not None
            if same_spec(ts.run, msg):  # the run under way is what is asked for: keep it
                ts.state = "long-running" if ts in self.long_running else "executing"
            # Else it stays cancelled: its outcome is dropped when it ends, then ``msg`` runs
            # (`_run_ended`); its thread cannot be stopped before.
            return
        elif ts.state in ("executing", "long-running"):
            ts.wanted = True
            assert ts.run is not None
            if not same_spec(ts.run, msg):
                # Other work under this key (the scheduler frees a key before it reuses it,
                # so this is a late or reordered message): as if it had been freed first.
                ts.state = "cancelled"
                ts.compute = msg
                self._revoke(ts)
            return
        elif ts.state in ("ready", "waiting"):
            ts.wanted = True
            assert ts.compute is not None
            if not same_spec(ts.compute, msg):  # not started yet: run the new spec instead
                self._release_dependencies(ts)
                self._compute_here(ts, msg)
            return
        elif ts.state == "memory":
            ts.wanted = True
            if ts.run is None or same_spec(ts.run, msg):
                self._report_done(ts, 0.0, 0.0, None)  # we already have it: say so again
                return
            # Our copy is the result of other work under this key (a cancelled run's, kept
            # unreported for a task here): drop it, and compute what is asked for now.
            self.nbytes_in_memory -= ts.nbytes
            self._out.append(ReleaseData(ts.key))
            for dependent in ts.dependents:
                if dependent.state in ("waiting", "ready"):
                    dependent.state = "waiting"  # its entry in the ready heap is skipped
                    dependent.waiting_for.add(ts)
            ts.run = None
        elif ts.state == "flight":
            # We are fetching it as an input, and are now asked to compute it: the scheduler
            # knows of no copy any more (the peer left or lost it). Compute it rather than
            # wait for that gather, which a silent peer makes last its whole timeout; what
            # the gather brings, if anything, is dropped (see `_handle_gather_done`).
            for keys in self.in_flight.values():
                if msg.key in keys:
                    keys.remove(msg.key)
                    break
        # New, or an input waiting for a holder: the scheduler knows of no copy; compute it.
        self._compute_here(ts, msg)

    def _handle_free_keys(self, ev: FreeKeysEvent) -> None:
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.wanted = False
            if ts.state in ("executing", "long-running", "cancelled"):
                ts.state = "cancelled"
                ts.compute = None  # a new spec waiting for the run to end goes too
                self._revoke(ts)  # handed ahead and not started: take it back
            elif ts.state in ("waiting", "ready"):
                self._drop_run(ts)
            elif ts.state in ("memory", "fetch"):
                self._forget_if_unneeded(ts)
            elif ts.state == "flight":
                ts.compute = None  # not to be reported when it lands; dropped then if unneeded

    def _handle_acquire_replicas(self, ev: AcquireReplicasEvent) -> None:
        for key, holders in ev.who_has.items():
            if key in self.tasks:
                continue  # already here or on its way
            ts = WorkerTask(key, "fetch")
            ts.nbytes = ev.nbytes.get(key, 0)
            ts.who_has = [h for h in holders if h != self.address]
            ts.wanted = True  # kept, and reported with AddKeys when it lands
            self.tasks[key] = ts
            self.fetch_candidates.add(ts)

    def _handle_refresh_who_has(self, ev: RefreshWhoHasEvent) -> None:
        for key, holders in ev.who_has.items():
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "fetch":
                ts.who_has = [h for h in holders if h != self.address]
                self.fetch_candidates.add(ts)
            elif ts is not None and ts.state == "flight" and ts.compute is None:
                ts.who_has = [h for h in holders if h != self.address] or ts.who_has
                self._refetch_if_holder_gone(ts, holders)

    def _handle_gather_done(self, ev: GatherDone) -> None:
        keys = self.in_flight.pop(ev.peer, [])
        added: list[str] = []
        sizes: list[int] = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != "flight":
                if key in ev.nbytes:
                    self._out.append(ReleaseData(key))
                continue
            if key in ev.nbytes:
                ts.nbytes = ev.nbytes[key]
                self._to_memory(ts)
                if self.tasks.get(key) is not ts:
                    continue  # nobody needed it any more
                if ts.compute is not None:
                    self._report_done(ts, 0.0, 0.0, None)
                else:
                    ts.wanted = True
                    added.append(key)
                    sizes.append(ts.nbytes)
            else:
                self._holder_failed(ts, ev.peer)
        for key in ev.nbytes.keys() - set(keys):
            # Put here directly while in flight (`DataPut`): keep that copy, or drop this one.
            ts = self.tasks.get(key)
            if ts is None or ts.state != "memory":
                self._out.append(ReleaseData(key))
        if added:
            self._out.append(ToScheduler(AddKeys(added, sizes, self._stimulus)))

    def _handle_gather_failed(self, ev: GatherFailed) -> None:
        keys = self.in_flight.pop(ev.peer, [])
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "flight":
                self._holder_failed(ts, ev.peer)

    def _handle_execute_done(self, ev: ExecuteDone) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state not in ("executing", "long-running", "cancelled"):
            self._out.append(ReleaseData(ev.key))
            return
        ran = self._stop_running(ts)
        if ts.state == "cancelled":
            if ts.compute is not None:
                # Other work was asked for under this key meanwhile: this result is not it.
                self._out.append(ReleaseData(ev.key))
                self._release_dependencies(ts)
                self._compute_here(ts, ts.compute)
            elif any(d.state == "waiting" for d in ts.dependents):
                # Nobody asked for it any more, but a task here needs it as an input: keep
                # the result for that task (unreported: the scheduler counts on another copy).
                self._release_dependencies(ts)
                ts.nbytes = ev.nbytes
                ts.run = ran  # what made it, should this key be asked for again
                self._to_memory(ts)
            else:
                self._forget(ts)
                self._out.append(ReleaseData(ev.key))
            return
        ts.nbytes = ev.nbytes
        ts.run = ran
        self._to_memory(ts)
        self._report_done(ts, ev.start, ev.stop, ev)

    def _handle_execute_failed(self, ev: ExecuteFailed) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state not in ("executing", "long-running", "cancelled"):
            return
        self._stop_running(ts)
        if ts.state == "cancelled" and ts.compute is not None:
            # Other work was asked for under this key meanwhile: this failure is not its.
            self._release_dependencies(ts)
            self._compute_here(ts, ts.compute)
            return
        if ts.state != "cancelled":
            self._out.append(ToScheduler(TaskErred(
                ts.key, ev.exception, ev.traceback, ev.text, ev.start, ev.stop, ev.warnings,
                self._stimulus)))  # fmt: skip
        # Nothing to keep: the scheduler never frees an erred key on the worker, and a retry
        # comes as a new ComputeTask.
        self._drop_run(ts)

    def _handle_execute_skipped(self, ev: ExecuteSkipped) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts not in self.revoking:
            return  # from before a reconnect
        self._stop_running(ts)
        if ts.state == "cancelled":
            if ts.compute is not None:  # another spec waited for this run to end
                self._release_dependencies(ts)
                self._compute_here(ts, ts.compute)
            else:
                self._drop_run(ts)
        else:
            # Still wanted (taken back for a pause or a rejoin, or asked for again after a
            # free): ready again, its inputs linked again (some may have gone meanwhile).
            assert ts.compute is not None
            self._compute_here(ts, ts.compute)

    def _handle_data_put(self, ev: DataPut) -> None:
        for key, nbytes in ev.nbytes.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = WorkerTask(key, "fetch")
                self.tasks[key] = ts
            if ts.state in ("fetch", "flight"):
                if ts.state == "flight":
                    for keys in self.in_flight.values():
                        if key in keys:
                            keys.remove(key)
                ts.nbytes = nbytes
                ts.wanted = True
                self._to_memory(ts)
                if ts.compute is not None:  # asked to compute it while it was in flight
                    self._report_done(ts, 0.0, 0.0, None)

    def _handle_secede(self, ev: SecedeEvent) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts not in self.executing:
            return  # already seceded, or no longer running
        self.executing.discard(ts)
        self.long_running.add(ts)
        if ts.lane is not None:
            self._leave_lane(ts)  # its lane goes on with the next task queued there
        if ts.state == "executing":
            ts.state = "long-running"
            # The scheduler stops counting it against our threads, and sends more work.
            self._out.append(ToScheduler(LongRunning(ts.key, self._stimulus)))
        # `_start_tasks` gives the freed slot to a rejoining or ready task.

    def _handle_rejoin(self, ev: RejoinEvent) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts not in self.long_running:
            # It holds a slot already (or is gone): never leave its thread waiting.
            self._out.append(Rejoin(ev.key))
            return
        if ts not in self.rejoining:
            self.rejoining.append(ts)
            if len(self.executing) >= self.nthreads:
                self._revoke_queued()  # a slot frees as soon as a lane's running task ends

    def _handle_pause(self, ev: PauseEvent) -> None:
        # Resuming needs nothing more: `handle` starts what waited, fetches and tasks.
        self.paused = ev.paused
        if ev.paused:
            self._revoke_queued()  # start nothing new: not even what was handed ahead

    # ------------------------------------------------------------ mechanics

    def _stop_running(self, ts: WorkerTask) -> ComputeTask | None:
        """``ts``'s run ended: it holds no slot and waits for none any more. Returns the
        spec it ran."""
        ran, ts.run = ts.run, None
        self.executing.discard(ts)
        self.long_running.discard(ts)
        self.revoking.discard(ts)
        if ts.lane is not None:
            self._leave_lane(ts)
        if ts in self.rejoining:
            self.rejoining.remove(ts)
        return ran

    def _leave_lane(self, ts: WorkerTask) -> None:
        """``ts`` ended, seceded or was skipped: out of its lane. If it was the head (and held
        the slot, already let go), the next task queued there holds the slot now: its
        lane's thread starts it next."""
        assert ts.lane is not None
        lane = self.lanes[ts.lane]
        head = lane[0] is ts
        lane.remove(ts)
        if not lane:
            del self.lanes[ts.lane]
        elif head:
            self.executing.add(lane[0])
        ts.lane = None
        self.revoking.discard(ts)  # a thread took it before the `Revoke`: no skip to come

    def _revoke(self, ts: WorkerTask) -> None:
        """Take ``ts`` back if it is queued in a lane (no thread may have started it)."""
        if ts.lane is not None and ts not in self.revoking and self.lanes[ts.lane][0] is not ts:
            self.revoking.add(ts)
            self._out.append(Revoke(ts.key))

    def _revoke_queued(self) -> None:
        for lane in self.lanes.values():
            for ts in lane[1:]:
                self._revoke(ts)

    def _compute_here(self, ts: WorkerTask, msg: ComputeTask) -> None:
        """Make ``ts`` a task to run here: link its inputs, ready it once it has them all."""
        ts.state = "waiting"
        ts.compute = msg
        ts.priority = msg.priority
        ts.wanted = True
        for dep_key, holders in msg.who_has.items():
            dep = self.tasks.get(dep_key)
            if dep is None:
                dep = WorkerTask(dep_key, "fetch")
                dep.nbytes = msg.nbytes.get(dep_key, 0)
                self.tasks[dep_key] = dep
                self.fetch_candidates.add(dep)
            if dep.state != "memory":
                # Where to fetch it from; kept even while it is not "fetch" (see `_drop_run`).
                dep.who_has = [h for h in holders if h != self.address] or dep.who_has
                dep.nbytes = msg.nbytes.get(dep_key, dep.nbytes)
                if dep.state == "flight" and dep.compute is None:
                    self._refetch_if_holder_gone(dep, holders)
            ts.dependencies.add(dep)
            dep.dependents.add(ts)
            if dep.state != "memory":
                ts.waiting_for.add(dep)
        if not ts.waiting_for:
            self._make_ready(ts)

    def _refetch_if_holder_gone(self, ts: WorkerTask, holders: list[str]) -> None:
        """``ts`` is in flight from a peer the scheduler no longer lists among its holders
        (the peer left, e.g. cut off and removed after its worker-ttl): fetch it from a
        listed holder now rather than wait for that gather to fail, which takes its whole
        timeout when the peer is silent. The old gather's answer, if any, is dropped."""
        listed = [h for h in holders if h != self.address]
        if not listed:
            return
        for peer, keys in self.in_flight.items():
            if ts.key in keys:
                if peer in listed:
                    return
                keys.remove(ts.key)  # it leaves that gather (see `_handle_gather_done`)
                break
        ts.state = "fetch"
        self.fetch_candidates.add(ts)

    def _drop_run(self, ts: WorkerTask) -> None:
        """``ts`` will not be computed here (freed, failed, or cancelled and ended).

        If a task here waits for it as an input (the scheduler said another worker holds it),
        fetch it from there; otherwise forget it.
        """
        self._release_dependencies(ts)
        if any(d.state == "waiting" for d in ts.dependents):
            ts.state = "fetch"
            ts.compute = None
            ts.run = None
            ts.wanted = False
            self.fetch_candidates.add(ts)
        else:
            self._forget(ts)

    def _make_ready(self, ts: WorkerTask) -> None:
        ts.state = "ready"
        heapq.heappush(self.ready, (ts.priority, ts.key))

    def _to_memory(self, ts: WorkerTask) -> None:
        ts.state = "memory"
        self.nbytes_in_memory += ts.nbytes
        for dependent in ts.dependents:
            if dependent.state == "waiting":
                dependent.waiting_for.discard(ts)
                if not dependent.waiting_for:
                    self._make_ready(dependent)
        if not ts.wanted and not ts.dependents and ts.compute is None:
            self._forget(ts)

    def _report_done(self, ts: WorkerTask, start: float, stop: float,
                     ev: ExecuteDone | None) -> None:  # fmt: skip
        self._out.append(ToScheduler(TaskFinished(
            ts.key, ts.nbytes, ev.typename if ev else "", start, stop,
            ev.warnings if ev else None, self._stimulus)))  # fmt: skip
        self._release_dependencies(ts)

    def _release_dependencies(self, ts: WorkerTask) -> None:
        """``ts`` no longer needs its inputs locally; drop those nobody else needs."""
        for dep in list(ts.dependencies):
            dep.dependents.discard(ts)
            self._forget_if_unneeded(dep)
        ts.dependencies.clear()
        ts.waiting_for.clear()

    def _holder_failed(self, ts: WorkerTask, peer: str) -> None:
        if peer in ts.who_has:
            ts.who_has.remove(peer)
        self._out.append(ToScheduler(MissingData(ts.key, peer, self._stimulus)))
        if ts.compute is not None:
            # The scheduler asked us to compute it meanwhile: do, rather than wait for a copy.
            self._compute_here(ts, ts.compute)
        else:
            ts.state = "fetch"
            self.fetch_candidates.add(ts)
            self._forget_if_unneeded(ts)  # its dependents went while it was in flight

    def _forget_if_unneeded(self, ts: WorkerTask) -> None:
        if ts.wanted or ts.state in ("executing", "long-running", "cancelled", "flight"):
            return
        if any(d.state in ("waiting", "ready") for d in ts.dependents):
            return
        self._forget(ts)

    def _forget(self, ts: WorkerTask) -> None:
        if self.tasks.get(ts.key) is not ts:
            return
        del self.tasks[ts.key]
        if ts.state == "memory":
            self.nbytes_in_memory -= ts.nbytes
            self._out.append(ReleaseData(ts.key))
        for dep in list(ts.dependencies):
            dep.dependents.discard(ts)
            self._forget_if_unneeded(dep)
        ts.dependencies.clear()
        ts.waiting_for.clear()
        for dependent in ts.dependents:
            dependent.dependencies.discard(ts)

    def _start_tasks(self) -> None:
        # Tasks already started come first: finishing them frees what they hold.
        while self.rejoining and len(self.executing) < self.nthreads:
            back = self.rejoining.pop(0)
            self.long_running.discard(back)
            self.executing.add(back)
            if back.state == "long-running":
                back.state = "executing"
            self._out.append(Rejoin(back.key))
        # Paused: tasks already started still get their slot back (above), new ones wait.
        while self.ready and not self.paused and len(self.executing) < self.nthreads:
            ts = self._pop_ready()
            if ts is None:
                break
            self._next_lane += 1
            self.lanes[self._next_lane] = []
            self.executing.add(ts)
            self._hand(ts, self._next_lane)
        if not self.lookahead or self.paused or self.rejoining:
            return
        # Every slot is busy: hand tasks ahead, to the lanes with the fewest queued. Few
        # (``lookahead``), as a task that comes later with a higher priority waits behind them.
        while self.ready:
            short = [(len(tasks), lane) for lane, tasks in self.lanes.items()
                     if len(tasks) <= self.lookahead]  # fmt: skip
            if not short:
                break
            ts = self._pop_ready()
            if ts is None:
                break
            if ts.compute is not None and ts.compute.resources:
                # Not ahead: it waits for the first slot that frees, not behind one lane's
                # task (the scheduler placed it here for resources it counts as busy now).
                heapq.heappush(self.ready, (ts.priority, ts.key))
                break
            self._hand(ts, min(short)[1])

    def _pop_ready(self) -> WorkerTask | None:
        while self.ready:
            _, key = heapq.heappop(self.ready)
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "ready":
                return ts
            # freed (or asked for with another spec) while it was queued: skipped
        return None

    def _hand(self, ts: WorkerTask, lane: int) -> None:
        ts.state = "executing"
        ts.run = ts.compute
        ts.lane = lane
        self.lanes[lane].append(ts)
        self._out.append(Execute(ts.key, lane))

    def _start_fetches(self) -> None:
        if self.paused or len(self.in_flight) >= MAX_CONCURRENT_GATHERS:
            return
        budget: int | None = None
        if self.transfer_limit is not None:
            budget = self.transfer_limit - self.bytes_in_flight()
            if budget <= 0 and self.in_flight:
                return
        # Each key goes to the free holder given the fewest bytes so far this round, largest
        # keys first (so the bytes come out even), so keys whose replicas are spread over
        # several workers are fetched from all of them at once.
        by_peer: dict[str, list[WorkerTask]] = {}
        assigned: dict[str, int] = {}
        for ts in sorted(self.fetch_candidates, key=lambda t: (-t.nbytes, t.key)):
            if ts.state != "fetch" or self.tasks.get(ts.key) is not ts:
                self.fetch_candidates.discard(ts)
                continue
            if not ts.who_has:
                continue
            if not any(d.state == "waiting" for d in ts.dependents) and not ts.wanted:
                continue
            free = [p for p in ts.who_has if p not in self.in_flight]
            if free:
                peer = min(free, key=lambda p: assigned.get(p, 0))  # ties: the first listed
                assigned[peer] = assigned.get(peer, 0) + ts.nbytes
                by_peer.setdefault(peer, []).append(ts)
        for peer, wanted in by_peer.items():
            if len(self.in_flight) >= MAX_CONCURRENT_GATHERS:
                break
            keys: list[str] = []
            total = 0
            for ts in wanted:
                if keys and total + ts.nbytes > GATHER_BATCH_BYTES:
                    break
                if budget is not None and total + ts.nbytes > budget and (keys or self.in_flight):
                    break  # over the transfer limit (a lone key may go when nothing flies)
                ts.state = "flight"
                self.fetch_candidates.discard(ts)
                keys.append(ts.key)
                total += ts.nbytes
            if not keys:
                continue
            self.in_flight[peer] = keys
            self._out.append(GatherDep(peer, list(keys), total))  # a copy: `keys` may shrink
            if budget is not None:
                budget -= total

    # ---------------------------------------------------------------- queries

    def bytes_in_flight(self) -> int:
        return sum(self.tasks[k].nbytes for keys in self.in_flight.values() for k in keys
                   if k in self.tasks)  # fmt: skip

    def validate_state(self) -> None:
        busy = [t for t in self.tasks.values()
                if t.state in ("executing", "long-running", "cancelled")]  # fmt: skip
        queued = set()
        for lane_id, lane in self.lanes.items():
            assert lane and lane[0] in self.executing, (lane_id, lane)
            assert len(lane) <= 1 + self.lookahead, (lane_id, lane)
            for ts in lane:
                assert ts.lane == lane_id and self.tasks.get(ts.key) is ts, (lane_id, ts)
            queued.update(lane[1:])
        assert len(self.executing) <= self.nthreads, self.executing
        assert not self.executing & self.long_running, self.executing & self.long_running
        assert not queued & (self.executing | self.long_running), queued
        assert set(busy) == self.executing | self.long_running | queued, (
            busy, self.executing, self.long_running, queued)
        assert self.revoking <= queued | self.executing, self.revoking
        for ts in self.revoking:
            assert ts.lane is not None, ts
        for ts in queued:
            assert ts.state in ("executing", "cancelled"), ts
        for ts in self.executing:
            assert ts.state in ("executing", "cancelled"), ts
            assert ts.lane is None or self.lanes[ts.lane][0] is ts, ts
        for ts in self.long_running:
            assert ts.lane is None, ts
        for ts in self.long_running:
            assert ts.state in ("long-running", "cancelled"), ts
        assert len(set(self.rejoining)) == len(self.rejoining), self.rejoining
        for ts in self.rejoining:
            assert ts in self.long_running, ts
        flying = [k for keys in self.in_flight.values() for k in keys]
        assert len(flying) == len(set(flying)), flying
        for key in flying:
            assert self.tasks[key].state == "flight", self.tasks[key]
        in_heap = {key for _, key in self.ready}
        memory = 0
        for key, ts in self.tasks.items():
            assert ts.key == key
            if ts.state == "flight":
                assert key in flying, ts
            if ts.state == "fetch":
                assert ts in self.fetch_candidates, ts
            if ts.state == "waiting":
                assert ts.waiting_for, ts
                assert ts.waiting_for == {d for d in ts.dependencies if d.state != "memory"}, ts
            if ts.state == "ready":
                assert key in in_heap, ts
            if ts.state in ("waiting", "ready", "executing", "long-running"):
                assert ts.compute is not None, ts
            if ts.state in ("executing", "long-running", "cancelled"):
                assert ts.run is not None, ts
                if ts.state != "cancelled":
                    assert ts.compute is not None and same_spec(ts.run, ts.compute), ts
                else:
                    assert ts.compute is None or not same_spec(ts.run, ts.compute), ts
            elif ts.state != "memory":
                assert ts.run is None, ts
            if ts.state == "memory":
                memory += ts.nbytes
                assert ts.wanted or ts.dependents or ts.compute is not None, f"{ts} kept for nothing"
            for dep in ts.dependencies:
                assert ts in dep.dependents, (ts, dep)
                assert self.tasks.get(dep.key) is dep, (ts, dep)
        assert memory == self.nbytes_in_memory, (memory, self.nbytes_in_memory)
        if len(self.executing) < self.nthreads:
            assert not self.rejoining, self.rejoining
            if not self.paused:
                assert not any(t.state == "ready" for t in self.tasks.values()), "ready left"


def same_spec(a: ComputeTask, b: ComputeTask) -> bool:
    """Whether two ComputeTasks ask for the same work: the same function and arguments.

    Cheap where it can be (the same objects, or sizes that differ); else the bytes are
    compared, without copies. Only a key asked for again while its run is under way gets
    here, not the path of every task."""
    if a is b:
        return True
    if a.function is not b.function and a.function != b.function:
        return False
    fa, fb = a.args.frames, b.args.frames
    if a.args is b.args or fa is fb:
        return True
    if len(fa) != len(fb):
        return False
    views = [(memoryview(x).cast("B"), memoryview(y).cast("B")) for x, y in zip(fa, fb)]
    return all(x.nbytes == y.nbytes for x, y in views) and all(x == y for x, y in views)


_HANDLERS: dict[type[WorkerEvent], Callable[[WorkerState, Any], None]] = {
    ComputeTaskEvent: WorkerState._handle_compute,
    FreeKeysEvent: WorkerState._handle_free_keys,
    RefreshWhoHasEvent: WorkerState._handle_refresh_who_has,
    AcquireReplicasEvent: WorkerState._handle_acquire_replicas,
    GatherDone: WorkerState._handle_gather_done,
    GatherFailed: WorkerState._handle_gather_failed,
    ExecuteDone: WorkerState._handle_execute_done,
    ExecuteFailed: WorkerState._handle_execute_failed,
    ExecuteSkipped: WorkerState._handle_execute_skipped,
    DataPut: WorkerState._handle_data_put,
    SecedeEvent: WorkerState._handle_secede,
    RejoinEvent: WorkerState._handle_rejoin,
    PauseEvent: WorkerState._handle_pause,
}
