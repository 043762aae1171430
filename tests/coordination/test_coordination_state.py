"""The coordination state machines alone: requests in, effects out, no sockets or clocks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shoal.coordination.state import (
    Answer,
    CoordinationState,
    DatasetState,
    Deliver,
    DropKey,
    GiveKey,
    HoldKey,
    Item,
    Waiter,
)
from shoal.protocol.serialize import Serialized

A, B = "client-a", "client-b"


def value(text: str) -> Item:
    return Item(Serialized([text.encode()]))


def answers(effects: list[object]) -> list[tuple[Waiter, object, object]]:
    return [(e.waiter, e.value, e.error) for e in effects if isinstance(e, Answer)]


# ------------------------------------------------------------------ leases


def test_semaphore_grants_up_to_max_then_queues_in_order() -> None:
    s = CoordinationState()
    w1, w2, w3 = Waiter(A, 1), Waiter(B, 2), Waiter(B, 3)
    assert answers(s.acquire(w1, "semaphore", "s", "l1", 2)) == [(w1, True, None)]
    assert answers(s.acquire(w2, "semaphore", "s", "l2", 2)) == [(w2, True, None)]
    # when a third asks, then it waits
    assert s.acquire(w3, "semaphore", "s", "l3", 2) == []
    assert s.leases_held("semaphore", "s") == 2 and w3 in s.waiting
    # when a lease comes back, then the waiter gets it
    held, effects = s.release("semaphore", "s", "l1")
    assert held and answers(effects) == [(w3, True, None)]
    assert not s.waiting


def test_lock_and_semaphore_of_one_name_are_apart() -> None:
    s = CoordinationState()
    assert answers(s.acquire(Waiter(A, 1), "lock", "x", "l1", 1))[0][1] is True
    assert answers(s.acquire(Waiter(A, 2), "semaphore", "x", "l2", 1))[0][1] is True


def test_expired_acquire_answers_false_and_leaves_nothing() -> None:
    s = CoordinationState()
    s.acquire(Waiter(A, 1), "lock", "x", "l1", 1)
    w = Waiter(B, 2)
    assert s.acquire(w, "lock", "x", "l2", 1) == []
    assert answers(s.expire(w)) == [(w, False, None)]
    assert s.expire(w) == []  # answered once only
    s.release("lock", "x", "l1")
    assert s.semaphores == {} and s.waiting == {}


def test_leases_of_a_client_that_leaves_go_to_the_next_waiter() -> None:
    s = CoordinationState()
    s.acquire(Waiter(A, 1), "semaphore", "s", "a1", 1)
    s.acquire(Waiter(A, 2), "semaphore", "s", "a2", 1)  # A waits behind itself
    wb = Waiter(B, 3)
    s.acquire(wb, "semaphore", "s", "b1", 1)
    # when A leaves, then its lease and its waiter go, and B is granted
    assert answers(s.client_left(A)) == [(wb, True, None)]
    assert s.semaphores[("semaphore", "s")].holders == {"b1": B}
    assert list(s.waiting) == []


def test_release_of_a_waiting_lease_withdraws_it() -> None:
    s = CoordinationState()
    s.acquire(Waiter(A, 1), "lock", "x", "l1", 1)
    s.acquire(Waiter(B, 2), "lock", "x", "l2", 1)
    held, effects = s.release("lock", "x", "l2")
    assert not held and effects == [] and not s.waiting


def test_max_leases_must_agree() -> None:
    s = CoordinationState()
    s.acquire(Waiter(A, 1), "semaphore", "s", "l1", 2)
    [(_, _, error)] = answers(s.acquire(Waiter(B, 2), "semaphore", "s", "l2", 3))
    assert isinstance(error, str) and error.startswith("ValueError:") and "max_leases=2" in error


# ------------------------------------------------------------------ events


def test_event_wakes_every_waiter_and_tidies_when_cleared() -> None:
    s = CoordinationState()
    w1, w2 = Waiter(A, 1), Waiter(B, 2)
    assert s.wait_event(w1, "e") == [] and s.wait_event(w2, "e") == []
    assert answers(s.set_event("e")) == [(w1, True, None), (w2, True, None)]
    assert answers(s.wait_event(Waiter(A, 3), "e")) == [(Waiter(A, 3), True, None)]
    s.clear_event("e")
    assert s.events == {}


def test_event_wait_expires_false() -> None:
    s = CoordinationState()
    w = Waiter(A, 1)
    s.wait_event(w, "e")
    assert answers(s.expire(w)) == [(w, False, None)]
    assert s.events == {}


# ------------------------------------------------------------------ queues


def test_queue_is_fifo_and_holds_future_keys_until_taken() -> None:
    s = CoordinationState()
    put1, put2 = Waiter(A, 1), Waiter(A, 2)
    effects = s.put(put1, "q", Item(key="k1"), 0)
    assert effects == [HoldKey("queue:q", "k1"), Answer(put1, None)]
    s.put(put2, "q", value("v"), 0)
    assert s.qsize("q") == 2
    get = Waiter(B, 3)
    # when B takes the future, then B is made to want its key before the queue lets go
    assert s.get(get, "q", 0) == [GiveKey(B, "k1"), DropKey("queue:q", "k1"),
                                  Answer(get, [None, "k1"])]  # fmt: skip
    [(_, got, _)] = answers(s.get(Waiter(B, 4), "q", 0))
    assert got == [Serialized([b"v"]), None]
    assert s.queues == {}


def test_queue_get_waits_then_expires_with_a_timeout_error() -> None:
    s = CoordinationState()
    w = Waiter(A, 1)
    assert s.get(w, "q", 0) == []
    [(_, _, error)] = answers(s.expire(w))
    assert isinstance(error, str) and error.startswith("TimeoutError:")
    assert s.queues == {} and s.waiting == {}


def test_bounded_queue_put_waits_for_room() -> None:
    s = CoordinationState()
    s.put(Waiter(A, 1), "q", value("a"), 1)
    blocked = Waiter(A, 2)
    assert s.put(blocked, "q", Item(key="k"), 1) == [HoldKey("queue:q", "k")]
    # when an item is taken, then the waiting put goes in
    taken = s.get(Waiter(B, 3), "q", 0)
    assert Answer(blocked, None) in taken
    assert s.qsize("q") == 1


def test_expired_put_lets_go_of_its_key() -> None:
    s = CoordinationState()
    s.put(Waiter(A, 1), "q", value("a"), 1)
    blocked = Waiter(A, 2)
    s.put(blocked, "q", Item(key="k"), 1)
    effects = s.expire(blocked)
    assert effects[0] == DropKey("queue:q", "k")
    assert s.qsize("q") == 1


def test_queue_batches() -> None:
    s = CoordinationState()
    w = Waiter(B, 1)
    assert s.get(w, "q", 2) == []  # waits for two
    s.put(Waiter(A, 2), "q", value("a"), 0)
    assert answers(s.put(Waiter(A, 3), "q", value("b"), 0))[-1][0] == w
    for v in "cd":
        s.put(Waiter(A, 4), "q", value(v), 0)
    [(_, everything, _)] = answers(s.get(Waiter(B, 5), "q", -1))
    assert [v[0].frames[0] for v in everything] == [b"c", b"d"]
    assert answers(s.get(Waiter(B, 6), "q", -1)) == [(Waiter(B, 6), [], None)]


# --------------------------------------------------------------- variables


def test_variable_set_answers_waiters_and_swaps_holds() -> None:
    s = CoordinationState()
    w = Waiter(B, 1)
    assert s.get_variable(w, "v") == []
    effects = s.set_variable("v", Item(key="k1"))
    assert effects == [HoldKey("variable:v", "k1"), GiveKey(B, "k1"), Answer(w, [None, "k1"])]
    assert s.set_variable("v", Item(key="k2")) == [HoldKey("variable:v", "k2"),
                                                   DropKey("variable:v", "k1")]  # fmt: skip
    assert s.delete_variable("v") == [DropKey("variable:v", "k2")]
    assert s.variables == {}


# ------------------------------------------------------------------ topics


def test_topics_fan_out_to_each_subscribed_client_once() -> None:
    s = CoordinationState()
    s.subscribe(A, "t")
    s.subscribe(A, "t")
    s.subscribe(B, "t")
    payload = Serialized([b"x"])
    assert s.publish("t", payload) == [Deliver(A, "t", payload), Deliver(B, "t", payload)]
    s.unsubscribe(A, "t")
    assert len(s.publish("t", payload)) == 2  # A still has one subscription
    s.client_left(B)
    s.unsubscribe(A, "t")
    assert s.publish("t", payload) == [] and s.topics == {}


# ----------------------------------------------------------------- datasets


def test_datasets_publish_get_unpublish() -> None:
    d = DatasetState()
    error, effects = d.publish({"x": "k1", "y": "k2"}, ["y"], override=False)
    assert error is None and effects == [HoldKey("dataset:x", "k1"), HoldKey("dataset:y", "k2")]
    error, effects = d.publish({"x": "k3"}, [], override=False)
    assert error is not None and error.startswith("KeyError:") and "'x'" in error
    assert effects == []
    assert d.publish({"x": "k3"}, [], override=True)[1] == [HoldKey("dataset:x", "k3"),
                                                          DropKey("dataset:x", "k1")]  # fmt: skip
    found, effects = d.get(A, "y")
    assert found is not None and found.scattered and effects == [GiveKey(A, "k2")]
    assert d.get(A, "nope") == (None, [])
    assert d.names() == ["x", "y"]
    assert d.unpublish("x") == (True, [DropKey("dataset:x", "k3")])
    assert d.unpublish("x") == (False, [])


def test_dataset_holds_the_futures_inside_a_published_object() -> None:
    # given an object holding futures f1, f2 published under "z"
    d = DatasetState()
    _, effects = d.publish({"z": "obj1"}, ["z"], override=False, inner={"z": ["f1", "f2"]})
    assert effects == [HoldKey("dataset:z", "obj1"), HoldKey("dataset:z", "f1"),
                       HoldKey("dataset:z", "f2")]  # fmt: skip
    # when it is replaced by one holding f2 and f3, then f2 is held before its old hold goes
    _, effects = d.publish({"z": "obj2"}, ["z"], override=True, inner={"z": ["f2", "f3"]})
    assert effects == [HoldKey("dataset:z", "obj2"), HoldKey("dataset:z", "f2"),
                       HoldKey("dataset:z", "f3"), DropKey("dataset:z", "obj1"),
                       DropKey("dataset:z", "f1"), DropKey("dataset:z", "f2")]  # fmt: skip
    # and unpublishing drops every hold it has
    assert d.unpublish("z") == (True, [DropKey("dataset:z", "obj2"), DropKey("dataset:z", "f2"),
                                       DropKey("dataset:z", "f3")])  # fmt: skip


# ------------------------------------------------------------ layer rule


@pytest.mark.parametrize("name", ["state.py", "service.py"])
def test_scheduler_side_never_unpickles(name: str) -> None:
    """User values pass through the scheduler's coordination code as opaque bytes."""
    path = Path(__file__).resolve().parents[2] / "shoal" / "coordination" / name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            assert "pickle" not in module and "cloudpickle" not in module, name
            assert not any("pickle" in n or n == "deserialize" for n in names), name
