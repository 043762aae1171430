"""Batched enqueues: ``enqueue_many`` and ``with app.batch():`` behave like one enqueue per
job (keys, delays, priorities, parents), and nothing enqueued in a batch is lost."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shoal.jobs import Job, JobQueue
from shoal.jobs.brokers.sqlite import SQLiteBroker


def test_enqueue_many_runs_every_job(app: JobQueue) -> None:
    @app.job
    def double(x: int) -> int:
        return 2 * x

    handles = double.enqueue_many([(i,) for i in range(50)], priority=3)
    assert all(h.created for h in handles) and len({h.id for h in handles}) == 50
    assert app.broker.counts() == {"default": {"queued": 50}}
    with app.worker(concurrency=2):
        assert [h.result(timeout=10) for h in handles] == [2 * i for i in range(50)]
    with pytest.raises(TypeError, match="tuple of arguments"):
        double.enqueue_many([1, 2])  # type: ignore[list-item]


def test_enqueue_many_with_keys_delays_and_parents(app: JobQueue) -> None:
    @app.job
    def number(x: int) -> int:
        return x

    @app.job
    def total(*parts: int) -> int:
        return sum(parts)

    existing = number.enqueue(args=(1,), key="one")
    a, b = number.prepare((2,)), number.prepare((3,), key="one")
    later = number.prepare((4,), delay=3600)
    joined = total.prepare(after=[a, existing])
    handles = app.enqueue_many([a, b, later, joined])
    assert [h.created for h in handles] == [True, False, True, True]
    assert handles[1].id == existing.id
    assert handles[2].status == "scheduled" and handles[3].status == "waiting"
    with app.worker(concurrency=2):
        assert handles[3].result(timeout=10) == 3
    assert handles[2].status == "scheduled"
    with pytest.raises(KeyError, match="no-such-job"):
        app.enqueue_many([number.prepare((5,)), total.prepare(after=["no-such-job"])])


def test_batch_sends_by_size_and_at_the_end(app: JobQueue) -> None:
    @app.job
    def double(x: int) -> int:
        return 2 * x

    with app.batch(size=10) as batch:
        handles = [double.delay(i) for i in range(25)]
        assert batch.sent == 20 and len(batch) == 5
        assert app.broker.counts() == {"default": {"queued": 20}}
        assert [h.pending for h in handles] == [False] * 20 + [True] * 5
        assert "not sent yet" in repr(handles[-1])
    assert batch.sent == 25 and not any(h.pending for h in handles)
    assert app.broker.counts() == {"default": {"queued": 25}}
    with app.worker(concurrency=2):
        assert [h.result(timeout=10) for h in handles] == [2 * i for i in range(25)]


def test_reading_a_pending_handle_sends_the_batch(app: JobQueue) -> None:
    @app.job
    def noop() -> None:
        return None

    with app.batch() as batch:
        first = noop.delay()
        plain = noop.delay()
        assert plain.id and plain.pending and first.pending  # no key: its id is final, nothing sent
        keyed = noop.enqueue(key="k")
        assert keyed.pending
        again = noop.enqueue(key="k")
        assert again.id == keyed.id and not again.created and keyed.created  # sent by .id
        assert batch.sent == 4 and not plain.pending
        fresh = noop.delay()
        assert fresh.status == "queued" and not fresh.pending
        child = noop.enqueue(after=[noop.delay()], pass_results=False)
        assert child.status == "waiting"


def test_batch_sends_when_the_block_raises(app: JobQueue) -> None:
    @app.job
    def noop() -> None:
        return None

    with pytest.raises(RuntimeError, match="boom"):
        with app.batch():
            handles = [noop.delay() for _ in range(3)]
            raise RuntimeError("boom")
    assert [h.status for h in handles] == ["queued"] * 3


def test_batch_failure_raises_where_it_is_sent(app: JobQueue) -> None:
    @app.job
    def noop() -> None:
        return None

    with pytest.raises(KeyError, match="no-such-job"):
        with app.batch():
            ok = noop.delay()
            noop.enqueue(after=["no-such-job"])
    assert not ok.pending
    with pytest.raises(KeyError, match="not in the broker"):
        ok.status  # noqa: B018 - nothing of the failed send is stored
    assert app.broker.counts() == {}


def test_batch_belongs_to_its_thread_and_app(app: JobQueue, tmp_path: Path) -> None:
    @app.job
    def noop() -> None:
        return None

    other = JobQueue(f"sqlite:///{tmp_path / 'other.db'}")

    @other.job(name="other.noop")
    def other_noop() -> None:
        return None

    seen: list[Job] = []
    try:
        with app.batch():
            thread = threading.Thread(target=lambda: seen.append(noop.delay()))
            thread.start()
            thread.join(10)
            assert not seen[0].pending  # another thread: sent at once
            elsewhere = other_noop.delay()
            assert not elsewhere.pending  # another app: sent at once
            mine = noop.delay()
            assert mine.pending
            with app.batch():  # a nested block sends the outer one first, keeping order
                assert not mine.pending
                inner = noop.delay()
                assert inner.pending
            assert not inner.pending
    finally:
        other.close()


def test_clean_exit_inside_a_batch_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    script = f"""
import sys
from shoal.jobs import JobQueue
app = JobQueue("sqlite:///{db}")

@app.job(name="exit.noop")
def noop(i):
    return i

with app.batch(size=1000):
    for i in range(1500):
        noop.delay(i)
    sys.exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    broker = SQLiteBroker(f"sqlite:///{db}")
    try:
        assert broker.counts() == {"default": {"queued": 1500}}
    finally:
        broker.close()


def test_sqlite_counts_are_built_for_an_older_database(tmp_path: Path) -> None:
    from shoal.jobs.testing import message

    url = f"sqlite:///{tmp_path / 'old.db'}"
    broker = SQLiteBroker(url)
    try:
        broker.enqueue_many([message(queue="a") for _ in range(3)] + [message(queue="b")])
        [d] = broker.reserve(["a"], "w", 30, 1)
        broker.ack(d.id, d.token, b"\x80\x05N.")
        db = broker._conn()
        for trigger in ("jobs_counted", "jobs_recounted", "jobs_uncounted"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE counts")  # as a database from before the counters
    finally:
        broker.close()
    again = SQLiteBroker(url)
    try:
        assert again.counts() == {"a": {"queued": 2, "succeeded": 1}, "b": {"queued": 1}}
    finally:
        again.close()


def test_redis_job_stored_with_its_envelope_in_the_hash_still_runs(redis_url: str) -> None:
    import uuid

    from shoal.jobs.brokers.redis import RedisBroker
    from shoal.jobs.testing import message

    broker = RedisBroker(f"{redis_url}?prefix=test-{uuid.uuid4().hex[:12]}")
    try:
        m = message()
        broker.enqueue(m)
        envelope = broker.redis.get(broker._k("msg", m.id))
        broker.redis.delete(broker._k("msg", m.id))  # as stored before msg:ID existed
        broker.redis.hset(broker._k("job", m.id), "message", envelope)
        [d] = broker.reserve(["default"], "w", 30, 1)
        assert d.id == m.id and d.message == envelope
    finally:
        broker.flush()
        broker.close()


def test_redis_scripts_survive_a_script_flush_and_dropped_connections(redis_url: str) -> None:
    import uuid

    import redis

    from shoal.jobs.brokers.redis import RedisBroker
    from shoal.jobs.testing import message

    broker = RedisBroker(f"{redis_url}?prefix=test-{uuid.uuid4().hex[:12]}")
    admin = redis.Redis.from_url(redis_url)
    try:
        first = broker.enqueue(message())[0]
        admin.script_flush()  # as after a server restart: EVALSHA says NOSCRIPT
        second = broker.enqueue(message())[0]
        addrs = ["{}:{}".format(*c._sock.getsockname()[:2]) for c in broker._conns]
        assert addrs
        for addr in addrs:  # the script connections drop (only ours: Redis may be shared)
            admin.client_kill_filter(_id=None, addr=addr)
        assert not {c["addr"] for c in admin.client_list()} & set(addrs)
        [d] = broker.reserve(["default"], "w", 30, 1)
        assert d.id == first
        assert broker.ack(d.id, d.token, b"\x80\x05N.")
        assert broker.counts() == {"default": {"queued": 1, "succeeded": 1}}
        assert broker.get(second) is not None
    finally:
        broker.flush()
        broker.close()
        admin.close()


def test_a_task_outliving_its_batch_block_sends_at_once(app: JobQueue) -> None:
    import asyncio

    @app.job
    def noop() -> None:
        return None

    async def main() -> Job:
        go = asyncio.Event()

        async def later() -> Job:
            await go.wait()
            return noop.delay()  # the task copied the context, batch and all

        with app.batch():
            task = asyncio.create_task(later())
        go.set()
        return await task

    handle = asyncio.run(main())
    assert not handle.pending and handle.status == "queued"
