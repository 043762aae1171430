"""Conformance checks for job brokers, and a fake clock to drive them.

Anyone implementing `shoal.jobs.broker.Broker` can run every check on it::

    from shoal.jobs.testing import check_broker
    check_broker(lambda clock: MyBroker(..., clock=clock))

Each check gets a fresh broker whose clock is a `FakeClock` the check moves by hand, so
leases and delays are tested without sleeping. `CHECKS` names them one by one (the
project's own tests parametrise over it and the backends).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from .broker import Broker, Clock
from .message import JobMessage
from .payload import dump_arguments, load

__all__ = ["CHECKS", "FakeClock", "RedisServer", "check_broker", "message", "redis_ping"]

T0 = 1_700_000_000.0


class FakeClock:
    """A clock that moves only when told: ``clock.advance(30)``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def message(name: str = "t.job", *args: Any, **options: Any) -> JobMessage:
    """A job envelope with a fresh id, calling ``name(*args)``."""
    options.setdefault("id", uuid.uuid4().hex)
    return JobMessage(name=name, payload=dump_arguments(name, args, {}), **options)


def _enqueue(broker: Broker, **options: Any) -> str:
    return broker.enqueue(message(**options))[0]


def _take(broker: Broker, n: int = 1, queues: tuple[str, ...] = ("default",), lease: float = 10.0,
          worker: str = "w1") -> list[Any]:
    return broker.reserve(queues, worker, lease, n)


def check_ack(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker)
    assert broker.get(job_id).status == "queued"  # type: ignore[union-attr]
    [d] = _take(broker)
    started = clock.now
    assert (d.id, d.attempt) == (job_id, 1)
    record = broker.get(job_id)
    assert record is not None and record.status == "running" and record.worker == "w1"
    assert record.started == started and record.run_time is None
    clock.advance(2.5)
    assert _take(broker) == []
    assert broker.ack(d.id, d.token, b"\x80\x05K\x03.")  # pickle of 3
    record = broker.get(job_id)
    assert record is not None and record.status == "succeeded" and load(record.result or b"") == 3
    assert record.finished == clock.now and record.attempts == 1
    assert record.started == started and record.run_time == clock.now - started
    assert not broker.ack(d.id, d.token, b"")  # finished already
    assert broker.get("nope") is None


def check_priority_then_fifo(broker: Broker, clock: FakeClock) -> None:
    low = _enqueue(broker, priority=-5)
    first = _enqueue(broker)
    clock.advance(1)
    second = _enqueue(broker)
    high = _enqueue(broker, priority=7)
    order = [d.id for d in _take(broker, 10)]
    assert order == [high, first, second, low]


def check_queues(broker: Broker, clock: FakeClock) -> None:
    a = _enqueue(broker, queue="a")
    b = _enqueue(broker, queue="b", priority=1)
    _enqueue(broker, queue="c")
    assert [d.id for d in _take(broker, 5, queues=("a", "b"))] == [b, a]
    assert broker.counts()["c"] == {"queued": 1}


def check_reserve_limit(broker: Broker, clock: FakeClock) -> None:
    for _ in range(5):
        _enqueue(broker)
    assert len(_take(broker, 2)) == 2
    assert len(_take(broker, 0)) == 0
    assert len(_take(broker, 10)) == 3


def check_delay(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker, eta=clock.now + 60)
    assert broker.get(job_id).status == "scheduled"  # type: ignore[union-attr]
    assert _take(broker) == []
    clock.advance(59)
    assert _take(broker) == []
    clock.advance(1)
    assert broker.get(job_id).status == "queued"  # type: ignore[union-attr]
    assert [d.id for d in _take(broker)] == [job_id]


def check_idempotent_key(broker: Broker, clock: FakeClock) -> None:
    first, created = broker.enqueue(message(key="k1"))
    again, created_again = broker.enqueue(message(key="k1"))
    assert created and not created_again and again == first
    other, created_other = broker.enqueue(message(key="k2"))
    assert created_other and other != first
    assert len(_take(broker, 10)) == 2


def check_lease_lapse_requeues(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker, max_attempts=3)
    [d] = _take(broker, lease=10, worker="dead-worker")
    clock.advance(9)
    assert _take(broker, worker="w2") == []  # still leased
    clock.advance(1)
    [d2] = _take(broker, worker="w2")
    assert d2.id == job_id and d2.attempt == 2 and d2.token != d.token
    record = broker.get(job_id)
    assert record is not None and record.worker == "w2"
    assert "WorkerLost" in (record.last_error or "") and "dead-worker" in (record.last_error or "")
    # The first worker's reservation is stale now.
    assert not broker.fail(d.id, d.token, "E: x", None, None, None)
    assert not broker.release(d.id, d.token)
    assert broker.renew("dead-worker", {d.id: d.token}, 10) == {d.id}


def check_renew_keeps_lease(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker)
    [d] = _take(broker, lease=10)
    for _ in range(5):
        clock.advance(6)
        assert broker.renew("w1", {d.id: d.token}, 10) == set()
        assert _take(broker, worker="w2") == []
    assert broker.get(job_id).status == "running"  # type: ignore[union-attr]


def check_lease_lapse_last_attempt_is_dead(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker, max_attempts=1)
    _take(broker, lease=5)
    clock.advance(5)
    assert _take(broker) == []
    record = broker.get(job_id)
    assert record is not None and record.status == "failed" and record.dead
    assert "WorkerLost" in (record.last_error or "")
    assert [r.id for r in broker.dead()] == [job_id]


def check_late_ack_records_result(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker, max_attempts=3)
    [d] = _take(broker, lease=5)
    clock.advance(5)
    [d2] = _take(broker, worker="w2")
    assert broker.ack(d.id, d.token, b"\x80\x05K\x01.")  # the slow first holder finished
    assert broker.get(job_id).status == "succeeded"  # type: ignore[union-attr]
    assert not broker.ack(d2.id, d2.token, b"\x80\x05K\x02.")
    assert load(broker.get(job_id).result or b"") == 1  # type: ignore[union-attr]


def check_fail_retry_then_dead(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker, max_attempts=2)
    [d] = _take(broker)
    assert broker.fail(d.id, d.token, "ValueError: one", "tb1", None, clock.now + 30)
    record = broker.get(job_id)
    assert record is not None and record.status == "scheduled" and record.last_error == "ValueError: one"
    assert _take(broker) == []
    clock.advance(30)
    [d2] = _take(broker)
    assert d2.attempt == 2
    assert broker.fail(d2.id, d2.token, "ValueError: two", "tb2", b"exc", None)
    record = broker.get(job_id)
    assert record is not None and record.status == "failed" and record.dead
    assert (record.last_error, record.traceback, record.result) == ("ValueError: two", "tb2", b"exc")
    assert not broker.fail(d2.id, d2.token, "again", None, None, None)
    assert [r.id for r in broker.dead()] == [job_id] and broker.dead_count() == 1
    # From the dead-letter list it runs again with fresh attempts.
    assert broker.retry(job_id)
    assert not broker.retry(job_id)
    assert broker.dead() == [] and broker.dead_count() == 0
    [d3] = _take(broker)
    assert d3.attempt == 1


def check_release_does_not_count(broker: Broker, clock: FakeClock) -> None:
    job_id = _enqueue(broker)
    [d] = _take(broker)
    assert broker.release(d.id, d.token)
    assert not broker.release(d.id, d.token)
    record = broker.get(job_id)
    assert record is not None and record.status == "queued" and record.attempts == 0
    [d2] = _take(broker)
    assert d2.attempt == 1


def check_chain_released_by_parent(broker: Broker, clock: FakeClock) -> None:
    a = _enqueue(broker)
    b = _enqueue(broker, parents=(a,))
    c = _enqueue(broker, parents=(b,))
    assert broker.get(b).status == "waiting"  # type: ignore[union-attr]
    [da] = _take(broker, 10)
    assert da.id == a
    broker.ack(a, da.token, b"\x80\x05N.")
    assert broker.get(b).status == "queued"  # type: ignore[union-attr]
    assert broker.get(c).status == "waiting"  # type: ignore[union-attr]
    [db] = _take(broker, 10)
    assert db.id == b
    broker.ack(b, db.token, b"\x80\x05N.")
    assert [d.id for d in _take(broker, 10)] == [c]


def check_fan_in(broker: Broker, clock: FakeClock) -> None:
    parents = [_enqueue(broker) for _ in range(3)]
    child = _enqueue(broker, parents=tuple(parents))
    ds = _take(broker, 10)
    assert sorted(d.id for d in ds) == sorted(parents)
    for d in ds[:-1]:
        broker.ack(d.id, d.token, b"\x80\x05N.")
        assert broker.get(child).status == "waiting"  # type: ignore[union-attr]
    broker.ack(ds[-1].id, ds[-1].token, b"\x80\x05N.")
    assert broker.get(child).status == "queued"  # type: ignore[union-attr]
    # A child of finished parents is ready at once.
    late = _enqueue(broker, parents=tuple(parents))
    assert broker.get(late).status == "queued"  # type: ignore[union-attr]


def check_failed_parent_fails_children(broker: Broker, clock: FakeClock) -> None:
    a = _enqueue(broker, name="t.parent")
    ok = _enqueue(broker)
    b = _enqueue(broker, parents=(a, ok))
    c = _enqueue(broker, parents=(b,))
    [da, dok] = _take(broker, 2)
    broker.ack(dok.id, dok.token, b"\x80\x05N.")
    broker.fail(a, da.token, "KeyError: 'x'", None, None, None)
    for job_id in (b, c):
        record = broker.get(job_id)
        assert record is not None and record.status == "failed" and not record.dead
        assert record.last_error is not None and record.last_error.startswith("ParentFailed")
        assert "t.parent" in record.last_error and "KeyError" in record.last_error
    assert [r.id for r in broker.dead()] == [a]  # only the root cause is dead-lettered
    late = _enqueue(broker, parents=(a,))
    assert broker.get(late).status == "failed"  # type: ignore[union-attr]
    # Retrying the parent brings its descendants back to wait for it.
    assert broker.retry(a)
    assert broker.get(b).status == "waiting"  # type: ignore[union-attr]
    assert broker.get(c).status == "waiting"  # type: ignore[union-attr]
    [da2] = _take(broker, 10)
    assert da2.id == a
    broker.ack(a, da2.token, b"\x80\x05N.")
    assert {d.id for d in _take(broker, 10)} == {b, late}


def check_unknown_parent(broker: Broker, clock: FakeClock) -> None:
    try:
        _enqueue(broker, parents=("no-such-job",))
    except KeyError as exc:
        assert "no-such-job" in str(exc)
    else:
        raise AssertionError("enqueue after an unknown parent did not raise KeyError")


def check_cancel(broker: Broker, clock: FakeClock) -> None:
    a = _enqueue(broker, eta=clock.now + 100)
    b = _enqueue(broker, parents=(a,))
    assert broker.cancel(a)
    assert not broker.cancel(a)
    assert broker.get(a).status == "cancelled"  # type: ignore[union-attr]
    record = broker.get(b)
    assert record is not None and record.status == "cancelled"
    assert (record.last_error or "").startswith("ParentCancelled")
    clock.advance(200)
    assert _take(broker, 10) == []
    assert broker.dead() == []


def check_cancel_in_every_state(broker: Broker, clock: FakeClock) -> None:
    queued = _enqueue(broker)
    delayed = _enqueue(broker, eta=clock.now + 60)
    parent = _enqueue(broker, queue="other")
    waiting = _enqueue(broker, parents=(parent,))
    grandchild = _enqueue(broker, parents=(waiting,))
    retrying = _enqueue(broker, max_attempts=3)
    running = _enqueue(broker, max_attempts=3)
    ds = {d.id: d for d in _take(broker, 10)}
    assert set(ds) == {queued, retrying, running}
    assert broker.fail(retrying, ds[retrying].token, "E: x", None, None, clock.now + 30)
    assert broker.release(queued, ds[queued].token)
    assert broker.cancelled([queued, running, "nope"]) == set()
    for job_id in (queued, delayed, waiting, retrying, running):
        assert broker.cancel(job_id), job_id
        assert not broker.cancel(job_id), job_id
        record = broker.get(job_id)
        assert record is not None and record.status == "cancelled" and record.finished == clock.now
    assert broker.get(grandchild).status == "cancelled"  # type: ignore[union-attr]
    assert broker.cancelled([queued, running, parent, "nope"]) == {queued, running}
    record = broker.get(running)
    assert record is not None and record.worker is None
    assert (record.last_error or "").startswith("Cancelled: while running on worker w1")
    # The running attempt's worker can neither finish, fail, retry nor hand it back.
    d = ds[running]
    assert not broker.ack(d.id, d.token, b"\x80\x05N.")
    assert not broker.fail(d.id, d.token, "E: x", None, None, clock.now + 1)
    assert not broker.fail(d.id, d.token, "E: x", None, None, None)
    assert not broker.release(d.id, d.token)
    assert broker.renew("w1", {d.id: d.token}, 10) == {d.id}
    clock.advance(100)  # past every lease, eta and backoff: nothing comes back
    assert _take(broker, 10) == []
    assert broker.get(running).status == "cancelled"  # type: ignore[union-attr]
    assert broker.dead() == [] and not broker.retry(running)
    assert broker.counts() == {"default": {"cancelled": 6}, "other": {"queued": 1}}


def check_cancel_races_finish(broker: Broker, clock: FakeClock) -> None:
    """Cancel and finish are atomic: whichever comes first wins, the other is refused."""
    first = _enqueue(broker)
    second = _enqueue(broker)
    [a, b] = _take(broker, 2)
    assert broker.ack(a.id, a.token, b"\x80\x05K\x01.")
    assert not broker.cancel(a.id)
    assert broker.get(first).status == "succeeded"  # type: ignore[union-attr]
    assert broker.cancel(b.id)
    assert not broker.ack(b.id, b.token, b"\x80\x05K\x01.")
    record = broker.get(second)
    assert record is not None and record.status == "cancelled" and record.result is None


def check_counts_list_purge(broker: Broker, clock: FakeClock) -> None:
    done = _enqueue(broker)
    [d] = _take(broker)
    broker.ack(done, d.token, b"\x80\x05N.")
    running = _enqueue(broker)
    [_] = _take(broker)
    waiting = _enqueue(broker, parents=(running,))
    later = _enqueue(broker, eta=clock.now + 50)
    queued = _enqueue(broker, queue="other")
    assert broker.counts() == {
        "default": {"succeeded": 1, "running": 1, "waiting": 1, "scheduled": 1},
        "other": {"queued": 1},
    }
    assert [r.id for r in broker.list("succeeded")] == [done]
    assert [r.id for r in broker.list("running")] == [running]
    assert [r.id for r in broker.list("waiting")] == [waiting]
    assert [r.id for r in broker.list("scheduled")] == [later]
    assert [r.id for r in broker.list("queued")] == [queued]
    assert {r.id for r in broker.list()} == {done, running, waiting, later, queued}
    assert [r.id for r in broker.list(queue="other")] == [queued]
    clock.advance(10)
    assert broker.purge(finished_before=clock.now - 20) == 0
    assert broker.purge() == 1
    assert broker.get(done) is None
    assert broker.purge(queue="other", pending=True) == 1
    assert broker.purge(pending=True) == 2  # waiting + scheduled; the running job stays
    assert broker.get(running) is not None and broker.get(waiting) is None


def check_enqueue_many_is_n_enqueues(broker: Broker, clock: FakeClock) -> None:
    old = _enqueue(broker, key="k-old")
    parent = message()
    batch = [
        message(priority=-1),
        message(key="k-old"),  # a key an existing job holds
        message(key="k-new"),
        message(key="k-new"),  # a key an earlier message of the batch holds
        message(priority=5),
        message(eta=clock.now + 60),
        parent,
        message(parents=(parent.id,)),  # an earlier message of the batch as its parent
        message(parents=(old,)),  # an existing job as its parent
    ]
    assert broker.enqueue_many([]) == []
    out = broker.enqueue_many(batch)
    ids = [job_id for job_id, _ in out]
    assert [created for _, created in out] == [True, False, True, False, True, True, True, True, True]
    assert ids[1] == old and ids[3] == ids[2] == batch[2].id
    assert [ids[i] for i in (0, 2, 4, 5, 6, 7, 8)] == [batch[i].id for i in (0, 2, 4, 5, 6, 7, 8)]
    statuses = {job_id: broker.get(job_id).status for job_id in ids}  # type: ignore[union-attr]
    assert statuses[ids[5]] == "scheduled"
    assert statuses[ids[7]] == statuses[ids[8]] == "waiting"
    assert broker.counts() == {"default": {"queued": 5, "scheduled": 1, "waiting": 2}}
    # Reserved as if enqueued one by one: priority, then order of enqueue.
    order = [d.id for d in _take(broker, 10)]
    assert order == [ids[4], old, ids[2], parent.id, ids[0]]
    assert broker.get(batch[1].id) is None and broker.get(batch[3].id) is None
    clock.advance(60)
    assert [d.id for d in _take(broker, 10)] == [ids[5]]


def check_enqueue_many_unknown_parent_stores_nothing(broker: Broker, clock: FakeClock) -> None:
    first = message(key="k1")
    later = message(parents=("no-such-job",))
    try:
        broker.enqueue_many([first, message(), later])
    except KeyError as exc:
        assert "no-such-job" in str(exc)
    else:
        raise AssertionError("enqueue_many after an unknown parent did not raise KeyError")
    assert broker.get(first.id) is None and broker.counts() == {}
    # A key whose message was not stored (an earlier one of the batch has it) names no job.
    a, b = message(key="k2"), message(key="k2")
    try:
        broker.enqueue_many([a, b, message(parents=(b.id,))])
    except KeyError as exc:
        assert b.id in str(exc)
    else:
        raise AssertionError("a parent whose key was taken in the batch was accepted")
    assert broker.get(a.id) is None and broker.counts() == {}


def check_enqueue_many_large_batch(broker: Broker, clock: FakeClock) -> None:
    from .broker import ENQUEUE_CHUNK

    n = ENQUEUE_CHUNK + 7  # spans a chunk where a backend splits a batch
    batch = [message("t.job", i, key=f"k{i % (n - 3)}") for i in range(n)]
    batch.append(message(parents=(batch[0].id, batch[n - 4].id)))  # across chunks
    out = broker.enqueue_many(batch)
    assert [c for _, c in out] == [True] * (n - 3) + [False] * 3 + [True]
    assert [i for i, _ in out[n - 3:n]] == [batch[0].id, batch[1].id, batch[2].id]
    assert broker.counts() == {"default": {"queued": n - 3, "waiting": 1}}
    assert [d.id for d in _take(broker, 3)] == [m.id for m in batch[:3]]


def check_counts_follow_every_change(broker: Broker, clock: FakeClock) -> None:
    ids = [_enqueue(broker, max_attempts=2) for _ in range(4)]
    cancelled = _enqueue(broker, queue="q2")
    assert broker.cancel(cancelled)
    ds = _take(broker, 3)
    broker.ack(ds[0].id, ds[0].token, b"\x80\x05N.")
    broker.fail(ds[1].id, ds[1].token, "E: x", None, None, clock.now + 5)
    broker.fail(ds[2].id, ds[2].token, "E: x", None, None, None)
    assert broker.counts() == {
        "default": {"succeeded": 1, "scheduled": 1, "failed": 1, "queued": 1},
        "q2": {"cancelled": 1},
    }
    assert broker.retry(ds[2].id)
    [d] = _take(broker, 1)
    assert broker.release(d.id, d.token)
    clock.advance(5)
    assert broker.counts() == {"default": {"succeeded": 1, "queued": 3}, "q2": {"cancelled": 1}}
    assert broker.purge(pending=True) == 5
    assert broker.counts() == {}
    assert len(ids) == 4


def check_result_ttl(broker: Broker, clock: FakeClock) -> None:
    keep = _enqueue(broker)
    short = broker.enqueue(message(result_ttl=30.0, key="k-ttl"))[0]
    dead = _enqueue(broker, result_ttl=30.0)
    cancelled = _enqueue(broker, result_ttl=30.0, eta=clock.now + 100)
    ds = {d.id: d for d in _take(broker, 10)}
    assert broker.ack(keep, ds[keep].token, b"\x80\x05N.")
    assert broker.ack(short, ds[short].token, b"\x80\x05N.")
    assert broker.fail(dead, ds[dead].token, "E: x", None, None, None)
    assert broker.cancel(cancelled)
    record = broker.get(short)
    assert record is not None and record.result_ttl == 30.0 and record.expires == clock.now + 30
    clock.advance(29)
    assert {r.id for r in broker.list()} == {keep, short, dead, cancelled}
    assert not broker.get(short).expired(clock.now)  # type: ignore[union-attr]
    clock.advance(1)
    for job_id in (short, dead, cancelled):  # expired on read, deleted or not yet
        record = broker.get(job_id)
        assert record is None or record.expired(clock.now)
    assert {r.id for r in broker.list()} == {keep} and broker.dead() == []
    clock.advance(2)
    _take(broker)  # the brokers' own calls delete what expired: no process needed
    _enqueue(broker, queue="elsewhere")
    assert [broker.get(i) for i in (short, dead, cancelled)] == [None, None, None]
    assert broker.get(keep) is not None
    assert broker.counts() == {"default": {"succeeded": 1}, "elsewhere": {"queued": 1}}
    again, created = broker.enqueue(message(key="k-ttl"))  # its key went with it
    assert created and again != short


def check_key_lifetimes(broker: Broker, clock: FakeClock) -> None:
    def put(key: str, queue: str, **options: Any) -> tuple[str, bool]:
        return broker.enqueue(message(key=key, queue=queue, **options))

    # "start": the key holds while the job waits to start.
    first, created = put("s", "q1", key_until="start")
    assert created and put("s", "q1", key_until="start") == (first, False)
    [d] = _take(broker, queues=("q1",))
    s_second, created = put("s", "q1", key_until="start")
    assert created and s_second != first
    assert put("s", "q1", key_until="start") == (s_second, False)
    # "finish": it holds until the job finishes.
    first, _ = put("f", "q2", key_until="finish")
    [d] = _take(broker, queues=("q2",))
    assert put("f", "q2", key_until="finish") == (first, False)
    assert broker.ack(d.id, d.token, b"\x80\x05N.")
    f_second, created = put("f", "q2", key_until="finish")
    assert created and f_second != first
    # unique_for: at most until key_expires, whatever the job does.
    first, _ = put("u", "q3", key_expires=clock.now + 10)
    clock.advance(9)
    assert put("u", "q3", key_expires=clock.now + 10) == (first, False)
    clock.advance(1)
    second, created = put("u", "q3", key_expires=clock.now + 10)
    assert created and second != first
    # "forever" (the default): as long as the record exists, finished or not.
    first, _ = put("v", "q4")
    [d] = _take(broker, queues=("q4",))
    assert broker.ack(d.id, d.token, b"\x80\x05N.")
    clock.advance(1000)
    assert put("v", "q4") == (first, False)
    # Batches follow the same rules.
    out = broker.enqueue_many([message(key="f", queue="q2", key_until="finish"),
                               message(key="s", queue="q1", key_until="start")])
    assert out == [(f_second, False), (s_second, False)]


def check_rate_limit(broker: Broker, clock: FakeClock) -> None:
    limited = [_enqueue(broker, limit_key="t.job", rate=1.0) for _ in range(4)]
    other = _enqueue(broker, limit_key="t.job|other-user", rate=1.0)
    free = _enqueue(broker)
    assert {d.id for d in _take(broker, 10)} == {limited[0], other, free}
    record = broker.get(limited[1])
    assert record is not None and record.status == "scheduled"  # it waits, it does not fail
    assert record.attempts == 0 and record.last_error is None
    clock.advance(0.5)
    assert _take(broker, 10) == []
    started = []
    for _ in range(3):  # one a second (in any order: they wait under the same eta)
        clock.advance(0.5)
        started += [d.id for d in _take(broker, 10)]
        assert len(started) == _ + 1
        clock.advance(0.5)
        assert _take(broker, 10) == []
    assert sorted(started) == sorted(limited[1:])


def check_concurrency_limit(broker: Broker, clock: FakeClock) -> None:
    ids = [_enqueue(broker, limit_key="c", max_concurrency=2, max_attempts=2) for _ in range(5)]
    first = _take(broker, 10, lease=10)
    assert [d.id for d in first] == ids[:2]
    clock.advance(1)
    assert _take(broker, 10) == []
    assert broker.ack(first[0].id, first[0].token, b"\x80\x05N.")  # a slot frees up
    clock.advance(1)
    [third] = _take(broker, 10)  # (held-back jobs wait under one eta: any order)
    assert third.id in ids[2:]
    assert broker.cancel(third.id)  # so does a cancel
    clock.advance(1)
    [fourth] = _take(broker, 10, lease=10)
    assert fourth.id in ids[2:] and fourth.id != third.id
    clock.advance(20)  # both leases lapse: the jobs are queued again, slots free
    again = {d.id for d in _take(broker, 10)}
    assert len(again) == 2 and again <= set(ids) - {first[0].id, third.id}


def check_schedule_slots(broker: Broker, clock: FakeClock) -> None:
    assert broker.schedule_last("s") is None
    broker.schedule_advance("s", 100.0)
    broker.schedule_advance("s", 50.0)
    assert broker.schedule_last("s") == 100.0
    broker.schedule_advance("s", 160.0)
    assert broker.schedule_last("s") == 160.0


CHECKS: dict[str, Callable[[Broker, FakeClock], None]] = {
    name[len("check_"):]: fn for name, fn in sorted(globals().items())
    if name.startswith("check_") and name != "check_broker" and callable(fn)
}


def check_broker(make: Callable[[Clock], Broker]) -> None:
    """Run every check in `CHECKS`, each on a fresh broker from ``make(clock)``."""
    for name, check in CHECKS.items():
        clock = FakeClock()
        broker = make(clock)
        try:
            check(broker, clock)
        except AssertionError as exc:
            raise AssertionError(f"broker check {name!r} failed: {exc}") from exc
        finally:
            broker.close()


# ---------------------------------------------------------------- a Redis server for tests


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers at ``url``."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of our own on a free loopback port, append-only file on, in a
    temporary directory (removed by `close`). `restart` stops it cleanly (the file is
    flushed) and starts it again on the same port and data."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="shoal-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--dir", self.dir, "--save", "", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not redis_ping(self.url, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: Redis flushes the append-only file and exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
