"""`shoal.worker.execution`: weighing results (`sizeof`) and the lanes task threads work
through (`Lanes`), driven here without threads: a lane's "thread" is the test calling
`Lanes.take`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from shoal.protocol.serialize import Serialized
from shoal.worker.execution import Lane, Lanes, TaskRun, sizeof

# ------------------------------------------------------------------------------ sizeof


def deep(frame: pd.DataFrame) -> int:
    return int(frame.memory_usage(index=True, deep=True).sum())


@pytest.mark.parametrize("make", [
    lambda: pd.DataFrame({"k": np.arange(100_000), "x": np.random.default_rng(0).random(100_000)}),
    lambda: pd.DataFrame({"s": [f"value-{i}" for i in range(10_000)]}, dtype=object),
    lambda: pd.DataFrame({"s": [f"value-{i}" for i in range(10_000)]}, dtype="string"),
    lambda: pd.DataFrame({"v": range(6)}, index=pd.Index(list("abcdef"), dtype=object)),
    lambda: pd.DataFrame(),
], ids=["numeric", "object-strings", "strings", "object-index", "empty"])  # fmt: skip
def test_a_dataframe_weighs_about_its_deep_memory_usage(make: Callable[[], pd.DataFrame]) -> None:
    frame = make()
    # within 10% (object columns are estimated from a sample), and a little for the header
    assert abs(sizeof(frame) - deep(frame)) <= 0.1 * deep(frame) + 512


def test_arrays_and_buffers_weigh_exactly_their_bytes() -> None:
    assert sizeof(np.zeros(1000)) == 8000
    assert sizeof(b"x" * 100) == 100
    assert sizeof(pd.Series(np.zeros(10))) == 80


# ------------------------------------------------------------------------------- lanes


class Threads:
    """Stands in for the executor: records the lanes a thread was started for."""

    def __init__(self) -> None:
        self.started: list[tuple[Lane, int]] = []

    def __call__(self, lane: Lane, generation: int) -> None:
        self.started.append((lane, generation))


def run(key: str) -> TaskRun:
    return TaskRun(key, b"f", Serialized([b""]), {}, 0)


def test_tasks_handed_to_a_running_lane_start_on_its_thread() -> None:
    threads = Threads()
    lanes = Lanes(threads)
    for key in "abc":
        lanes.hand(1, run(key))
    # one thread for the lane, which takes the tasks in order, then ends
    assert len(threads.started) == 1 and lanes.threads_started == 1
    lane, generation = threads.started[0]
    assert [r.key for r in iter(lambda: lanes.take(lane, generation), None)] == ["a", "b", "c"]
    # the lane is gone: a task handed to it now starts a new thread
    lanes.hand(1, run("d"))
    assert lanes.threads_started == 2


def test_a_revoked_task_is_taken_out_unless_a_thread_took_it() -> None:
    threads = Threads()
    lanes = Lanes(threads)
    lanes.hand(1, run("a"))
    lanes.hand(1, run("b"))
    lane, generation = threads.started[0]
    taken = lanes.take(lane, generation)
    assert taken is not None and taken.key == "a"
    assert lanes.revoke("a") is None  # started
    revoked = lanes.revoke("b")
    assert revoked is not None and revoked.key == "b" and len(lanes) == 0
    assert lanes.take(lane, generation) is None


def test_a_seceded_task_lets_its_lane_go_on_on_a_new_thread_once_resumed() -> None:
    threads = Threads()
    lanes = Lanes(threads)
    lanes.hand(1, run("a"))
    lanes.hand(1, run("b"))
    lane, generation = threads.started[0]
    assert lanes.take(lane, generation) is not None  # "a" runs
    lanes.detach("a")  # and secedes
    # its thread takes nothing more; the lane waits (for the state machine to hear of it)
    assert lanes.take(lane, generation) is None
    lanes.hand(1, run("c"))
    assert lanes.threads_started == 1
    lanes.resume("a")
    assert lanes.threads_started == 2
    new_lane, new_generation = threads.started[1]
    assert new_lane is lane and new_generation != generation
    assert [r.key for r in iter(lambda: lanes.take(lane, new_generation), None)] == ["b", "c"]


def test_clear_drops_what_no_thread_took() -> None:
    threads = Threads()
    lanes = Lanes(threads)
    lanes.hand(1, run("a"))
    lanes.hand(1, run("b"))
    lane, generation = threads.started[0]
    assert [r.key for r in lanes.clear()] == ["a", "b"]
    assert lanes.take(lane, generation) is None and len(lanes) == 0
    lanes.hand(1, run("c"))  # a new state machine's lane 1 is a new lane
    assert lanes.threads_started == 2
