"""Property-based tests of `WorkerState` (hypothesis): random sequences of events keep its
invariants (`validate_state` runs after every ``handle``) and it never reports a result made
by a spec other than the one last asked for under that key.

A model plays the scheduler, the peers, the thread pool and the data store around the state:
it sends ComputeTask (new keys, duplicates, the same key with another spec, with or without
freeing it first), FreeKeys (releases and steals), finishes runs (success or failure), answers
gathers (whole, partly missing, failed, late and duplicated), drops peers (RefreshWhoHas),
secedes and rejoins tasks, pauses and resumes, and puts data. Data is tagged in the model's
store with the spec that made it, so a report can be checked against what was asked.

The threads are the server's lanes: with ``lookahead`` > 0 tasks are handed ahead, a thread
that ends a task starts the next of its lane itself, and what threads tell the state
(outcomes, secedes, rejoins, revoked tasks) is delivered later, in order, in batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from shoal.core.worker_events import (
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
)
from shoal.core.worker_state import WorkerState
from shoal.protocol.messages import (
    AddKeys,
    ComputeTask,
    LongRunning,
    MissingData,
    TaskErred,
    TaskFinished,
)
from shoal.protocol.serialize import Serialized

ADDRESS = "w0"
PEERS = ["p1", "p2", "p3"]
#: keys the scheduler asks us to compute
TASKS = ["k1", "k2", "k3", "k4"]
#: inputs that live on peers (also a task key computed elsewhere: "k4")
INPUTS = ["r1", "r2", "r3", "k4"]
#: (function, args): three specs, two of them sharing a function
SPECS = [(b"f", b"x"), (b"f", b"y"), (b"g", b"x")]
#: each key's size, all different: `WorkerState._start_fetches` takes the largest first, and
#: the order of equal sizes (a set's) would differ from run to run, which hypothesis rejects
SIZE = {key: 8 + i for i, key in enumerate(dict.fromkeys(TASKS + INPUTS))}
EXC = Serialized([b"exception"])

Spec = tuple[bytes, bytes]


def tag(msg: ComputeTask) -> Spec:
    return (bytes(msg.function), bytes(msg.args.frames[0]))


class WorkerModel(RuleBasedStateMachine):
    #: tasks handed ahead per lane
    LOOKAHEAD = 0
    NTHREADS = 2

    def __init__(self) -> None:
        super().__init__()
        self.ws = WorkerState(ADDRESS, nthreads=self.NTHREADS, validate=True, transfer_limit=64,
                              lookahead=self.LOOKAHEAD)  # fmt: skip
        self.now = 0.0
        self.n = 0
        #: the spec last asked for per key, while the scheduler wants it from us
        self.asked: dict[str, Spec] = {}
        #: the server's store: key -> the spec that made the value, or "peer"
        self.store: dict[str, Spec | str] = {}
        #: keys on a thread -> the spec that thread runs
        self.running: dict[str, Spec] = {}
        self.seceded: set[str] = set()
        #: seceded threads blocked in rejoin until `Rejoin`
        self.blocked: set[str] = set()
        self.gathers: dict[str, list[str]] = {}
        #: the failures being handled now: key -> spec of the run that failed
        self.failing: dict[str, Spec] = {}
        #: the server's lanes: tasks handed and not started, with the spec handed
        self.lanes: dict[int, list[tuple[str, Spec]]] = {}
        #: running key -> its thread's lane
        self.lane_of: dict[str, int] = {}
        #: seceded key -> its lane, until the state hears of it and the lane goes on
        self.detached: dict[str, int] = {}
        #: keys whose thread seceded at some point
        self.asked_to_secede: set[str] = set()
        #: what threads told the loop, not delivered yet: (event, (key, spec) to store)
        self.pending: list[tuple[WorkerEvent, tuple[str, Spec] | None]] = []

    # ---------------------------------------------------------------- plumbing

    def sid(self, name: str) -> str:
        self.n += 1
        return f"{name}-{self.n}"

    def handle(self, *events: WorkerEvent) -> None:
        self.now += 1.0
        out = self.ws.handle(list(events), self.now)
        for ins in out:
            if isinstance(ins, Execute):
                assert ins.key not in self.running, f"second run of {ins.key} at once"
                assert not any(k == ins.key for q in self.lanes.values() for k, _ in q)
                compute = self.ws.tasks[ins.key].compute  # what the server hands the thread
                assert compute is not None
                assert self.asked.get(ins.key) == tag(compute), "runs a spec not asked for"
                for dep in compute.who_has:
                    assert dep in self.store, f"{ins.key} started without its input {dep}"
                if ins.lane in self.lanes:
                    self.lanes[ins.lane].append((ins.key, tag(compute)))
                else:  # a lane without a thread: one starts, and runs it
                    self.lanes[ins.lane] = []
                    self.running[ins.key] = tag(compute)
                    self.lane_of[ins.key] = ins.lane
            elif isinstance(ins, Revoke):
                for queue in self.lanes.values():
                    for entry in queue:
                        if entry[0] == ins.key:
                            queue.remove(entry)
                            self.pending.append((ExecuteSkipped(self.sid("skip"), ins.key), None))
                            break
            elif isinstance(ins, Rejoin):
                assert ins.key in self.blocked, f"{ins.key} rejoined without asking"
                self.blocked.discard(ins.key)
                self.seceded.discard(ins.key)
            elif isinstance(ins, GatherDep):
                assert ins.peer not in self.gathers, f"two gathers from {ins.peer}"
                assert ins.keys and ins.peer != ADDRESS
                self.gathers[ins.peer] = list(ins.keys)
            elif isinstance(ins, ReleaseData):
                assert ins.key in self.store, f"release of {ins.key}, not stored"
                del self.store[ins.key]
            elif isinstance(ins, ToScheduler):
                msg = ins.msg
                if isinstance(msg, TaskFinished):
                    made = self.store.get(msg.key)
                    assert made is not None, f"{msg.key} reported, not stored"
                    assert msg.key in self.asked, f"unasked report of {msg.key}"
                    assert made in ("peer", self.asked[msg.key]), (
                        f"{msg.key} reported as {self.asked[msg.key]} but made by {made}")
                elif isinstance(msg, TaskErred):
                    assert msg.key in self.failing, f"unasked error of {msg.key}"
                    assert self.asked.get(msg.key) == self.failing[msg.key], "erred for another spec"
                    del self.asked[msg.key]  # the scheduler retries it elsewhere, or fails it
                elif isinstance(msg, AddKeys):
                    assert all(k in self.store for k in msg.keys), msg
                elif isinstance(msg, LongRunning):
                    assert msg.key in self.asked_to_secede  # (its thread may have ended since)
                else:
                    assert isinstance(msg, MissingData), msg

    def next_in_lane(self, lane: int) -> None:
        """The lane's thread ended a task (or the lane goes on after a secede): it starts the
        next task there itself, or ends."""
        queue = self.lanes[lane]
        if not queue:
            del self.lanes[lane]
            return
        key, spec = queue.pop(0)
        assert key not in self.running, f"second run of {key} at once"
        self.running[key] = spec
        self.lane_of[key] = lane

    @invariant()
    def store_matches_the_state(self) -> None:
        memory = {k for k, t in self.ws.tasks.items() if t.state == "memory"}
        assert set(self.store) == memory, (set(self.store), memory)
        assert len(set(self.running) - self.seceded) <= self.ws.nthreads

    # ------------------------------------------------------------- the scheduler

    @rule(key=st.sampled_from(TASKS), spec=st.sampled_from(SPECS), free_first=st.booleans(),
          deps=st.lists(st.sampled_from(INPUTS), max_size=2, unique=True),
          holders=st.lists(st.sampled_from(PEERS), min_size=1, max_size=2, unique=True))  # fmt: skip
    def compute(self, key: str, spec: Spec, free_first: bool, deps: list[str],
                holders: list[str]) -> None:  # fmt: skip
        events: list[WorkerEvent] = []
        if free_first and key in self.ws.tasks:
            events.append(FreeKeysEvent(self.sid("free"), [key]))
            self.asked.pop(key, None)
        deps = [d for d in deps if d != key]
        # A fresh message each time, as off the wire: never the same objects.
        msg = ComputeTask(key, bytes(spec[0]), Serialized([bytearray(spec[1])]),
                          {d: list(holders) for d in deps}, {d: SIZE[d] for d in deps})  # fmt: skip
        self.asked[key] = spec
        events.append(ComputeTaskEvent(self.sid("compute"), msg))
        self.handle(*events)

    @rule(key=st.sampled_from(TASKS + INPUTS))
    def free(self, key: str) -> None:
        """The scheduler releases the key here (or steals a queued task away)."""
        self.asked.pop(key, None)
        self.handle(FreeKeysEvent(self.sid("free"), [key]))

    @rule(key=st.sampled_from(INPUTS), holders=st.lists(st.sampled_from(PEERS), max_size=2))
    def refresh_who_has(self, key: str, holders: list[str]) -> None:
        """Peers left (or came): the scheduler's list of holders now."""
        self.handle(RefreshWhoHasEvent(self.sid("refresh"), {key: holders}))

    @rule(key=st.sampled_from(INPUTS), holder=st.sampled_from(PEERS))
    def acquire_replica(self, key: str, holder: str) -> None:
        self.handle(AcquireReplicasEvent(self.sid("acquire"), {key: [holder]}, {key: SIZE[key]}))

    @rule(paused=st.booleans())
    def pause(self, paused: bool) -> None:
        self.handle(PauseEvent(self.sid("pause"), paused))

    # --------------------------------------------------------------- the threads

    @rule(data=st.data(), ok=st.booleans())
    def finish_run(self, data: Any, ok: bool) -> None:
        free = sorted(set(self.running) - self.blocked)
        if not free:
            return
        key = data.draw(st.sampled_from(free))
        spec = self.running.pop(key)
        self.seceded.discard(key)
        if ok:
            self.pending.append((ExecuteDone(self.sid("done"), key, SIZE[key], "int", 0.0, 1.0),
                                 (key, spec)))  # fmt: skip
        else:
            self.pending.append((ExecuteFailed(self.sid("failed"), key, EXC, None, "E: boom",
                                               0.0, 1.0), (key, spec)))  # fmt: skip
        lane = self.lane_of.pop(key, None)
        if lane is not None:
            self.next_in_lane(lane)

    @rule()
    def deliver(self) -> None:
        """The loop drains what the threads told it, in order, in one batch."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.failing = {}
        for event, made in batch:
            if made is not None and isinstance(event, ExecuteDone):
                self.store[made[0]] = made[1]  # the server stores the result, then reports
            elif made is not None:
                self.failing[made[0]] = made[1]
        self.handle(*(event for event, _ in batch))
        self.failing = {}
        for event, _ in batch:
            if isinstance(event, SecedeEvent) and event.key in self.detached:
                self.next_in_lane(self.detached.pop(event.key))

    @rule(data=st.data())
    def secede(self, data: Any) -> None:
        candidates = sorted(k for k in self.running if k not in self.seceded)
        if candidates:
            key = data.draw(st.sampled_from(candidates))
            self.seceded.add(key)
            self.asked_to_secede.add(key)
            lane = self.lane_of.pop(key, None)
            if lane is not None:  # its thread lets the lane go: it waits for the state
                self.detached[key] = lane
            self.pending.append((SecedeEvent(self.sid("secede"), key), None))

    @rule(data=st.data())
    def rejoin(self, data: Any) -> None:
        candidates = sorted(self.seceded - self.blocked)
        if candidates:
            key = data.draw(st.sampled_from(candidates))
            self.blocked.add(key)
            self.pending.append((RejoinEvent(self.sid("rejoin"), key), None))

    @rule()
    def stray_outcomes(self) -> None:
        """Outcomes of a run the state does not know (late, from before a reconnect)."""
        self.store["stray"] = "stray"
        self.handle(ExecuteDone(self.sid("stray"), "stray", 8, "int", 0.0, 1.0))
        self.handle(ExecuteFailed(self.sid("stray"), "stray", EXC, None, "E", 0.0, 1.0))

    # ----------------------------------------------------------------- the peers

    @rule(data=st.data(), outcome=st.sampled_from(["all", "some", "failed"]))
    def finish_gather(self, data: Any, outcome: str) -> None:
        if not self.gathers:
            return
        peer = data.draw(st.sampled_from(sorted(self.gathers)))
        keys = self.gathers.pop(peer)
        if outcome == "failed":
            self.handle(GatherFailed(self.sid("gather-failed"), peer, keys, "gone"))
            return
        missing = keys[1:] if outcome == "some" else []
        got = {k: SIZE[k] for k in keys if k not in missing}
        for k in got:
            self.store.setdefault(k, "peer")  # as the server does
        self.handle(GatherDone(self.sid("gather"), peer, got, missing))

    @rule(peer=st.sampled_from(PEERS), keys=st.lists(st.sampled_from(INPUTS + TASKS),
                                                       min_size=1, max_size=2, unique=True))  # fmt: skip
    def late_gather_answer(self, peer: str, keys: list[str]) -> None:
        """A duplicate or late answer from a peer we are not (or no longer) fetching from."""
        if peer in self.gathers:
            return
        for k in keys:
            self.store.setdefault(k, "peer")
        self.handle(GatherDone(self.sid("late-gather"), peer, {k: SIZE[k] for k in keys}))

    @rule(key=st.sampled_from(INPUTS))
    def data_put(self, key: str) -> None:
        state = self.ws.tasks.get(key)
        if state is not None and state.state not in ("fetch", "flight", "memory"):
            return  # a scatter never lands on a key this worker computes
        self.store[key] = "peer"  # the server stores what was put, over any copy
        self.handle(DataPut(self.sid("put"), {key: SIZE[key]}))


class WorkerModelHandingAhead(WorkerModel):
    # One thread: with four task keys, tasks are queued in its lane often.
    LOOKAHEAD = 2
    NTHREADS = 1


@pytest.mark.parametrize("model", [WorkerModel, WorkerModelHandingAhead])
def test_random_event_sequences_keep_the_worker_state_valid_and_its_reports_true(
    tmp_path: Path, model: type[WorkerModel],
) -> None:
    # Hypothesis caches what it learns under its home directory (".hypothesis" in the working
    # directory by default): keep it in the test's temporary directory, which pytest removes.
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(
            model,
            settings=settings(max_examples=200, stateful_step_count=40, deadline=None,
                              derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow]),  # fmt: skip
        )
    finally:
        set_hypothesis_home_dir(None)
