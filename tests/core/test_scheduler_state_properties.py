"""Property-based tests of `SchedulerState` (hypothesis): random sequences of events keep its
invariants and it never answers a client's hold with a report of another generation.

A model plays the clients and the workers around the pure state. Clients submit graphs (with
dependencies among their own and existing keys, the same key again under a new generation,
maybe with another spec), want, release, cancel, scatter and disconnect; each client tracks
the generation of its current hold per key. Workers join (fresh, or back at an old address with
their data), leave (gracefully or not), finish or fail what they were sent, and send late and
duplicate reports: a finish for a task that was moved, released or already finished, a report
from a worker that left, a release or cancel of an older generation than the current hold.
Missing data (`DataMissing`), ticks and cluster restarts happen too.

Checked after every step:
1. `validate_state` (the state is built with ``validate=True``);
2. every report to a client (`KeyInMemory`, `KeyErred`, `KeyCancelled`, `KeyLost`) carries the
   generation of that client's current hold of the key, so nothing answers a released hold or
   an older one; the scheduler's holds are exactly the clients' holds; a new hold of a key that
   is done is answered at once; a `KeyInMemory` names workers that hold the data, and a client
   whose last word is `KeyInMemory` is right (a key that leaves memory is reported `KeyLost`);
3. the scheduler's books agree with the workers: who holds what, who runs what;
4. no instruction addresses a worker that left.
Checked after draining (every task run to an end, every requested wake-up given):
5. every key a client holds is in memory or erred, and the last report the client got for it,
   at its current generation, says so; nothing is kept that no client needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from shoal.core.scheduler_events import (
    ClientDisconnected,
    ClusterRestarted,
    DataMissing,
    DataScattered,
    KeysCancelled,
    KeysReleased,
    KeysWanted,
    SchedulerEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    TasksSubmitted,
    Tick,
    ToClient,
    ToWorker,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from shoal.core.scheduler_state import SchedulerState
from shoal.protocol.messages import (
    ComputeTask,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    Msg,
    RefreshWhoHas,
    RestartWorker,
    TaskErred,
    TaskFinished,
    TaskWarning,
)
from shoal.testing.core import DUMMY_EXCEPTION, make_spec

CLIENTS = ["c1", "c2"]
WORKERS = ["w1", "w2", "w3"]
#: one pool for task and scattered keys; a key depends only on keys before it (no cycles)
KEYS = [f"k{i}" for i in range(6)]

Report = KeyInMemory | KeyErred | KeyCancelled | KeyLost
Pair = tuple[str, str]  # (client, key)


@dataclass
class Worker:
    #: keys it was sent to compute and not told to drop
    assigned: set[str] = field(default_factory=set)
    #: keys whose data it holds
    data: set[str] = field(default_factory=set)


class SchedulerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = SchedulerState(allowed_failures=2, validate=True)
        self.now = 0.0
        self.n = 0
        #: each client's last generation (a client's generations only grow)
        self.generation = dict.fromkeys(CLIENTS, 0)
        #: the generation of each client's current hold of a key
        self.held: dict[Pair, int] = {}
        #: holds the scheduler answered with KeyErred("lost") and does not keep (unknown key)
        self.orphans: set[Pair] = set()
        #: the last report each client got for each key
        self.reports: dict[Pair, Report] = {}
        self.live: dict[str, Worker] = {}
        #: workers that left, with the data they had (they may come back with it)
        self.gone: dict[str, Worker] = {}
        #: every (worker, key) a ComputeTask was ever sent for: material for late reports
        self.ever_sent: set[tuple[str, str]] = set()
        self.wakes: list[float] = []

    # ---------------------------------------------------------------- plumbing

    def sid(self, name: str) -> str:
        self.n += 1
        return f"{name}-{self.n}"

    def next_generation(self, client: str) -> int:
        self.generation[client] += 1
        return self.generation[client]

    def handle(self, event: SchedulerEvent) -> None:
        self.now += 1.0
        out = self.state.handle([event], self.now)  # validate_state runs inside (property 1)
        for ins in out:
            if isinstance(ins, WakeAt):
                assert ins.when > self.now, ins
                self.wakes.append(ins.when)
            elif isinstance(ins, ToClient):
                self.client_gets(ins.client, ins.msg)
            else:
                assert isinstance(ins, ToWorker), ins
                self.worker_gets(ins.address, ins.msg)

    def client_gets(self, client: str, msg: Msg) -> None:
        if isinstance(msg, TaskWarning):
            return
        assert isinstance(msg, (KeyInMemory, KeyErred, KeyCancelled, KeyLost)), msg
        pair = (client, msg.key)
        # Property 2: the report answers the client's current hold, never an older or a
        # released one.
        assert pair in self.held, f"{msg} to {client}, which does not hold {msg.key}"
        assert msg.generation == self.held[pair], (
            f"{msg} to {client}, whose hold of {msg.key} is generation {self.held[pair]}"
        )
        self.reports[pair] = msg
        if isinstance(msg, KeyInMemory):
            for h in msg.workers:
                assert h in self.live and msg.key in self.live[h].data, (msg, h)
        if isinstance(msg, KeyCancelled):
            del self.held[pair]  # the client's future is cancelled: it holds the key no more
            self.orphans.discard(pair)

    def worker_gets(self, address: str, msg: Msg) -> None:
        # Property 4: never an instruction to a worker that left.
        assert address in self.live, f"{msg} to {address}, which left"
        w = self.live[address]
        if isinstance(msg, ComputeTask):
            for dep, holders in msg.who_has.items():
                assert holders, f"{msg.key} sent with no holder for {dep}"
                for h in holders:
                    assert h in self.live and dep in self.live[h].data, (msg.key, dep, h)
            w.assigned.add(msg.key)
            self.ever_sent.add((address, msg.key))
        elif isinstance(msg, FreeKeys):
            w.assigned.difference_update(msg.keys)
            w.data.difference_update(msg.keys)
        elif isinstance(msg, RestartWorker):
            w.assigned.clear()
            w.data.clear()
        elif isinstance(msg, RefreshWhoHas):
            for key, holders in msg.who_has.items():
                assert holders and all(key in self.live[h].data for h in holders), msg
        else:  # pragma: no cover
            raise TypeError(f"unexpected message to {address}: {msg}")

    def busy(self) -> list[tuple[str, str]]:
        return sorted((a, k) for a, w in self.live.items() for k in w.assigned)

    def finish(self, address: str, key: str) -> None:
        w = self.live.get(address)
        if w is not None:
            w.assigned.discard(key)
            w.data.add(key)  # the worker stores what it computed before it reports
        msg = TaskFinished(key, 8, "int", start=0.0, stop=0.5)
        self.handle(TaskFinishedEvent(self.sid("finished"), address, msg))

    def fail(self, address: str, key: str) -> None:
        w = self.live.get(address)
        if w is not None:
            w.assigned.discard(key)
        msg = TaskErred(key, DUMMY_EXCEPTION, None, "ValueError: boom")
        self.handle(TaskErredEvent(self.sid("erred"), address, msg))

    def tick_due(self) -> None:
        self.wakes = [w for w in self.wakes if w > self.now]
        self.handle(Tick(self.sid("tick")))

    # ----------------------------------------------------------------- clients

    def some_keys(self, data: st.DataObject, pool: list[str], most: int) -> list[str]:
        """Up to ``most`` keys, mostly from ``pool``; now and then any key of `KEYS`."""
        if pool and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.lists(st.sampled_from(pool), max_size=most, unique=True))
        return data.draw(st.lists(st.sampled_from(KEYS), max_size=most, unique=True))

    @initialize()
    def first_worker(self) -> None:
        self.join("w1", 1, keep_data=False)

    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def submit(self, client: str, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
        specs = []
        for key in keys:
            i = KEYS.index(key)
            # Inputs among this batch and existing keys; now and then one nobody submitted.
            known = [k for k in KEYS[:i] if k in keys or k in self.state.tasks]
            deps = [k for k in self.some_keys(data, known, 2) if KEYS.index(k) < i]
            specs.append(make_spec(key, deps, priority=data.draw(st.integers(0, 1)),
                                   retries=data.draw(st.sampled_from([0, 0, 1])),
                                   retry_delay=data.draw(st.sampled_from([0.0, 2.5]))))  # fmt: skip
        wanted = data.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True))
        generations = [self.next_generation(client) for _ in wanted]
        for key, g in zip(wanted, generations):
            self.held[client, key] = g
            self.orphans.discard((client, key))
        self.handle(TasksSubmitted(self.sid("submit"), client, specs, wanted, generations))
        self.check_answered(client, wanted)

    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def want(self, client: str, data: st.DataObject) -> None:
        keys = self.some_keys(data, sorted(self.state.tasks), 2)
        if not keys:
            return
        generations = [self.next_generation(client) for _ in keys]
        for key, g in zip(keys, generations):
            self.held[client, key] = g
            if key in self.state.tasks:
                self.orphans.discard((client, key))
            else:
                self.orphans.add((client, key))  # answered KeyErred("lost"), not kept
        self.handle(KeysWanted(self.sid("want"), client, keys, generations))
        self.check_answered(client, keys)

    def check_answered(self, client: str, keys: list[str]) -> None:
        """A new hold of a key that is done now was answered at once, at its generation."""
        for key in keys:
            ts = self.state.tasks.get(key)
            if ts is not None and ts.state in ("memory", "erred") and (client, key) in self.held:
                report = self.reports.get((client, key))
                kind = KeyInMemory if ts.state == "memory" else KeyErred
                assert isinstance(report, kind), (client, ts, report)
                assert report.generation == self.held[client, key], (client, ts, report)

    def let_go_generation(self, client: str, key: str, how: str, data: st.DataObject) -> int | None:
        """The generation a release or cancel names: the current hold's, an older one (a
        message that crossed a newer submit on the wire), any (None), or one never held."""
        held = self.held.get((client, key))
        if how == "any":
            return None
        if held is None:
            return data.draw(st.integers(0, self.generation[client]))
        if how == "older" and held > 1:
            return data.draw(st.integers(1, held - 1))
        return held

    def held_pair(self, data: st.DataObject) -> Pair:
        """Mostly a key some client holds; now and then any client and key."""
        if self.held and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.sampled_from(sorted(self.held)))
        return data.draw(st.sampled_from(CLIENTS)), data.draw(st.sampled_from(KEYS))

    @rule(
        what=st.sampled_from(["release", "release", "release", "cancel", "cancel", "bye"]),
        how=st.sampled_from(["current", "older", "older", "any"]),
        data=st.data(),
    )
    def let_go(self, what: str, how: str, data: st.DataObject) -> None:
        """A client releases or cancels a key (maybe of an older generation), or leaves."""
        client, key = self.held_pair(data)
        if what == "bye":
            for pair in [p for p in self.held if p[0] == client]:
                del self.held[pair]
                self.orphans.discard(pair)
            self.handle(ClientDisconnected(self.sid("bye"), client))
            return
        g = self.let_go_generation(client, key, how, data)
        generations = None if g is None else [g]
        pair = (client, key)
        lets_go = pair in self.held and (g is None or g >= self.held[pair])
        if what == "release" or pair in self.orphans:
            # The client drops its hold now (the scheduler keeps none for an orphan).
            if lets_go:
                del self.held[pair]
                self.orphans.discard(pair)
            lets_go = False
        if what == "release":
            self.handle(KeysReleased(self.sid("release"), client, [key], generations))
            return
        # A cancel is answered with KeyCancelled (for the key and the client's holds of its
        # dependents), which ends the hold in `client_gets`.
        self.handle(KeysCancelled(self.sid("cancel"), client, [key], generations))
        if lets_go:
            assert pair not in self.held, f"cancel of {pair} at {g} was not answered"

    @rule(client=st.sampled_from(CLIENTS), key=st.sampled_from(KEYS), data=st.data())
    def scatter(self, client: str, key: str, data: st.DataObject) -> None:
        live = sorted(self.live)
        targets = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=2, unique=True)
                            if live else st.just([]))  # fmt: skip
        for a in targets:
            self.live[a].data.add(key)
        if data.draw(st.integers(0, 3)) == 0:  # one that left (or never was) on the way
            targets.append(data.draw(st.sampled_from(WORKERS + ["w-dead"])))
            if targets[-1] in self.live:
                self.live[targets[-1]].data.add(key)
        targets = list(dict.fromkeys(targets))
        g = self.next_generation(client)
        self.held[client, key] = g
        self.orphans.discard((client, key))
        self.handle(DataScattered(self.sid("scatter"), client, [key], [targets], [64], [g]))
        self.check_answered(client, [key])

    # ----------------------------------------------------------------- workers

    @rule(address=st.sampled_from(WORKERS), nthreads=st.integers(1, 2), keep_data=st.booleans())
    def join(self, address: str, nthreads: int, keep_data: bool) -> None:
        if address in self.live:
            return
        old = self.gone.pop(address, None)
        w = Worker(data=old.data if old is not None and keep_data else set())
        self.live[address] = w
        keys = sorted(w.data)
        self.handle(WorkerJoined(self.sid("join"), address, nthreads, name=address,
                                 keys=keys, nbytes=[8] * len(keys)))  # fmt: skip

    @rule(address=st.sampled_from(WORKERS), graceful=st.booleans())
    def leave(self, address: str, graceful: bool) -> None:
        w = self.live.pop(address, None)  # not live: a duplicate leave, or never joined
        if w is not None:
            w.assigned.clear()
            self.gone[address] = w
        self.handle(WorkerLeft(self.sid("leave"), address, "chaos", graceful=graceful))

    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def run_one(self, data: st.DataObject, ok: bool) -> None:
        busy = self.busy()
        if not busy:
            return
        address, key = data.draw(st.sampled_from(busy))
        self.finish(address, key) if ok else self.fail(address, key)

    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def run_another(self, data: st.DataObject, ok: bool) -> None:
        self.run_one(data, ok)  # twice the weight: work gets done between the chaos

    @rule(data=st.data(), ok=st.booleans(), gone=st.booleans())
    def late_report(self, data: st.DataObject, ok: bool, gone: bool) -> None:
        """A report of a task a worker was sent once and is not running now (moved, released
        or already finished: a duplicate), or from a worker that left."""
        if gone:
            late = sorted((a, k) for a, k in self.ever_sent if a not in self.live)
        else:
            late = sorted((a, k) for a, k in self.ever_sent
                          if a in self.live and k not in self.live[a].assigned)  # fmt: skip
        if not late:
            return
        address, key = data.draw(st.sampled_from(late))
        self.finish(address, key) if ok else self.fail(address, key)

    @rule(data=st.data())
    def data_missing(self, data: st.DataObject) -> None:
        """A worker could not fetch a key from a holder that really lost it."""
        in_memory = sorted((ws.address, ts.key) for ts in self.state.tasks.values()
                           for ws in ts.who_has)  # fmt: skip
        if not in_memory:
            return
        holder, key = data.draw(st.sampled_from(in_memory))
        self.live[holder].data.discard(key)
        asker = data.draw(st.sampled_from(sorted(self.live)))
        self.handle(DataMissing(self.sid("missing"), asker, key, holder))

    @rule(now=st.sampled_from([False] * 9 + [True]))
    def restart(self, now: bool) -> None:
        """Every worker restarts (rarely): every client's hold errs "lost" and is forgotten."""
        if not now:
            return
        self.handle(ClusterRestarted(self.sid("restart")))
        for pair in self.held:
            self.orphans.add(pair)

    @rule(advance=st.sampled_from([0.0, 1.0, 5.0]))
    def tick(self, advance: float) -> None:
        self.now += advance
        self.tick_due()

    @rule(now=st.sampled_from([False] * 4 + [True]))
    def settle(self, now: bool) -> None:
        """Now and then (besides at the end): let everything run to an end and check."""
        if not now:
            return
        self.drain()
        self.check_settled()

    # -------------------------------------------------------------- invariants

    @invariant()
    def holds_agree(self) -> None:
        """The scheduler holds exactly what the clients hold, at the same generations."""
        theirs = {(c, ts.key): ts.who_wants[c]
                  for c, keys in self.state.clients.items() for ts in keys}  # fmt: skip
        ours = {p: g for p, g in self.held.items() if p not in self.orphans}
        assert theirs == ours, (theirs, ours)
        for pair in self.orphans:
            report = self.reports.get(pair)
            assert isinstance(report, KeyErred) and report.generation == self.held[pair], pair

    @invariant()
    def clients_are_not_misled(self) -> None:
        """A client whose last word on its hold is KeyInMemory is right: the key is in memory
        (when it leaves memory, the client hears KeyLost, or KeyErred)."""
        for pair, g in self.held.items():
            report = self.reports.get(pair)
            if isinstance(report, KeyInMemory) and report.generation == g:
                ts = self.state.tasks.get(pair[1])
                assert ts is not None and ts.state == "memory", (pair, report, ts)

    @invariant()
    def books_agree_with_workers(self) -> None:
        for ts in self.state.tasks.values():
            for ws in ts.who_has:
                assert ws.address in self.live and ts.key in self.live[ws.address].data, ts
            if ts.processing_on is not None:
                address = ts.processing_on.address
                assert address in self.live and ts.key in self.live[address].assigned, ts
        assert set(self.state.workers) == set(self.live)

    # ------------------------------------------------------------------- drain

    def drain(self) -> None:
        """No more chaos: a worker is there, every task runs to an end, every requested
        wake-up comes."""
        if not self.live:
            self.join(min(self.gone) if self.gone else WORKERS[0], 2, keep_data=True)
        for _ in range(1000):
            busy = self.busy()
            if busy:
                self.finish(*busy[0])
            elif self.wakes:
                self.now = max(self.now, min(self.wakes))
                self.tick_due()
            else:
                break
        else:  # pragma: no cover
            raise AssertionError("did not settle")

    def check_settled(self) -> None:
        """Property 5 (liveness): each held key is done and the client was told so last."""
        for ts in self.state.tasks.values():
            assert ts.state in ("memory", "erred", "released"), ts
            if ts.state == "memory":
                assert ts.who_wants, f"{ts} is kept in memory for nobody"
        for (client, key), g in self.held.items():
            report = self.reports.get((client, key))
            assert report is not None and report.generation == g, (client, key, g, report)
            if (client, key) in self.orphans:
                assert isinstance(report, KeyErred), report
                continue
            ts = self.state.tasks[key]
            if ts.state == "memory":
                assert isinstance(report, KeyInMemory), (client, ts, report)
            else:
                assert ts.state == "erred", (client, ts)
                assert isinstance(report, KeyErred), (client, ts, report)
                assert ts.failure is not None and report.kind == ts.failure.kind
        # Nothing is kept that no client needs, directly or as the input of a recipe.
        needed: set[str] = set()
        stack = [ts for keys in self.state.clients.values() for ts in keys]
        while stack:
            ts = stack.pop()
            if ts.key not in needed:
                needed.add(ts.key)
                stack.extend(ts.dependencies)
        assert set(self.state.tasks) == needed, set(self.state.tasks) - needed
        # And no worker keeps data the scheduler does not count.
        for address, w in self.live.items():
            counted = {ts.key for ts in self.state.workers[address].has_what}
            assert w.data == counted, (address, w.data, counted)

    def teardown(self) -> None:
        # Hypothesis runs this in a ``finally``: after a failed step, keep that failure.
        if sys.exc_info()[0] is None:
            self.drain()
            self.check_settled()


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_event_sequences_keep_holds_generations_and_liveness(tmp_path: Path) -> None:
    # Hypothesis caches what it learns under its home directory (".hypothesis" in the working
    # directory by default): keep it in the test's temporary directory, which pytest removes.
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(SchedulerModel, settings=SETTINGS)
    finally:
        set_hypothesis_home_dir(None)
