"""Scheduling policies end to end, on in-process clusters: priorities, resources, worker
restrictions, retries, annotations, fire-and-forget and cancelling.

Tasks record what happened in files under ``tmp_path`` (start order, timestamps, attempts);
tests poll with deadlines (`wait_until`) and never sleep and hope. `gen_cluster` fails a
test that leaves threads, processes or ports behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.testing import Gate, gen_cluster, wait_until

# ------------------------------------------------------------------ task helpers


def record(path: str, label: Any) -> Any:
    """Append ``label`` to the file at ``path``; return it."""
    with open(path, "a") as f:
        f.write(f"{label}\n")
    return label


def held(path: str, label: str, seconds: float) -> str:
    """Hold a thread for ``seconds``; append ``label start end`` (monotonic) to ``path``."""
    start = time.monotonic()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{label} {start} {time.monotonic()}\n")
    return label


def flaky(path: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in ``path``), then return the call count."""
    with open(path, "a") as f:
        f.write(f"{time.monotonic()}\n")
    attempts = len(Path(path).read_text().splitlines())
    if attempts <= failures:
        raise ConnectionError(f"attempt {attempts} failed")
    return attempts


def gated_then_mark(gate: Gate, marker: str) -> str:
    """Wait for ``gate``, then create the file ``marker``."""
    gate()
    Path(marker).write_text("done")
    return marker


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def story_states(client: shoal.Client, future: shoal.Future) -> list[str]:
    return [row[2] for row in client.story(future)]


def queued_in_scheduler(client: shoal.Client, *futures: shoal.Future) -> bool:
    """Every one of ``futures`` has reached the scheduler's queue."""
    return all("queued" in story_states(client, f) for f in futures)


@pytest.fixture
def one_thread() -> Iterator[shoal.Client]:
    """A client on one in-process worker with one thread."""
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as c:
        yield c


@pytest.fixture
def busy_gate() -> Iterator[Gate]:
    g = Gate(max_wait=30)
    try:
        yield g
    finally:
        g.close()


# -------------------------------------------------------------------- priority


def test_higher_priority_starts_first_ties_in_submission_order(
    one_thread: shoal.Client, busy_gate: Gate, tmp_path: Path
) -> None:
    # given: the only thread is busy
    client = one_thread
    log = tmp_path / "order.txt"
    blocker = client.submit(busy_gate, "busy")
    wait_until(lambda: "processing" in story_states(client, blocker), message="blocker running")

    # when tasks of mixed priority are submitted behind it
    specs = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -3), ("f", 9)]
    futures = [client.submit(record, str(log), name, priority=p) for name, p in specs]
    wait_until(lambda: queued_in_scheduler(client, *futures), message="all queued")
    busy_gate.open()

    # then: they start highest priority first, ties in the order they were submitted
    client.gather(futures)
    assert lines(log) == ["f", "b", "d", "a", "c", "e"]
    assert blocker.result(timeout=10) == "busy"


def test_annotate_applies_priority_and_retries(
    one_thread: shoal.Client, busy_gate: Gate, tmp_path: Path
) -> None:
    # given: the only thread is busy, and ordinary work queued behind it
    client = one_thread
    log = tmp_path / "order.txt"
    blocker = client.submit(busy_gate, "busy")
    wait_until(lambda: "processing" in story_states(client, blocker), message="blocker running")
    plain = [client.submit(record, str(log), f"plain-{i}") for i in range(3)]

    # when urgent work, with retries, is submitted inside an annotation
    with shoal.annotate(priority=10, retries=2, retry_delay=0.01):
        urgent = client.submit(record, str(log), "urgent")
        shaky = client.submit(flaky, str(tmp_path / "attempts.txt"), 2)
    wait_until(lambda: queued_in_scheduler(client, *plain, urgent), message="all queued")
    busy_gate.open()

    # then: the urgent task jumps the queue, and the flaky one is retried until it succeeds
    client.gather([*plain, urgent, blocker])
    assert lines(log)[0] == "urgent"
    assert shaky.result(timeout=10) == 3


# ------------------------------------------------------------------- resources


def test_resources_limit_how_many_run_at_once_per_worker(tmp_path: Path) -> None:
    # given: 2 workers with 2 threads each, and 1 GPU each
    log = tmp_path / "gpu.txt"
    with gen_cluster(n_workers=2, threads_per_worker=2, processes=False,
                     resources={"GPU": 1}) as client:  # fmt: skip
        # when 6 tasks each needing a GPU (0.15 s) and 2 needing none are submitted
        gpu = [client.submit(held, str(log), f"g{i}", 0.15, resources={"GPU": 1})
               for i in range(6)]  # fmt: skip
        cpu = [client.submit(held, str(log), f"c{i}", 0.15) for i in range(2)]
        client.gather(gpu + cpu)
        who_has = client.who_has(gpu + cpu)

    # then: on each worker the GPU tasks never overlapped ...
    spans: dict[str, list[tuple[float, float]]] = {}
    by_label = {line.split()[0]: line.split()[1:] for line in lines(log)}
    for i, future in enumerate(gpu):
        [worker] = who_has[future.key]
        start, end = map(float, by_label[f"g{i}"])
        spans.setdefault(worker, []).append((start, end))
    assert len(spans) == 2, "both GPU workers were used"
    for worker, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert start >= end - 1e-3, f"two GPU tasks overlapped on {worker}: {intervals}"
    # ... while the spare thread ran CPU work beside them
    cpu_spans = [tuple(map(float, by_label[f"c{i}"])) for i in range(2)]
    gpu_spans = [s for intervals in spans.values() for s in intervals]
    assert any(cs < ge and gs < ce for cs, ce in cpu_spans for gs, ge in gpu_spans)


def test_unsatisfiable_resource_warns_and_story_explains(client: shoal.Client) -> None:
    # when a task asks for a resource no worker offers
    with pytest.warns(RuntimeWarning, match=r"needs resources TPU=1") as recorded:
        future = client.submit(sum, [1, 2], resources={"TPU": 1})
        wait_until(lambda: len(recorded) > 0, timeout=10, message="a TaskWarning")

    # then: the warning names the task; the story says why it waits
    assert future.key in str(recorded[0].message)
    [reason] = [row[3] for row in client.story(future) if row[2] == "no-worker"]
    assert "TPU=1" in reason and "no worker offers that" in reason
    assert future.status == "pending"
    future.cancel()
    wait_until(future.cancelled, timeout=10, message="cancelled")  # marked on the client's loop


# ---------------------------------------------------------------- restrictions


def test_workers_restriction_is_honoured(client: shoal.Client) -> None:
    # given two workers
    a, b = sorted(client.scheduler_info()["workers"])

    # when tasks are restricted to b (by address) and to a (by name)
    on_b = client.map(str, range(6), workers=[b])
    name_a = client.scheduler_info()["workers"][a]["name"]
    on_a = client.map(repr, range(6), workers=name_a)
    client.gather(on_b + on_a)

    # then every one ran there
    who_has = client.who_has(on_b + on_a)
    assert {w for f in on_b for w in who_has[f.key]} == {b}
    assert {w for f in on_a for w in who_has[f.key]} == {a}


def test_allow_other_workers_runs_elsewhere_when_the_preferred_is_busy(
    client: shoal.Client, busy_gate: Gate
) -> None:
    # given: worker b is busy
    a, b = sorted(client.scheduler_info()["workers"])
    blocker = client.submit(busy_gate, "busy", workers=[b])
    wait_until(lambda: "processing" in story_states(client, blocker), message="blocker running")

    # when a task prefers b but allows others
    future = client.submit(str, "flexible", workers=[b], allow_other_workers=True)

    # then it runs on a at once
    assert future.result(timeout=10) == "flexible"
    assert client.who_has([future])[future.key] == [a]
    busy_gate.open()
    blocker.result(timeout=10)


def test_restriction_to_an_absent_worker_warns(client: shoal.Client) -> None:
    with pytest.warns(RuntimeWarning, match="restricted to workers") as recorded:
        future = client.submit(str, "x", workers=["tcp://127.0.0.1:1"])
        wait_until(lambda: len(recorded) > 0, timeout=10, message="a TaskWarning")
    assert any("none of which is connected" in row[3] for row in client.story(future))
    future.cancel()


# --------------------------------------------------------------------- retries


def test_retries_run_a_failing_task_again_until_it_succeeds(
    client: shoal.Client, tmp_path: Path
) -> None:
    # given a task that fails twice, then succeeds
    attempts = tmp_path / "attempts.txt"

    # when it is submitted with 2 retries, 0.1 s apart at first
    future = client.submit(flaky, str(attempts), 2, retries=2, retry_delay=0.1)

    # then: it ran 3 times and the third answer is the result
    assert future.result(timeout=10) == 3
    times = [float(t) for t in lines(attempts)]
    assert len(times) == 3
    # no retry came before its delay, and the delay doubled
    assert times[1] - times[0] >= 0.1 - 0.01
    assert times[2] - times[1] >= 0.2 - 0.01


def test_retries_used_up_raise_the_last_error(client: shoal.Client, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    future = client.submit(flaky, str(attempts), 5, retries=1, retry_delay=0.0)
    with pytest.raises(ConnectionError, match="attempt 2 failed"):
        future.result(timeout=10)
    assert len(lines(attempts)) == 2


# ------------------------------------------------------------- fire and forget


def test_fire_and_forget_runs_a_dropped_task_to_the_end(
    client: shoal.Client, tmp_path: Path
) -> None:
    # given a side-effect task that takes a while
    marker = tmp_path / "side-effect.txt"
    future = client.submit(held, str(marker), "side-effect", 0.3)
    key = future.key

    # when the client fires and forgets it, and drops its only future
    client.fire_and_forget(future)
    del future

    # then it still runs to the end, and the scheduler then forgets it
    wait_until(lambda: lines(marker), timeout=10, message="the side effect")
    wait_until(lambda: key not in client.who_has(), timeout=10, message="the result dropped")
    wait_until(lambda: client.story(key)[-1][2] == "forgotten", timeout=10,
               message="the key forgotten")  # fmt: skip


# ---------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_task_releases_it_and_its_dependents(
    one_thread: shoal.Client, busy_gate: Gate, tmp_path: Path
) -> None:
    # given: the only thread busy, q queued behind it, r = f(q) waiting for q
    client = one_thread
    ran = tmp_path / "ran.txt"
    blocker = client.submit(busy_gate, "busy")
    wait_until(lambda: "processing" in story_states(client, blocker), message="blocker running")
    q = client.submit(record, str(ran), "q")
    r = client.submit(record, str(ran), q)
    wait_until(lambda: queued_in_scheduler(client, q), message="q queued")

    # when q is cancelled
    assert q.cancel()

    # then: both are cancelled, the scheduler forgets them, and neither ever runs
    wait_until(lambda: r.status == "cancelled", timeout=10, message="r cancelled")
    assert q.status == "cancelled" and q.cancelled()
    wait_until(lambda: story_states(client, q)[-1:] == ["forgotten"], timeout=10,
               message="q forgotten")  # fmt: skip
    busy_gate.open()
    assert blocker.result(timeout=10) == "busy"
    after = client.submit(record, str(ran), "after")  # the worker is free and still serves
    assert after.result(timeout=10) == "after"
    assert lines(ran) == ["after"]


def test_cancel_of_a_running_task_drops_its_result(
    client: shoal.Client, busy_gate: Gate, tmp_path: Path
) -> None:
    # given: a task that is running
    marker = tmp_path / "finished.txt"
    future = client.submit(gated_then_mark, busy_gate, str(marker))
    key = future.key
    wait_until(lambda: "processing" in story_states(client, future), message="running")

    # when it is cancelled, and then runs to its end on the worker
    assert future.cancel()
    wait_until(lambda: future.status == "cancelled", timeout=10, message="cancelled")
    busy_gate.open()
    wait_until(marker.exists, timeout=10, message="the task finished")

    # then: its result is not kept anywhere (the worker is told to drop it when it reports)
    assert client.story(key)[-1][2] == "forgotten"
    assert client.who_has([future]) == {key: []}
    workers = client.cluster.workers  # in-process: the `Worker` objects themselves
    wait_until(lambda: all(key not in w.data for w in workers), timeout=10,
               message="the worker dropped the result")  # fmt: skip
    assert future.status == "cancelled"
