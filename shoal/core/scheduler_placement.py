"""Where ready tasks go: `SchedulerState`'s placement, queueing and assignment (a mixin).

A task any worker may run is placed in O(its inputs' holders): on the holder of most of its
input bytes, or else on one of a few workers with room taken round-robin from ``roomy``.
Restricted tasks (``workers=``, resources) filter the workers. The policy's arithmetic is in
`placement`; this part moves tasks between ``queued`` and ``processing`` and keeps each
worker's books (``processing``, ``occupancy``, ``used_resources``, ``roomy``) true.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..protocol.messages import ComputeTask, TaskWarning
from . import placement
from .scheduler_events import ClientId, Instruction, ToClient, ToWorker, WakeAt
from .scheduler_records import FIRE_AND_FORGET, TaskState, TaskStateName, WorkerRecord


class Placement:
    """The placement half of `SchedulerState`; the attributes are set by its ``__init__``."""

    tasks: dict[str, TaskState]
    workers: dict[str, WorkerRecord]
    clients: dict[ClientId, set[TaskState]]
    unrunnable: set[TaskState]
    queue: list[tuple[tuple[int, int], str]]
    group_duration: dict[str, float]
    roomy: OrderedDict[WorkerRecord, None]
    active_workers: int
    _now: float
    _stimulus: str
    _out: list[Instruction]
    _freed: set[WorkerRecord]
    _wake_requested: float

    if TYPE_CHECKING:
        def _transition(self, ts: TaskState, finish: TaskStateName, why: str = "") -> None: ...

    def _try_schedule(self, ts: TaskState) -> None:
        """Place a waiting task whose inputs are all in memory: on a worker, or in the queue."""
        if placement.is_unrestricted(ts) and self.active_workers:
            self.unrunnable.discard(ts)
            if ts.not_before > self._now or not self._place_unrestricted(ts):
                self._queue(ts)
            return
        valid, why = placement.valid_workers(ts, self.workers.values())
        if not valid:
            self._transition(ts, "no-worker", why)
            self.unrunnable.add(ts)
            self._warn_unrunnable(ts, why)
            return
        self.unrunnable.discard(ts)
        if ts.not_before > self._now:
            self._queue(ts)
            return
        best = placement.best_worker(ts, valid)
        if placement.has_room(best, ts):
            self._assign(ts, best)
            return
        # Steal at placement: a worker with room takes it if moving inputs beats waiting.
        roomy = [w for w in valid if w is not best and placement.has_room(w, ts)]
        if roomy:
            # The cheapest move (a worker holding some of the inputs), then the least loaded.
            alt = min(roomy, key=lambda w: (placement.transfer_time(ts, w), w.load))
            if placement.transfer_time(ts, alt) < placement.wait_time(best):
                self._assign(ts, alt)
                return
        self._queue(ts)

    def _place_unrestricted(self, ts: TaskState) -> bool:
        """`_try_schedule` for a task any worker may run, in O(its inputs' holders)."""
        held = placement.bytes_by_holder(ts) if ts.dependencies else None
        if not held:
            ws = self._pick_roomy()
            if ws is None:
                return False
            self._assign(ts, ws)
            return True
        best = placement.best_holder(held)
        if best in self.roomy:
            self._assign(ts, best)
            return True
        # Steal at placement: a worker with room takes it if moving inputs beats waiting.
        # The candidates: holders with room (cheapest moves), then a few others with room.
        total = placement.input_bytes(ts)
        candidates = [w for w in held if w in self.roomy]
        candidates.extend(w for w in self._roomy_sample() if w not in held)
        if not candidates:
            return False
        alt = min(candidates, key=lambda w: (total - held.get(w, 0), w.load, w.address))
        if (total - held.get(alt, 0)) / placement.BANDWIDTH_BYTES_S < placement.wait_time(best):
            self._assign(ts, alt)
            return True
        return False

    def _roomy_sample(self) -> list[WorkerRecord]:
        sample: list[WorkerRecord] = []
        for ws in self.roomy:
            sample.append(ws)
            if len(sample) == placement.ROOMY_SAMPLE:
                break
        return sample

    def _pick_roomy(self) -> WorkerRecord | None:
        """The least occupied of the next few workers with room; it goes to the back of the
        line, so that tasks without inputs spread round-robin over the cluster."""
        sample = self._roomy_sample()
        if not sample:
            return None
        ws = min(sample, key=lambda w: (w.occupancy / w.nthreads, w.load))
        self.roomy.move_to_end(ws)
        return ws

    def _note_room(self, ws: WorkerRecord) -> None:
        """Keep ``roomy`` true for ``ws`` after its load, retirement or membership changed."""
        if (not ws.retiring and placement.has_capacity(ws)
                and self.workers.get(ws.address) is ws):  # fmt: skip
            if ws not in self.roomy:
                self.roomy[ws] = None
        else:
            self.roomy.pop(ws, None)

    def _queue(self, ts: TaskState) -> None:
        self._transition(ts, "queued")
        heapq.heappush(self.queue, (ts.priority, ts.key))
        if self._now < ts.not_before < self._wake_requested:
            self._wake_requested = ts.not_before
            self._out.append(WakeAt(ts.not_before))

    def _fill(self, ws: WorkerRecord) -> None:
        """Give ``ws`` queued tasks while it has room: its own first, others' when cheap."""
        skipped: list[tuple[tuple[int, int], str]] = []
        #: tasks ``ws`` cannot take now (restrictions, resources in use, a retry's delay):
        #: passed over without limit, so that they never starve the work it can do behind
        #: them (a long queue of GPU tasks must not keep a CPU-only worker idle)
        passed: list[tuple[tuple[int, int], str]] = []
        cannot: set[tuple[Any, ...]] = set()  # restriction kinds ``ws`` cannot take
        # Skipping is bounded (not assigning): a long queue of others' work stays cheap.
        while self.queue and len(skipped) < 64:
            if not placement.has_capacity(ws):
                break
            entry = heapq.heappop(self.queue)
            ts = self.tasks.get(entry[1])
            if ts is None or ts.state != "queued" or ts.priority != entry[0]:
                continue  # stale entry: the task moved on
            if ts.not_before > self._now:
                passed.append(entry)
                continue
            if placement.is_unrestricted(ts):
                if ws.retiring:
                    passed.append(entry)
                    continue
                held = placement.bytes_by_holder(ts) if ts.dependencies else None
                best = placement.best_holder(held) if held else ws
                if best is not ws and best in self.roomy:
                    self._assign(ts, best)
                elif best is ws or placement.transfer_time(ts, ws) < placement.wait_time(best):
                    self._assign(ts, ws)
                else:
                    skipped.append(entry)  # cheaper to wait for the worker holding its inputs
                continue
            kind = _restriction_kind(ts)
            if kind in cannot:
                passed.append(entry)
                continue
            valid, _ = placement.valid_workers(ts, self.workers.values())
            if ws not in valid or not placement.has_room(ws, ts):
                cannot.add(kind)  # room only shrinks during this fill
                passed.append(entry)
                continue
            best = placement.best_worker(ts, valid)
            if best is not ws and placement.has_room(best, ts):
                self._assign(ts, best)
            elif best is ws or placement.transfer_time(ts, ws) < placement.wait_time(best):
                self._assign(ts, ws)
            else:
                skipped.append(entry)  # cheaper to wait for the worker holding its inputs
        for entry in skipped + passed:
            heapq.heappush(self.queue, entry)

    def _fill_all(self) -> None:
        # Only workers with capacity can take anything (`_fill` stops at once on the others).
        for ws in sorted(self.roomy, key=_worker_load):
            self._fill(ws)

    def _assign(self, ts: TaskState, ws: WorkerRecord) -> None:
        spec = ts.spec
        assert spec is not None
        self._transition(ts, "processing")
        ts.processing_on = ws
        ts.est = self.group_duration.get(ts.group, placement.UNKNOWN_DURATION_S)
        ws.processing.add(ts)
        ws.occupancy += ts.est
        self._note_room(ws)
        if spec.resources:
            for r, need in spec.resources.items():
                ws.used_resources[r] = ws.used_resources.get(r, 0.0) + need
        who_has = {d.key: [w.address for w in d.who_has] for d in ts.dependencies}
        nbytes = {d.key: d.nbytes for d in ts.dependencies}
        self._out.append(ToWorker(ws.address, ComputeTask(
            ts.key, spec.function, spec.args, who_has, nbytes, ts.priority,
            spec.resources, self._stimulus)))  # fmt: skip

    def _unassign(self, ts: TaskState) -> None:
        """Take ``ts`` off its worker's books (the caller decides what the worker is told)."""
        ws = ts.processing_on
        assert ws is not None
        ws.processing.discard(ts)
        ws.long_running.discard(ts)
        ws.occupancy = ws.occupancy - ts.est if ws.processing else 0.0
        spec = ts.spec
        if spec is not None and spec.resources:
            for r, need in spec.resources.items():
                ws.used_resources[r] = ws.used_resources.get(r, 0.0) - need
        if not ws.processing:  # exactly zero once idle, whatever rounding sums left behind
            ws.used_resources = dict.fromkeys(ws.used_resources, 0.0)
        ts.processing_on = None
        self._freed.add(ws)
        self._note_room(ws)

    def _warn_unrunnable(self, ts: TaskState, why: str) -> None:
        if self.workers:  # with no workers at all, waiting for one is expected
            for client in ts.who_wants:
                if client != FIRE_AND_FORGET:
                    self._out.append(ToClient(client, TaskWarning(
                        ts.key, f"task {ts.key!r} cannot run on any connected worker: {why}")))  # fmt: skip


def _worker_load(ws: WorkerRecord) -> float:
    return ws.load


def _restriction_kind(ts: TaskState) -> tuple[Any, ...]:
    """What decides where ``ts`` may run: tasks of one kind fit the same workers."""
    spec = ts.spec
    if spec is None:
        return ()
    resources = tuple(sorted(spec.resources.items())) if spec.resources else ()
    return (tuple(spec.workers or ()), spec.allow_other_workers, resources)
