"""What the servers record for the dashboard, tested without sockets: per-group task counts
in the core, the task stream ring, the log ring, address parsing, and the API's bounded cost
with 100,000 tasks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from shoal.core.scheduler_events import TasksSubmitted, WorkerJoined
from shoal.core.scheduler_records import key_group
from shoal.core.scheduler_state import SchedulerState
from shoal.dashboard import api
from shoal.dashboard.http import parse_address
from shoal.dashboard.metrics import SchedulerCollector
from shoal.diagnostics import logs
from shoal.diagnostics.task_stream import DURATION_BUCKETS, TaskStream
from shoal.protocol.messages import TaskFinished, TaskSpec
from shoal.protocol.serialize import Serialized
from shoal.scheduler import Scheduler

ARGS = Serialized([b""])


def spec(key: str, deps: list[str] | None = None) -> TaskSpec:
    return TaskSpec(key, b"f", ARGS, deps or [])


def finish(state: SchedulerState, key: str, now: float = 1.0) -> None:
    from shoal.core.scheduler_events import TaskFinishedEvent

    ts = state.tasks[key]
    assert ts.processing_on is not None
    msg = TaskFinished(key, 8, "int", now - 0.5, now)
    state.handle([TaskFinishedEvent(f"done-{key}", ts.processing_on.address, msg)], now)


# ------------------------------------------------------------------ group counts


def test_group_counts_follow_every_transition_and_drop_finished_groups() -> None:
    # given: a scheduler (validating its invariants, group counts included) with one worker
    state = SchedulerState(validate=True)
    state.handle([WorkerJoined("join", "w1", 4, "w1", 0, {}, [], [])], 0.0)

    # when: a client submits two inc tasks and a sum of them
    state.handle([TasksSubmitted("s", "c1", [spec("inc-aaaaaaaa1"), spec("inc-aaaaaaaa2"),
                                             spec("sum-bbbbbbbb", ["inc-aaaaaaaa1", "inc-aaaaaaaa2"])],
                                 ["sum-bbbbbbbb"])], 0.0)  # fmt: skip

    # then: the counts say where each group is, without looking at the tasks
    groups = state.groups.groups
    assert groups["inc"].as_dict() == {"processing": 2}
    assert groups["sum"].as_dict() == {"waiting": 1}
    assert state.groups.by_state() == {"processing": 2, "waiting": 1}

    # when: the incs finish, then the sum
    finish(state, "inc-aaaaaaaa1")
    finish(state, "inc-aaaaaaaa2")
    assert groups["inc"].as_dict() == {"memory": 2}
    assert groups["sum"].as_dict() == {"processing": 1}
    finish(state, "sum-bbbbbbbb")
    # then: the incs' results are released once the sum has its own
    assert groups["inc"].as_dict() == {"released": 2}
    assert groups["sum"].as_dict() == {"memory": 1}

    # when: the client lets go: everything is forgotten, and the groups are dropped
    from shoal.core.scheduler_events import KeysReleased

    state.handle([KeysReleased("r", "c1", ["sum-bbbbbbbb"])], 2.0)
    assert state.groups.groups == {}
    assert state.groups.by_state() == {}


def test_key_group_reads_dask_tuple_keys() -> None:
    assert key_group("('add-8a3f0c1d2e3f', 0, 1)") == "add"
    assert key_group("('sum-partial-abcdef0123', 0)") == "sum-partial"
    assert key_group("('x', 1)") == "x"
    assert key_group("inc-5f1d2e3a4b") == "inc"
    assert key_group("('") == "('"


# ------------------------------------------------------------------ task stream


def test_task_stream_since_reports_new_rows_and_what_was_missed() -> None:
    stream = TaskStream(maxlen=5)
    for i in range(3):
        stream.record(f"inc-{i}", "inc", "w1", 10.0 + i, 10.5 + i)
    rows, nxt, missed = stream.since(0)
    assert [r.key for r in rows] == ["inc-0", "inc-1", "inc-2"] and (nxt, missed) == (3, 0)
    assert stream.since(3) == ([], 3, 0)

    # when: the ring wraps past what a reader saw
    for i in range(3, 10):
        stream.record(f"inc-{i}", "inc", "w2", 20.0, 20.002, "error" if i == 9 else "ok")
    rows, nxt, missed = stream.since(3)
    # then: it gets the rows still held and learns how many it missed
    assert [r.key for r in rows] == [f"inc-{i}" for i in range(5, 10)]
    assert (nxt, missed) == (10, 2)
    # a limit keeps the newest rows
    rows, nxt, missed = stream.since(5, limit=2)
    assert [r.key for r in rows] == ["inc-8", "inc-9"] and missed == 3
    assert stream.errors == 1 and stream.first == 5


def test_task_stream_duration_histogram_is_cumulative() -> None:
    stream = TaskStream()
    stream.record("a-1", "a", "w", 1.0, 1.0002)  # 0.2 ms
    stream.record("a-2", "a", "w", 1.0, 1.3)  # 300 ms
    stream.record("a-3", "a", "w", 1.0, 1000.0)  # beyond the last bucket
    hist = stream.durations["a"]
    buckets = dict(hist.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.5"] == 2 and buckets["+Inf"] == 3
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    assert hist.count == 3 and hist.total == pytest.approx(0.0002 + 0.3 + 999.0)


# ------------------------------------------------------------------ logs


def test_log_ring_keeps_the_newest_records_with_tracebacks() -> None:
    ring = logs.LogRing(maxlen=3)
    logger = logging.getLogger("shoal.test-ring")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    try:
        for i in range(4):
            logger.info("message %d", i)
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(ring)
        logger.setLevel(logging.NOTSET)
    rows = ring.rows()
    assert [r[3].splitlines()[0] for r in rows] == ["message 2", "message 3", "failed"]
    assert "ValueError: bad" in rows[-1][3] and rows[-1][1] == "ERROR"
    assert ring.rows(1) == rows[-1:] and ring.rows(0) == []


def test_shoal_log_level_env_sets_the_shoal_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("shoal")
    before_level, before_handlers = logger.level, list(logger.handlers)
    monkeypatch.setenv("SHOAL_LOG_LEVEL", "debug")
    try:
        logs.apply_env_level()
        assert logger.level == logging.DEBUG
        monkeypatch.setenv("SHOAL_LOG_LEVEL", "Warning")
        logs.apply_env_level()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before_level)
        for handler in logger.handlers[:]:
            if handler not in before_handlers:
                logger.removeHandler(handler)
    assert logs.parse_level("INFO") == logging.INFO
    with pytest.raises(ValueError, match="unknown log level"):
        logs.parse_level("loud")


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(("text", "expected"), [
    (":8787", ("127.0.0.1", 8787)),
    ("8787", ("127.0.0.1", 8787)),
    (0, ("127.0.0.1", 0)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("http://example:1234/", ("example", 1234)),
    ("[::1]:9000", ("::1", 9000)),
])  # fmt: skip
def test_parse_address(text: str | int, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:port", ":70000"])
def test_parse_address_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="bad dashboard address"):
        parse_address(text)


# ------------------------------------------------------------------ bounded cost


class _NoWalk(dict[str, Any]):
    """A task table that fails the test if anything walks it (lookups are fine)."""

    def _walked(self, *args: object) -> object:
        raise AssertionError("walked the whole task table")

    __iter__ = keys = values = items = _walked  # type: ignore[assignment]


def test_snapshot_and_metrics_never_walk_the_tasks() -> None:
    # given: a scheduler holding 100,000 tasks (no worker: they wait)
    scheduler = Scheduler()
    specs = [spec(f"inc-{i:08d}") for i in range(100_000)]
    specs += [spec(f"dec-{i:08d}") for i in range(1_000)]
    scheduler.state.handle([TasksSubmitted("s", "c1", specs, [s.key for s in specs])], 0.0)
    for i in range(5_000):
        scheduler.task_stream.record(f"inc-{i:08d}", "inc", "w1", 1.0, 1.01)
    collector = SchedulerCollector(scheduler)
    # whose task table may be looked up but not walked: a walk would cost per task
    scheduler.state.tasks = _NoWalk(scheduler.state.tasks)

    async def snapshot() -> dict[str, Any]:
        api.info(scheduler)
        api.workers(scheduler)
        counts = api.task_counts(scheduler)
        api.task_stream(scheduler, since=scheduler.task_stream.count - 100)
        list(collector.collect())
        return counts

    # when: the page's snapshot and a scrape are made
    counts = asyncio.run(snapshot())

    # then: they are right, without a pass over the tasks (bench/bench_recording.py times them)
    assert counts["total"] == 101_000
    assert {g["name"]: g["live"] for g in counts["groups"]} == {"inc": 100_000, "dec": 1_000}
    # (the graph view declines to draw it)
    assert api.graph(scheduler)["too_big"] is True
