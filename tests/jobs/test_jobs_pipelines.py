"""Pipelines: children wait for their parents, get their results, and fail with them."""

from __future__ import annotations

import pytest

from shoal.jobs import JobCancelled, JobQueue, ParentFailed


def test_chain_fan_out_fan_in(app: JobQueue) -> None:
    @app.job
    def number(x: int) -> int:
        return x

    @app.job
    def square(x: int) -> int:
        return x * x

    @app.job
    def total(*parts: int, offset: int = 0) -> int:
        return sum(parts) + offset

    root = number.delay(3)
    fan = [square.enqueue(after=[root]) for _ in range(4)]  # square(3) x 4
    joined = total.enqueue(after=fan, kwargs={"offset": 1})
    assert joined.status == "waiting"
    ignore = number.enqueue(args=(5,), after=[root], pass_results=False)
    with app.worker(concurrency=2):
        assert joined.result(timeout=10) == 4 * 9 + 1
        assert ignore.result(timeout=10) == 5
    assert [f.result(0) for f in fan] == [9, 9, 9, 9]


def test_failed_parent_fails_children_clearly(app: JobQueue) -> None:
    @app.job(retries=0)
    def broken() -> int:
        raise RuntimeError("disk full")

    @app.job
    def child(x: int) -> int:
        return x

    parent = broken.delay()
    kid = child.enqueue(after=[parent])
    grandkid = child.enqueue(after=[kid])
    with app.worker(), pytest.raises(ParentFailed, match="disk full"):
        grandkid.result(timeout=10)
    with pytest.raises(RuntimeError, match="disk full"):
        parent.result(0)
    assert kid.status == "failed" and parent.id in (kid.last_error or "")
    assert [r.id for r in app.broker.dead()] == [parent.id]
    late = child.enqueue(after=[parent])
    with pytest.raises(ParentFailed):
        late.result(0)


def test_cancelled_parent_cancels_children(app: JobQueue) -> None:
    @app.job
    def step(x: int = 0) -> int:
        return x

    parent = step.enqueue(delay=60)
    kid = step.enqueue(after=[parent])
    assert parent.cancel()
    with pytest.raises(JobCancelled, match="ParentCancelled"):
        kid.result(0)


def test_unknown_parent_is_an_error(app: JobQueue) -> None:
    @app.job
    def step() -> None: ...

    with pytest.raises(KeyError, match="nope"):
        step.enqueue(after=["nope"])
