"""The scheduler's brain: a pure state machine, events in, instructions out.

`SchedulerState.handle(events, now)` is the only way to change it. It does no I/O, reads no
clock (``now`` comes with the call) and never unpickles user data: task functions, arguments,
results and exceptions are opaque bytes here.

Task states and the transitions between them:

    released -> waiting -> queued -> processing -> memory
                   |                  |-> erred       (the task raised, retries used up)
                   |                  |-> queued      (a retry, after its delay)
                   |-> no-worker (no valid worker is connected) -> waiting
    memory -> released   (all holders lost, or nobody needs it any more)
    any -> forgotten     (released, nobody wants it, no dependent needs it)

Invariants (checked by `validate_state`):
- a task is in ``waiting`` iff some dependency is not in memory, and ``waiting_on`` holds them;
  each of those is itself on its way (waiting, no-worker or processing), so nothing waits forever;
- a task in ``processing`` sits in exactly one worker's ``processing`` set, and that
  worker's ``occupancy`` and ``used_resources`` are the sums over that set;
- a task is ``queued`` iff its inputs are all in memory and no valid worker had room: it
  waits in ``queue`` (placement policy: `placement`);
- a task in ``memory`` has at least one holder, and each holder lists it in ``has_what``;
- tasks are ``no-worker`` only while there is no worker at all.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

from ..protocol.messages import (
    AcquireReplicas,
    CloseWorker,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    RefreshWhoHas,
    RestartWorker,
    TaskErred,
    TaskFinished,
    TaskSpec,
)
from . import placement
from .scheduler_checks import validate
from .scheduler_events import (
    ClientConnected,
    ClientDisconnected,
    ClientId,
    ClusterRestarted,
    DataMissing,
    DataScattered,
    FireAndForget,
    Instruction,
    KeysCancelled,
    KeysReleased,
    KeysWanted,
    ReplicasAdded,
    RetireWorkers,
    SchedulerEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    TaskSeceded,
    TasksSubmitted,
    Tick,
    ToClient,
    ToWorker,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from .scheduler_placement import Placement, _worker_load
from .scheduler_records import (
    _NEEDS_INPUTS,
    EMPTY,
    FIRE_AND_FORGET,
    STORY_LOG_SIZE,
    Failure,
    TaskState,
    TaskStateName,
    WorkerRecord,
    key_group,
)
from .task_groups import TaskGroups

__all__ = ["FIRE_AND_FORGET", "Failure", "SchedulerState", "TaskState", "TaskStateName",
           "WorkerRecord", "key_group"]


class SchedulerState(Placement):
    """All tasks, workers and clients the scheduler knows. Mutate only through `handle`."""

    def __init__(self, allowed_failures: int = 3, validate: bool = False) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[ClientId, set[TaskState]] = {}
        #: tasks that are ready but no valid worker is connected
        self.unrunnable: set[TaskState] = set()
        #: ready tasks waiting for room on a worker: heap of (priority, key)
        self.queue: list[tuple[tuple[int, int], str]] = []
        #: mean duration of each task group (exponentially weighted), for placement
        self.group_duration: dict[str, float] = {}
        #: a task that was on this many workers when they died fails ("killed-worker")
        self.allowed_failures = allowed_failures
        self.validate = validate
        self.story_log: deque[tuple[str, str, str, str, float]] = deque(maxlen=STORY_LOG_SIZE)
        self.transition_counts: dict[tuple[str, str], int] = {}
        #: tasks per group and state, for the dashboard, /metrics and progress bars
        self.groups = TaskGroups()
        self._order = 0
        self._now = 0.0
        self._stimulus = ""
        self._out: list[Instruction] = []
        #: workers that lost processing tasks in this call: fill them from the queue
        self._freed: set[WorkerRecord] = set()
        #: workers being retired (see `_check_retiring`)
        self._retiring: set[WorkerRecord] = set()
        self._wake_requested = float("inf")
        #: recent function payloads, each kept once (see `_share_function`)
        self._functions: dict[bytes, bytes] = {}
        #: non-retiring workers with capacity (`placement.has_capacity`), oldest-served first:
        #: where a task without inputs goes, found without scanning every worker
        self.roomy: OrderedDict[WorkerRecord, None] = OrderedDict()
        #: how many connected workers are not retiring (any of them may run unrestricted tasks)
        self.active_workers = 0
        #: rebuilt from a journal (`shoal.journal`): a worker that joins holding the result of
        #: a task still to run (or running elsewhere) gives that result, which is kept instead
        #: of recomputed. Set by the scheduler after a replay, before any worker comes back.
        self.restored = False

    # ------------------------------------------------------------------ entry

    def handle(self, events: Sequence[SchedulerEvent], now: float) -> list[Instruction]:
        """Apply ``events`` in order; return the messages to send."""
        self._now = now
        out: list[Instruction] = []
        self._out = out
        for event in events:
            self._stimulus = event.stimulus_id
            handler = _HANDLERS[type(event)]
            handler(self, event)
        if self._retiring:
            for ws in list(self._retiring):
                self._check_retiring(ws)
        if self._freed and self.queue:
            for ws in sorted(self._freed, key=_worker_load):
                if self.workers.get(ws.address) is ws:
                    self._fill(ws)
        self._freed.clear()
        self._out = []
        if self.validate:
            self.validate_state()
        return out

    # -------------------------------------------------------------- handlers

    def _handle_client_connected(self, ev: ClientConnected) -> None:
        self.clients.setdefault(ev.client, set())

    def _handle_client_disconnected(self, ev: ClientDisconnected) -> None:
        wanted = self.clients.pop(ev.client, set())
        for ts in wanted:
            ts.who_wants.pop(ev.client, None)
        for ts in wanted:
            self._release_if_unneeded(ts)

    def _handle_tasks_submitted(self, ev: TasksSubmitted) -> None:
        client_keys = self.clients.setdefault(ev.client, set())
        new: list[TaskState] = []
        for spec in ev.tasks:
            ts = self.tasks.get(spec.key)
            if ts is None:
                self._share_function(spec)
                self._order += 1
                ts = TaskState(spec.key, spec, (-spec.priority, self._order))
                self.tasks[spec.key] = ts
                self.groups.created(ts.group)
                new.append(ts)
            elif ts.spec is None and ts.state == "released":
                ts.spec = spec  # a lost scattered key given a recipe again
                new.append(ts)
        for ts in new:
            assert ts.spec is not None
            for dep_key in ts.spec.dependencies:
                dep = self.tasks.get(dep_key)
                if dep is None:
                    self._fail(ts, Failure("unknown-dependency",
                                           f"task {ts.key!r} depends on unknown key {dep_key!r}"
                                           " (it was released or never submitted)"))  # fmt: skip
                    break
                if ts.dependencies is EMPTY:
                    ts.dependencies = set()
                ts.dependencies.add(dep)
                if dep.dependents is EMPTY:
                    dep.dependents = set()
                dep.dependents.add(ts)
        wanted: list[TaskState] = []
        for key, generation in zip(ev.wanted, _generations(ev.generations, len(ev.wanted))):
            ts = self.tasks.get(key)
            if ts is not None:
                _hold(ts, ev.client, generation)
                client_keys.add(ts)
                wanted.append(ts)
        self._want(wanted, ev.client)
        for ts in new:
            self._forget_if_unused(ts)  # submitted but wanted by nobody, directly or not

    def _share_function(self, spec: TaskSpec) -> None:
        """Keep one copy of each recent function payload: a map of a million calls arrives
        as a million equal copies of the pickled function."""
        functions = self._functions
        shared = functions.get(spec.function)
        if shared is None:
            if len(functions) >= _SHARED_FUNCTIONS:
                del functions[next(iter(functions))]  # the oldest
            functions[spec.function] = spec.function
        else:
            spec.function = shared

    def _handle_keys_wanted(self, ev: KeysWanted) -> None:
        client_keys = self.clients.setdefault(ev.client, set())
        wanted: list[TaskState] = []
        for key, generation in zip(ev.keys, _generations(ev.generations, len(ev.keys))):
            ts = self.tasks.get(key)
            if ts is None:
                self._out.append(ToClient(ev.client, KeyErred(
                    key, "lost", f"key {key!r} is not known to the scheduler"
                    " (it was released by every client that held it)",
                    generation=generation)))  # fmt: skip
                continue
            _hold(ts, ev.client, generation)
            client_keys.add(ts)
            wanted.append(ts)
        self._want(wanted, ev.client)

    def _want(self, wanted: list[TaskState], client: ClientId) -> None:
        """``client`` now wants ``wanted``: compute what is missing, tell it what is done.

        A key that reaches memory or erred later is reported then (to every client that wants
        it); reporting here too would tell the client twice.
        """
        done = [ts for ts in wanted if ts.state in ("memory", "erred")]
        for ts in wanted:
            self._make_needed(ts)
        for ts in done:
            self._report_to_client(ts, client)

    def _handle_keys_released(self, ev: KeysReleased) -> None:
        client_keys = self.clients.get(ev.client, set())
        for key, generation in zip(ev.keys, _released_generations(ev.generations, len(ev.keys))):
            ts = self.tasks.get(key)
            if ts is None or ts.who_wants.get(ev.client, generation + 1) > generation:
                continue  # not held, or held again since (a newer generation): it stays
            del ts.who_wants[ev.client]
            client_keys.discard(ts)
            self._release_if_unneeded(ts)

    def _handle_keys_cancelled(self, ev: KeysCancelled) -> None:
        for key, generation in zip(ev.keys, _released_generations(ev.generations, len(ev.keys))):
            ts = self.tasks.get(key)
            if ts is None or ts.who_wants.get(ev.client, generation + 1) > generation:
                continue  # not held, or held again since the cancel was sent: it stays
            # Cancelling drops this client's interest in the key and in what depends on it.
            for t in [ts, *self._dependents_closure(ts)]:
                held = t.who_wants.pop(ev.client, None)
                if held is not None:
                    self.clients.get(ev.client, set()).discard(t)
                    self._out.append(ToClient(ev.client, KeyCancelled(t.key, "cancelled", held)))
            for t in [ts, *self._dependents_closure(ts)]:
                self._release_if_unneeded(t)

    def _handle_data_scattered(self, ev: DataScattered) -> None:
        client_keys = self.clients.setdefault(ev.client, set())
        generations = _generations(ev.generations, len(ev.keys))
        for key, addresses, nbytes, generation in zip(ev.keys, ev.workers, ev.nbytes, generations):
            ts = self.tasks.get(key)
            if ts is None:
                self._order += 1
                ts = TaskState(key, None, (0, self._order))
                self.tasks[key] = ts
                self.groups.created(ts.group)
            _hold(ts, ev.client, generation)
            client_keys.add(ts)
            holders = [self.workers[a] for a in addresses if a in self.workers]
            if ts.state == "memory":
                for ws in holders:
                    self._add_replica(ts, ws)
                self._report_to_client(ts, ev.client)
            elif holders:
                # The key names its value: a pending computation of it is no longer needed.
                self._accept_held(ts, holders, nbytes)  # reports to every client that wants it
            elif ts.state == "erred":
                self._report_to_client(ts, ev.client)
            else:
                self._fail(ts, Failure("lost", f"scattered key {key!r} has no live worker"))

    def _handle_worker_joined(self, ev: WorkerJoined) -> None:
        ws = self.workers.get(ev.address)
        if ws is None:
            ws = WorkerRecord(ev.address, ev.nthreads, ev.name, ev.memory_limit, ev.resources)
            self.workers[ev.address] = ws
            self.active_workers += 1
            self._note_room(ws)
        held: list[tuple[TaskState, int]] = []
        for i, key in enumerate(ev.keys):
            ts = self.tasks.get(key)
            if (self.restored and ts is not None and ts.spec is not None
                    and ts.state in _NEEDS_INPUTS):
                held.append((ts, ev.nbytes[i] if i < len(ev.nbytes) else 0))
                continue
            if ts is None or ts.state not in ("memory",):
                # Data we no longer track (or will recompute): have the worker drop it.
                if ts is None or ts.processing_on is not ws:
                    self._out.append(ToWorker(ws.address, FreeKeys([key], self._stimulus)))
                continue
            self._add_replica(ts, ws)
        # Dependents first: a result kept makes its inputs unneeded, rather than sent to run.
        for ts, nbytes in sorted(held, key=lambda pair: pair[0].priority, reverse=True):
            if ts.state in _NEEDS_INPUTS:
                self._accept_held(ts, [ws], nbytes)
            elif ts.state == "memory":
                self._add_replica(ts, ws)
            else:
                self._out.append(ToWorker(ws.address, FreeKeys([ts.key], self._stimulus)))
        for ts in sorted(self.unrunnable, key=_by_priority):
            if ts.state == "no-worker":
                self._transition(ts, "waiting")
                self._try_schedule(ts)
        self._freed.add(ws)  # a new worker has room: give it queued work

    def _accept_held(self, ts: TaskState, holders: list[WorkerRecord], nbytes: int) -> None:
        """``holders`` hold ``ts``'s value (scattered under its key, or brought back by
        workers after a restart): keep it (the key names its value) rather than compute it;
        a pending computation of it is no longer needed."""
        running_on = ts.processing_on
        if running_on is not None:
            self._unassign(ts)
            if running_on not in holders:
                self._free(running_on, ts.key)
        self.unrunnable.discard(ts)
        ts.waiting_on = EMPTY
        ts.nbytes = nbytes
        for ws in holders:
            self._add_replica(ts, ws)
        self._to_memory(ts)

    def _handle_worker_left(self, ev: WorkerLeft) -> None:
        ws = self.workers.pop(ev.address, None)
        if ws is None:
            return
        self.roomy.pop(ws, None)
        if not ws.retiring:
            self.active_workers -= 1
        # First the data that died with it, so that rescheduled tasks see true holders.
        lost: list[TaskState] = []
        refresh: dict[str, dict[str, list[str]]] = {}
        for ts in ws.has_what:
            _drop_holder(ts, ws)
            if not ts.who_has and ts.state == "memory":
                lost.append(ts)
            elif ts.who_has:
                # Workers running its dependents may be fetching it from the one that left
                # (and, if that one went silent, would wait out the fetch's timeout).
                holders = [w.address for w in ts.who_has]
                for dependent in ts.dependents:
                    running_on = dependent.processing_on
                    if (running_on is not None and running_on is not ws
                            and running_on not in ts.who_has):
                        refresh.setdefault(running_on.address, {})[ts.key] = holders
        ws.has_what.clear()
        for address, who_has in refresh.items():
            self._out.append(ToWorker(address, RefreshWhoHas(who_has, self._stimulus)))
        self._lose(sorted(lost, key=_by_priority),
                   f"its only holder {ws.address} left ({ev.reason or 'no reason'})")
        for ts in sorted(ws.processing, key=_by_priority):
            if ts.processing_on is not ws:
                continue
            self._unassign(ts)
            if not ev.graceful:
                ts.suspicious += 1
            if ts.suspicious >= self.allowed_failures:
                self._fail(ts, Failure(
                    "killed-worker",
                    f"task {ts.key!r} was on {ts.suspicious} workers that died"
                    f" (the last: {ws.address}, {ev.reason or 'no reason given'});"
                    " it may be what kills them",
                ))  # fmt: skip
            else:
                self._transition(ts, "waiting")
                self._try_schedule(ts)
        ws.processing.clear()
        # Queued tasks that only this worker could run (restrictions, resources) have
        # nowhere to go now: they become no-worker, and their clients hear why.
        for _, key in list(self.queue):
            queued = self.tasks.get(key)
            if queued is None or queued.state != "queued" or queued.spec is None:
                continue
            if self.workers and not queued.spec.workers and not queued.spec.resources:
                continue  # unrestricted: any worker will do
            if not placement.valid_workers(queued, self.workers.values())[0]:
                self._transition(queued, "waiting")
                self._try_schedule(queued)

    def _handle_task_finished(self, ev: TaskFinishedEvent) -> None:
        msg: TaskFinished = ev.msg
        ts = self.tasks.get(msg.key)
        ws = self.workers.get(ev.worker)
        if ts is None or ws is None:
            if ws is not None:
                self._free(ws, msg.key)
            return
        if ts.state != "processing" or ts.processing_on is not ws:
            # A late or duplicate report (the task was moved, released or already done).
            if ts.state == "memory":
                self._add_replica(ts, ws)
            else:
                self._free(ws, msg.key)
            return
        self._unassign(ts)
        if msg.stop > msg.start:
            old = self.group_duration.get(ts.group)
            took = msg.stop - msg.start
            self.group_duration[ts.group] = took if old is None else 0.8 * old + 0.2 * took
        ts.nbytes = msg.nbytes
        ts.typename = sys.intern(msg.typename)  # a few type names, a million tasks
        ts.warnings = msg.warnings
        self._add_replica(ts, ws)
        self._to_memory(ts)

    def _handle_task_erred(self, ev: TaskErredEvent) -> None:
        msg: TaskErred = ev.msg
        ts = self.tasks.get(msg.key)
        ws = self.workers.get(ev.worker)
        if ts is None or ws is None or ts.state != "processing" or ts.processing_on is not ws:
            return
        self._unassign(ts)
        if ts.retries_left > 0:
            assert ts.spec is not None
            ts.retries_left -= 1
            ts.attempts += 1
            # The doubling stops at 2**60: past 2**1023 the int does not convert to a float.
            ts.not_before = self._now + ts.spec.retry_delay * 2 ** min(ts.attempts - 1, 60)
            self._transition(ts, "waiting")
            self._try_schedule(ts)
            return
        ts.warnings = msg.warnings
        self._fail(ts, Failure("exception", msg.text, msg.exception, msg.traceback, ts.key))

    def _handle_tick(self, ev: Tick) -> None:
        self._wake_requested = float("inf")
        self._fill_all()
        delayed = [self.tasks[k].not_before for _, k in self.queue
                   if k in self.tasks and self.tasks[k].not_before > self._now]  # fmt: skip
        if delayed:
            self._wake_requested = min(delayed)
            self._out.append(WakeAt(self._wake_requested))

    def _handle_retire_workers(self, ev: RetireWorkers) -> None:
        for address in ev.workers:
            ws = self.workers.get(address)
            if ws is not None and not ws.retiring:
                ws.retiring = True
                self._retiring.add(ws)
                self.active_workers -= 1
                self._note_room(ws)

    def _check_retiring(self, ws: WorkerRecord) -> None:
        """Copy what only retiring workers hold to keepers; close ``ws`` once nothing is left."""
        if self.workers.get(ws.address) is not ws:
            self._retiring.discard(ws)
            return
        ws.replicating = {ts for ts in ws.replicating
                          if ts.state == "memory" and all(h.retiring for h in ts.who_has)}  # fmt: skip
        orphans = [ts for ts in ws.has_what if all(h.retiring for h in ts.who_has)]
        keepers = [w for w in self.workers.values() if not w.retiring]
        if orphans and keepers:
            planned = {w: w.nbytes for w in keepers}
            asks: dict[WorkerRecord, list[TaskState]] = {}
            for ts in sorted(orphans, key=_by_priority):
                if ts in ws.replicating:
                    continue
                target = min(keepers, key=lambda w: planned[w] / w.nthreads)
                planned[target] += ts.nbytes
                asks.setdefault(target, []).append(ts)
                ws.replicating.add(ts)
            for target, keys in asks.items():
                self._out.append(ToWorker(target.address, AcquireReplicas(
                    {t.key: [h.address for h in t.who_has] for t in keys},
                    {t.key: t.nbytes for t in keys}, self._stimulus)))  # fmt: skip
            return
        if ws.processing:
            return  # let its running tasks finish; their results are moved next
        # Its data lives elsewhere now (or there is nowhere to put it): close it.
        self._retiring.discard(ws)
        self._out.append(ToWorker(ws.address, CloseWorker("retired")))

    def _handle_cluster_restarted(self, ev: ClusterRestarted) -> None:
        """Every worker restarts: fail what clients wait for, forget every task."""
        for client, keys in self.clients.items():
            for ts in keys:
                self._out.append(ToClient(client, KeyErred(
                    ts.key, "lost", ev.reason, generation=ts.who_wants.get(client, 0))))
            keys.clear()
        for ts in self.tasks.values():
            self.story_log.append((ts.key, ts.state, "forgotten", self._stimulus, self._now))
        self.tasks.clear()
        self.groups.clear()
        self.queue.clear()
        self.unrunnable.clear()
        self._freed.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.long_running.clear()
            ws.has_what.clear()
            ws.replicating.clear()
            ws.nbytes = 0
            ws.occupancy = 0.0
            ws.used_resources = {}
            self._note_room(ws)
            self._out.append(ToWorker(ws.address, RestartWorker(ev.reason)))

    def _handle_fire_and_forget(self, ev: FireAndForget) -> None:
        self._handle_keys_wanted(KeysWanted(ev.stimulus_id, FIRE_AND_FORGET, ev.keys))
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state in ("memory", "erred"):
                self._let_go_if_forgotten(ts)  # already done: nothing left to see through
                self._release_if_unneeded(ts)

    def _let_go_if_forgotten(self, ts: TaskState) -> None:
        """A fire-and-forget key is done: stop holding it on the user's behalf."""
        if FIRE_AND_FORGET in ts.who_wants:
            del ts.who_wants[FIRE_AND_FORGET]
            self.clients.get(FIRE_AND_FORGET, set()).discard(ts)

    def _handle_replicas_added(self, ev: ReplicasAdded) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is not None and ts.state == "memory":
                self._add_replica(ts, ws)
            elif ts is None or ts.processing_on is not ws:
                self._out.append(ToWorker(ws.address, FreeKeys([key], self._stimulus)))
            # else: it fetched the key before we asked it to compute it; it reports that
            # as the task's result (FreeKeys would cancel the task we wait for).

    def _handle_task_seceded(self, ev: TaskSeceded) -> None:
        ts = self.tasks.get(ev.key)
        ws = self.workers.get(ev.worker)
        if ts is None or ws is None or ts.processing_on is not ws or ts in ws.long_running:
            return
        # It waits on other tasks: its thread (and its expected time) are free for them.
        ws.long_running.add(ts)
        ws.occupancy = ws.occupancy - ts.est if len(ws.processing) > 1 else 0.0
        ts.est = 0.0
        self._freed.add(ws)
        self._note_room(ws)

    def _handle_data_missing(self, ev: DataMissing) -> None:
        ts = self.tasks.get(ev.key)
        holder = self.workers.get(ev.holder)
        if ts is None:
            return
        if holder is not None and holder in ts.who_has:
            _drop_holder(ts, holder)
            holder.has_what.discard(ts)
            holder.nbytes -= ts.nbytes
        if ts.state != "memory":
            return
        if ts.who_has:
            self._out.append(ToWorker(ev.worker, RefreshWhoHas(
                {ts.key: [w.address for w in ts.who_has]}, self._stimulus)))  # fmt: skip
        else:
            self._lose([ts], f"no worker holds it any more (last tried: {ev.holder})")

    # ------------------------------------------------------------ mechanics

    def _transition(self, ts: TaskState, finish: TaskStateName, why: str = "") -> None:
        start = ts.state
        ts.state = finish
        stimulus = f"{self._stimulus} ({why})" if why else self._stimulus
        self.story_log.append((ts.key, start, finish, stimulus, self._now))
        pair = (start, finish)
        self.transition_counts[pair] = self.transition_counts.get(pair, 0) + 1
        self.groups.moved(ts.group, start, finish)

    def _make_needed(self, ts: TaskState) -> None:
        """Bring ``ts`` and the dependencies it lacks towards memory."""
        if ts.state != "released":
            return
        if ts.spec is None:
            self._fail(ts, Failure("lost", f"scattered key {ts.key!r} was lost with its worker"))
            return
        stack = [ts]
        ready: list[TaskState] = []
        while stack:
            t = stack.pop()
            if t.state != "released":
                continue
            if t.spec is None:
                self._fail(t, Failure("lost", f"scattered key {t.key!r} was lost with its worker"))
                continue
            self._transition(t, "waiting")
            t.waiting_on = _not_in_memory(t)
            erred = next((d for d in t.dependencies if d.state == "erred"), None)
            if erred is not None:
                self._fail(t, _inherited(erred))
                continue
            if not t.waiting_on:
                ready.append(t)
            for dep in t.waiting_on:
                if dep.state == "released":
                    stack.append(dep)
        for t in sorted(ready, key=_by_priority):
            if t.state == "waiting" and not t.waiting_on:
                self._try_schedule(t)

    def _add_replica(self, ts: TaskState, ws: WorkerRecord) -> None:
        # Counted at the key's size (not the size the reporter measured), so that dropping
        # the replica takes off exactly what was added.
        if ws not in ts.who_has:
            ts.who_has = (*ts.who_has, ws)
            ws.has_what.add(ts)
            ws.nbytes += ts.nbytes

    def _to_memory(self, ts: TaskState) -> None:
        self._transition(ts, "memory")
        ts.failure = None
        for client in ts.who_wants:
            self._report_to_client(ts, client)
        self._let_go_if_forgotten(ts)
        ready: list[TaskState] = []
        for dependent in ts.dependents:
            if dependent.state == "waiting" and ts in dependent.waiting_on:
                dependent.waiting_on.discard(ts)
                if not dependent.waiting_on:
                    ready.append(dependent)
        for dependent in sorted(ready, key=_by_priority):
            self._try_schedule(dependent)
        for dep in ts.dependencies:
            self._release_if_unneeded(dep)
        self._release_if_unneeded(ts)

    def _fail(self, ts: TaskState, failure: Failure) -> None:
        """Err ``ts`` and every dependent that was waiting for it."""
        stack = [(ts, failure)]
        let_go: list[TaskState] = []
        while stack:
            t, f = stack.pop()
            if t.state == "erred":
                continue
            running_on = t.processing_on
            if running_on is not None:
                self._unassign(t)
                self._free(running_on, t.key)
            self.unrunnable.discard(t)
            self._transition(t, "erred")
            t.failure = f
            for client in t.who_wants:
                self._report_to_client(t, client)
            if FIRE_AND_FORGET in t.who_wants:
                self._let_go_if_forgotten(t)
                let_go.append(t)
            inherited = _inherited(t)
            for dependent in t.dependents:
                if dependent.state in _NEEDS_INPUTS:
                    stack.append((dependent, inherited))
            for dep in t.dependencies:
                self._release_if_unneeded(dep)
        for t in let_go:
            self._forget_if_unused(t)  # nobody will ever ask for this error

    def _lose(self, lost: list[TaskState], why: str) -> None:
        """Keys in memory lost their last holder: recompute those that are still needed.

        All of them leave memory before any is recomputed, so that no task is sent to a worker
        with an input that has no holder.
        """
        for ts in lost:
            self._transition(ts, "released")
            for client, generation in ts.who_wants.items():
                if client != FIRE_AND_FORGET:  # its futures wait again, for the recomputation
                    self._out.append(ToClient(client, KeyLost(ts.key, why, generation)))
        for ts in lost:
            for dependent in ts.dependents:
                if dependent.state in ("processing", "queued", "no-worker"):
                    # Its worker cannot fetch the input: take the task back and wait again.
                    ws = dependent.processing_on
                    if ws is not None:
                        self._unassign(dependent)
                        self._free(ws, dependent.key)
                    self.unrunnable.discard(dependent)
                    self._transition(dependent, "waiting")
                    dependent.waiting_on = _not_in_memory(dependent)
                elif dependent.state == "waiting":
                    if dependent.waiting_on is EMPTY:
                        dependent.waiting_on = set()
                    dependent.waiting_on.add(ts)
        for ts in lost:
            if ts.state != "released":
                continue  # brought back already, as the input of another lost key
            if not self._is_needed(ts):
                self._forget_if_unused(ts)
            elif ts.spec is None:
                self._fail(ts, Failure("lost", f"scattered key {ts.key!r} was lost: {why}"))
            else:
                self._make_needed(ts)

    def _is_needed(self, ts: TaskState) -> bool:
        if ts.who_wants:
            return True
        return any(d.state in _NEEDS_INPUTS for d in ts.dependents)

    def _release_if_unneeded(self, ts: TaskState) -> None:
        if self._is_needed(ts):
            return
        state = ts.state
        if state == "memory":
            for ws in ts.who_has:
                ws.has_what.discard(ts)
                ws.nbytes -= ts.nbytes
                self._free(ws, ts.key)
            ts.who_has = ()
            self._transition(ts, "released")
        elif state in _NEEDS_INPUTS:
            running_on = ts.processing_on
            if running_on is not None:
                self._unassign(ts)
                self._free(running_on, ts.key)
            self.unrunnable.discard(ts)
            ts.waiting_on = EMPTY
            self._transition(ts, "released")
            for dep in ts.dependencies:
                self._release_if_unneeded(dep)
        self._forget_if_unused(ts)

    def _free(self, ws: WorkerRecord, key: str) -> None:
        """Tell ``ws`` to drop ``key``, unless it left (a new worker may reuse its address)."""
        if self.workers.get(ws.address) is ws:
            self._out.append(ToWorker(ws.address, FreeKeys([key], self._stimulus)))

    def _forget_if_unused(self, ts: TaskState) -> None:
        """Drop a released or erred task that nobody wants and no live dependent refers to."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state not in ("released", "erred") or t.who_wants or t.dependents:
                continue
            if self.tasks.get(t.key) is not t:
                continue
            del self.tasks[t.key]
            self.groups.forgotten(t.group, t.state)
            self.story_log.append((t.key, t.state, "forgotten", self._stimulus, self._now))
            for dep in t.dependencies:
                if t in dep.dependents:
                    dep.dependents.discard(t)
                stack.append(dep)
                if dep.state == "memory" or dep.state in _NEEDS_INPUTS:
                    self._release_if_unneeded(dep)
            t.dependencies = EMPTY

    def _report_to_client(self, ts: TaskState, client: ClientId) -> None:
        if client == FIRE_AND_FORGET:
            return  # a pseudo-client: nobody to tell
        generation = ts.who_wants.get(client, 0)
        if ts.state == "memory":
            self._out.append(ToClient(client, KeyInMemory(
                ts.key, [w.address for w in ts.who_has], ts.nbytes, ts.typename, ts.warnings,
                generation)))  # fmt: skip
        elif ts.state == "erred" and ts.failure is not None:
            f = ts.failure
            self._out.append(ToClient(client, KeyErred(
                ts.key, f.kind, f.text, f.exception, f.traceback, ts.warnings, generation)))  # fmt: skip

    def _dependents_closure(self, ts: TaskState) -> list[TaskState]:
        seen: set[TaskState] = set()
        stack = list(ts.dependents)
        while stack:
            t = stack.pop()
            if t not in seen:
                seen.add(t)
                stack.extend(t.dependents)
        return list(seen)

    # ---------------------------------------------------------------- queries

    def story(self, key: str) -> list[tuple[str, str, str, str, float]]:
        """Every logged transition of ``key``: (key, start, finish, stimulus_id, time)."""
        return [row for row in self.story_log if row[0] == key]

    def validate_state(self) -> None:
        """Check the invariants in the module docstring; raise AssertionError on a breach."""
        validate(self)


def _generations(generations: list[int] | None, n: int) -> list[int]:
    return generations if generations is not None and len(generations) == n else [0] * n


def _released_generations(generations: list[int] | None, n: int) -> list[int]:
    # No generations given: let go of whatever hold there is.
    if generations is not None and len(generations) == n:
        return generations
    return [_ANY_GENERATION] * n


_ANY_GENERATION = 2**62

#: how many distinct function payloads `_share_function` remembers
_SHARED_FUNCTIONS = 256


def _hold(ts: TaskState, client: ClientId, generation: int) -> None:
    """``client`` holds ``ts`` at ``generation`` (a client's generations only grow)."""
    held = ts.who_wants.get(client)
    if held is None or generation > held:
        ts.who_wants[client] = generation


def _not_in_memory(ts: TaskState) -> set[TaskState]:
    """``ts``'s dependencies not in memory (what it waits on), sharing EMPTY when none."""
    if not ts.dependencies:
        return EMPTY
    return {d for d in ts.dependencies if d.state != "memory"} or EMPTY


def _drop_holder(ts: TaskState, ws: WorkerRecord) -> None:
    if ws in ts.who_has:
        ts.who_has = tuple(w for w in ts.who_has if w is not ws)


def _by_priority(ts: TaskState) -> tuple[int, int]:
    return ts.priority


def _inherited(erred: TaskState) -> Failure:
    f = erred.failure
    assert f is not None
    return Failure(f.kind, f.text, f.exception, f.traceback, f.blame or erred.key)


_HANDLERS: dict[type[SchedulerEvent], Callable[[SchedulerState, Any], None]] = {
    ClientConnected: SchedulerState._handle_client_connected,
    ClientDisconnected: SchedulerState._handle_client_disconnected,
    TasksSubmitted: SchedulerState._handle_tasks_submitted,
    KeysWanted: SchedulerState._handle_keys_wanted,
    KeysReleased: SchedulerState._handle_keys_released,
    KeysCancelled: SchedulerState._handle_keys_cancelled,
    DataScattered: SchedulerState._handle_data_scattered,
    WorkerJoined: SchedulerState._handle_worker_joined,
    WorkerLeft: SchedulerState._handle_worker_left,
    TaskFinishedEvent: SchedulerState._handle_task_finished,
    TaskErredEvent: SchedulerState._handle_task_erred,
    ReplicasAdded: SchedulerState._handle_replicas_added,
    DataMissing: SchedulerState._handle_data_missing,
    TaskSeceded: SchedulerState._handle_task_seceded,
    Tick: SchedulerState._handle_tick,
    RetireWorkers: SchedulerState._handle_retire_workers,
    ClusterRestarted: SchedulerState._handle_cluster_restarted,
    FireAndForget: SchedulerState._handle_fire_and_forget,
}
