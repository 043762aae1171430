"""The coordination primitives' and datasets' state, as plain objects: requests in, effects out.

No sockets, no clocks, no asyncio, no unpickling: `shoal.coordination.service` feeds in what
clients ask and when their deadlines pass, and carries the effects out (answers, key holds,
topic messages). Tests drive these classes directly.

Invariants:
- A blocking request is a `Waiter` (client, rid). It is answered exactly once (`Answer`), or
  dropped silently when its client gives up (`forget`) or leaves (`client_left`). While it
  waits it is in ``waiting``, and in exactly one primitive's waiters.
- An `Item` holding a future's key is held (`HoldKey`) from the moment it is put until it is
  taken or overwritten (`DropKey`). A client that receives a key is first made to want it
  (`GiveKey`, before the `DropKey`), so the key cannot be forgotten in between.
- A primitive with nothing in it and nobody waiting on it is deleted, so names made up
  per use (``Lock()``, ``Queue()``) do not accumulate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..protocol.serialize import Serialized

# ----------------------------------------------------------------------- vocabulary


@dataclass(frozen=True, slots=True)
class Waiter:
    """A blocking request: the client that sent it and its request id."""

    client: str
    rid: int


@dataclass(frozen=True, slots=True)
class Item:
    """A value in a queue or variable: opaque pickled bytes, or the key of a future."""

    value: Serialized | None = None
    key: str | None = None

    def wire(self) -> list[Any]:
        return [self.value, self.key]


@dataclass(frozen=True, slots=True)
class Answer:
    """Reply to ``waiter`` with ``value``, or with ``error`` ("TypeName: text")."""

    waiter: Waiter
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class HoldKey:
    """Keep ``key`` alive on behalf of ``holder`` (holds are counted per holder and key)."""

    holder: str
    key: str


@dataclass(frozen=True, slots=True)
class DropKey:
    """Undo one `HoldKey`."""

    holder: str
    key: str


@dataclass(frozen=True, slots=True)
class GiveKey:
    """``client`` is about to hold a future for ``key``: make it want the key now."""

    client: str
    key: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``payload``, published on ``topic``, to ``client``."""

    client: str
    topic: str
    payload: Serialized


Effect = Answer | HoldKey | DropKey | GiveKey | Deliver


def timeout_error(what: str) -> str:
    return f"TimeoutError: {what}"


# ------------------------------------------------------------------- primitives


@dataclass
class SemaphoreRecord:
    max_leases: int
    #: lease id -> the client holding it
    holders: dict[str, str] = field(default_factory=dict)
    #: waiting acquires, first come first served (dicts keep insertion order): waiter -> lease
    waiters: dict[Waiter, str] = field(default_factory=dict)


@dataclass
class EventRecord:
    is_set: bool = False
    waiters: dict[Waiter, None] = field(default_factory=dict)


@dataclass
class QueueRecord:
    maxsize: int
    items: deque[Item] = field(default_factory=deque)
    #: waiting gets: waiter -> batch (0: one item, n: n items)
    getters: dict[Waiter, int] = field(default_factory=dict)
    #: puts waiting for room, with what they put
    putters: dict[Waiter, Item] = field(default_factory=dict)


@dataclass
class VariableRecord:
    item: Item | None = None
    waiters: dict[Waiter, None] = field(default_factory=dict)


SemaphoreId = tuple[str, str]  # (kind, name): a Lock "x" is not the Semaphore "x"


class CoordinationState:
    """Locks and semaphores (leases), events, queues, variables and topics.

    Mutate only through the methods; each returns the effects to carry out, in order.
    """

    def __init__(self) -> None:
        self.semaphores: dict[SemaphoreId, SemaphoreRecord] = {}
        self.events: dict[str, EventRecord] = {}
        self.queues: dict[str, QueueRecord] = {}
        self.variables: dict[str, VariableRecord] = {}
        #: topic -> client -> how many subscriptions it has there
        self.topics: dict[str, dict[str, int]] = {}
        #: every waiter not yet answered -> (primitive type, its name)
        self.waiting: dict[Waiter, tuple[str, Any]] = {}

    # ------------------------------------------------------------- waiters

    def expire(self, waiter: Waiter) -> list[Effect]:
        """``waiter``'s deadline passed: answer it with its timeout answer."""
        return self._remove_waiter(waiter, answer=True)

    def forget(self, waiter: Waiter) -> list[Effect]:
        """``waiter``'s client gave up on it: drop it without an answer."""
        return self._remove_waiter(waiter, answer=False)

    def client_left(self, client: str) -> list[Effect]:
        """``client`` disconnected: drop its waiters, give back its leases, unsubscribe it."""
        out: list[Effect] = []
        for waiter in [w for w in self.waiting if w.client == client]:
            out += self.forget(waiter)
        for sid, rec in list(self.semaphores.items()):
            mine = [lease for lease, holder in rec.holders.items() if holder == client]
            for lease in mine:
                del rec.holders[lease]
            if mine:
                out += self._grant(sid)
        for topic in [t for t, subs in self.topics.items() if client in subs]:
            del self.topics[topic][client]
            if not self.topics[topic]:
                del self.topics[topic]
        return out

    def _remove_waiter(self, waiter: Waiter, answer: bool) -> list[Effect]:
        where = self.waiting.pop(waiter, None)
        if where is None:
            return []  # answered already
        kind, name = where
        out: list[Effect] = []
        if kind == "semaphore":
            self.semaphores[name].waiters.pop(waiter)
            if answer:
                out.append(Answer(waiter, False))
            out += self._grant(name)  # a waiter at the head may have blocked others
        elif kind == "event":
            self.events[name].waiters.pop(waiter)
            if answer:
                out.append(Answer(waiter, False))
            self._tidy_event(name)
        elif kind == "queue-get":
            self.queues[name].getters.pop(waiter)
            if answer:
                out.append(Answer(waiter, error=timeout_error(f"queue {name!r} stayed empty")))
            out += self._flow(name)  # a batch get at the head may have blocked single gets
        elif kind == "queue-put":
            item = self.queues[name].putters.pop(waiter)
            if item.key is not None:
                out.append(DropKey(queue_holder(name), item.key))
            if answer:
                out.append(Answer(waiter, error=timeout_error(f"queue {name!r} stayed full")))
            self._tidy_queue(name)
        elif kind == "variable":
            self.variables[name].waiters.pop(waiter)
            if answer:
                out.append(Answer(waiter, error=timeout_error(f"variable {name!r} was not set")))
            self._tidy_variable(name)
        else:  # pragma: no cover - every kind is above
            raise AssertionError(kind)
        return out

    # -------------------------------------------------------- locks, semaphores

    def acquire(self, waiter: Waiter, kind: str, name: str, lease: str,
                max_leases: int) -> list[Effect]:  # fmt: skip
        """Grant ``lease`` now or queue ``waiter`` for it (answer True when granted)."""
        if max_leases < 1:
            return [Answer(waiter, error=f"ValueError: max_leases must be >= 1, not {max_leases}")]
        sid = (kind, name)
        rec = self.semaphores.get(sid)
        if rec is None:
            rec = self.semaphores[sid] = SemaphoreRecord(max_leases)
        elif rec.max_leases != max_leases:
            return [Answer(waiter, error=f"ValueError: {kind} {name!r} is in use with"
                                         f" max_leases={rec.max_leases}, not {max_leases}")]  # fmt: skip
        if lease in rec.holders:
            return [Answer(waiter, True)]
        rec.waiters[waiter] = lease
        self.waiting[waiter] = ("semaphore", sid)
        return self._grant(sid)

    def release(self, kind: str, name: str, lease: str) -> tuple[bool, list[Effect]]:
        """Give ``lease`` back (or withdraw its waiting acquire); returns whether it was held."""
        sid = (kind, name)
        rec = self.semaphores.get(sid)
        if rec is None:
            return False, []
        if rec.holders.pop(lease, None) is not None:
            return True, self._grant(sid)
        for waiter, waiting_lease in rec.waiters.items():
            if waiting_lease == lease:
                return False, self.forget(waiter)
        return False, []

    def leases_held(self, kind: str, name: str) -> int:
        rec = self.semaphores.get((kind, name))
        return 0 if rec is None else len(rec.holders)

    def _grant(self, sid: SemaphoreId) -> list[Effect]:
        rec = self.semaphores[sid]
        out: list[Effect] = []
        while rec.waiters and len(rec.holders) < rec.max_leases:
            waiter = next(iter(rec.waiters))
            lease = rec.waiters.pop(waiter)
            del self.waiting[waiter]
            rec.holders[lease] = waiter.client
            out.append(Answer(waiter, True))
        if not rec.holders and not rec.waiters:
            del self.semaphores[sid]
        return out

    # ------------------------------------------------------------------ events

    def set_event(self, name: str) -> list[Effect]:
        rec = self.events.setdefault(name, EventRecord())
        rec.is_set = True
        waiters, rec.waiters = rec.waiters, {}
        for waiter in waiters:
            del self.waiting[waiter]
        return [Answer(w, True) for w in waiters]

    def clear_event(self, name: str) -> None:
        rec = self.events.get(name)
        if rec is not None:
            rec.is_set = False
            self._tidy_event(name)

    def wait_event(self, waiter: Waiter, name: str) -> list[Effect]:
        """Answer True now if the event is set, else when it is set (or False on expiry)."""
        rec = self.events.get(name)
        if rec is not None and rec.is_set:
            return [Answer(waiter, True)]
        rec = self.events.setdefault(name, EventRecord())
        rec.waiters[waiter] = None
        self.waiting[waiter] = ("event", name)
        return []

    def _tidy_event(self, name: str) -> None:
        rec = self.events[name]
        if not rec.is_set and not rec.waiters:
            del self.events[name]

    # ------------------------------------------------------------------ queues

    def put(self, waiter: Waiter, name: str, item: Item, maxsize: int) -> list[Effect]:
        """Append ``item`` when there is room (answer None), holding its key from now on."""
        rec = self.queues.get(name)
        if rec is None:
            rec = self.queues[name] = QueueRecord(max(0, maxsize))
        out: list[Effect] = []
        if item.key is not None:
            out.append(HoldKey(queue_holder(name), item.key))
        rec.putters[waiter] = item
        self.waiting[waiter] = ("queue-put", name)
        return out + self._flow(name)

    def get(self, waiter: Waiter, name: str, batch: int) -> list[Effect]:
        """Take one item (``batch`` 0), ``batch`` items, or (-1) all there are now."""
        if batch < 0:
            rec = self.queues.get(name)
            if rec is None:
                return [Answer(waiter, [])]
            taken = list(rec.items)
            rec.items.clear()
            out = self._hand_over(waiter, name, taken)
            out.append(Answer(waiter, [item.wire() for item in taken]))
            return out + self._flow(name)
        rec = self.queues.get(name)
        if rec is None:
            rec = self.queues[name] = QueueRecord(0)
        rec.getters[waiter] = batch
        self.waiting[waiter] = ("queue-get", name)
        return self._flow(name)

    def qsize(self, name: str) -> int:
        rec = self.queues.get(name)
        return 0 if rec is None else len(rec.items)

    def _flow(self, name: str) -> list[Effect]:
        """Move waiting puts into the queue while there is room, and serve waiting gets in
        order while they can be served; repeat until neither can move."""
        rec = self.queues[name]
        out: list[Effect] = []
        moved = True
        while moved:
            moved = False
            while rec.putters and (rec.maxsize == 0 or len(rec.items) < rec.maxsize):
                waiter = next(iter(rec.putters))
                rec.items.append(rec.putters.pop(waiter))
                del self.waiting[waiter]
                out.append(Answer(waiter, None))
                moved = True
            while rec.getters:
                waiter = next(iter(rec.getters))
                batch = rec.getters[waiter]
                if len(rec.items) < max(batch, 1):
                    break
                del rec.getters[waiter], self.waiting[waiter]
                taken = [rec.items.popleft() for _ in range(max(batch, 1))]
                out += self._hand_over(waiter, name, taken)
                out.append(Answer(waiter, [i.wire() for i in taken] if batch else taken[0].wire()))
                moved = True
        self._tidy_queue(name)
        return out

    def _hand_over(self, waiter: Waiter, name: str, items: list[Item]) -> list[Effect]:
        out: list[Effect] = []
        for item in items:
            if item.key is not None:
                out.append(GiveKey(waiter.client, item.key))
                out.append(DropKey(queue_holder(name), item.key))
        return out

    def _tidy_queue(self, name: str) -> None:
        rec = self.queues.get(name)
        if rec is not None and not rec.items and not rec.getters and not rec.putters:
            del self.queues[name]

    # --------------------------------------------------------------- variables

    def set_variable(self, name: str, item: Item) -> list[Effect]:
        rec = self.variables.setdefault(name, VariableRecord())
        out: list[Effect] = []
        if item.key is not None:
            out.append(HoldKey(variable_holder(name), item.key))  # before dropping the old one
        if rec.item is not None and rec.item.key is not None:
            out.append(DropKey(variable_holder(name), rec.item.key))
        rec.item = item
        waiters, rec.waiters = rec.waiters, {}
        for waiter in waiters:
            del self.waiting[waiter]
            if item.key is not None:
                out.append(GiveKey(waiter.client, item.key))
            out.append(Answer(waiter, item.wire()))
        return out

    def get_variable(self, waiter: Waiter, name: str) -> list[Effect]:
        rec = self.variables.get(name)
        if rec is not None and rec.item is not None:
            gives: list[Effect] = []
            if rec.item.key is not None:
                gives.append(GiveKey(waiter.client, rec.item.key))
            return [*gives, Answer(waiter, rec.item.wire())]
        rec = self.variables.setdefault(name, VariableRecord())
        rec.waiters[waiter] = None
        self.waiting[waiter] = ("variable", name)
        return []

    def delete_variable(self, name: str) -> list[Effect]:
        """Unset the variable; its waiters keep waiting for the next `set_variable`."""
        rec = self.variables.get(name)
        if rec is None or rec.item is None:
            return []
        old, rec.item = rec.item, None
        self._tidy_variable(name)
        return [DropKey(variable_holder(name), old.key)] if old.key is not None else []

    def _tidy_variable(self, name: str) -> None:
        rec = self.variables[name]
        if rec.item is None and not rec.waiters:
            del self.variables[name]

    # ------------------------------------------------------------------ topics

    def subscribe(self, client: str, topic: str) -> None:
        subs = self.topics.setdefault(topic, {})
        subs[client] = subs.get(client, 0) + 1

    def unsubscribe(self, client: str, topic: str) -> None:
        subs = self.topics.get(topic, {})
        count = subs.get(client, 0) - 1
        if count > 0:
            subs[client] = count
        else:
            subs.pop(client, None)
            if not subs:
                self.topics.pop(topic, None)

    def publish(self, topic: str, payload: Serialized) -> list[Effect]:
        return [Deliver(c, topic, payload) for c in self.topics.get(topic, {})]


def queue_holder(name: str) -> str:
    """The name under which the scheduler holds the keys in queue ``name``."""
    return f"queue:{name}"


def variable_holder(name: str) -> str:
    return f"variable:{name}"


def dataset_holder(name: str) -> str:
    return f"dataset:{name}"


# ---------------------------------------------------------------------- datasets


@dataclass(frozen=True, slots=True)
class Dataset:
    key: str
    #: the client published a plain object (scattered it): readers get the value back
    scattered: bool
    #: keys of the futures inside that object: held with it, or they would be lost
    inner: tuple[str, ...] = ()


class DatasetState:
    """Named datasets: each names a key the scheduler holds under ``dataset:NAME``."""

    def __init__(self) -> None:
        self.datasets: dict[str, Dataset] = {}

    def publish(self, datasets: dict[str, str], scattered: list[str], override: bool,
                inner: dict[str, list[str]] | None = None) -> tuple[str | None, list[Effect]]:
        """Publish all of ``datasets`` (name -> key), or none; returns (error, effects).
        ``inner`` names the keys of futures inside a scattered object, held with it."""
        if not override:
            taken = sorted(n for n in datasets if n in self.datasets)
            if taken:
                names = ", ".join(repr(n) for n in taken)
                return f"KeyError: dataset {names} already published (use override=True)", []
        out: list[Effect] = []
        for name, key in datasets.items():
            holder = dataset_holder(name)
            keys = tuple((inner or {}).get(name, ()))
            # New holds before the old ones go: a key in both must never drop to no holder.
            out.append(HoldKey(holder, key))
            out.extend(HoldKey(holder, k) for k in keys)
            old = self.datasets.get(name)
            if old is not None:
                out.extend(_drops(name, old))
            self.datasets[name] = Dataset(key, name in scattered, keys)
        return None, out

    def get(self, client: str, name: str) -> tuple[Dataset | None, list[Effect]]:
        dataset = self.datasets.get(name)
        if dataset is None:
            return None, []
        return dataset, [GiveKey(client, dataset.key)]

    def names(self) -> list[str]:
        return sorted(self.datasets)

    def unpublish(self, name: str) -> tuple[bool, list[Effect]]:
        dataset = self.datasets.pop(name, None)
        if dataset is None:
            return False, []
        return True, _drops(name, dataset)


def _drops(name: str, dataset: Dataset) -> list[Effect]:
    holder = dataset_holder(name)
    return [DropKey(holder, dataset.key), *(DropKey(holder, k) for k in dataset.inner)]
