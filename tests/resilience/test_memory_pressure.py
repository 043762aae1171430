"""Workers under memory pressure, as real processes: results beyond the memory target spill
to disk and come back when needed, and a worker above its pause fraction starts no task."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from shoal.worker.memory import MemoryFractions
from shoal.testing import Tally, gen_cluster, wait_until

# Worker processes cannot import this module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 10**6
#: Chunks of a tenth of the limit must be safe: 20 MB of float64 for a 200 MB worker. With
#: dask's fractions it keeps its RSS under 140 MB by spilling and is restarted above 190 MB:
#: the 50 MB between cannot hold what may be in use outside the store at once (a task's two
#: inputs read back and its result, an input being fetched, a result being sent: up to
#: 100 MB), so a worker reserves room under its spill line before it allocates.
CHUNK_MB = 20
ARRAY_LEN = CHUNK_MB * MB // 8
LIMIT_MB = 200
TERMINATE = 0.95


def make(i: int) -> Any:
    return np.full(ARRAY_LEN, float(i))


def add(a: Any, b: Any) -> Any:
    return a + b


def total(a: Any) -> float:
    return float(a.sum())


def peak_rss() -> int:
    """This process's peak RSS, bytes: its high-water mark since exec (``ru_maxrss``
    would count the parent's memory from before it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def run_graph_larger_than_memory(n: int) -> None:
    """2 worker processes of 200 MB each; ``n`` arrays of 20 MB and ``n`` sums of neighbours
    (fetched across workers), all held: ``n`` * 40 MB in all."""
    with gen_cluster(n_workers=2, threads_per_worker=1, processes=True,
                     memory_limit=f"{LIMIT_MB}MB", timeout=240) as client:  # fmt: skip
        started = time.monotonic()
        xs = [client.submit(make, i, key=f"x-{i}") for i in range(n)]
        ys = [client.submit(add, xs[i], xs[(i + 1) % n], key=f"y-{i}") for i in range(n)]
        sums = client.map(total, ys)

        # when it runs, then every result is right (spilled inputs were read back)
        expected = [(i + (i + 1) % n) * ARRAY_LEN for i in range(n)]
        assert client.gather(sums) == expected
        elapsed = time.monotonic() - started

        # and the workers reported spilled bytes while the results are held
        def spilled() -> dict[str, int]:
            workers = client.scheduler_info()["workers"]
            return {a: w["spilled_bytes"] for a, w in workers.items()}

        # (what the stores cannot hold is on disk; heartbeats tell it within a second)
        held = 2 * n * CHUNK_MB * MB
        on_disk = wait_until(lambda: (s := sum(spilled().values())) > held - 2 * 0.7 * LIMIT_MB
                             * MB and s, timeout=10, message="spilled bytes in the heartbeats")  # fmt: skip

        # and a spilled result comes back whole to the client, read from the worker's disk
        assert np.array_equal(xs[0].result(timeout=30), make(0))

        # and no worker died, and none went over its terminate line, ever
        assert client.worker_deaths() == []
        peaks = client.run(peak_rss)
        assert len(peaks) == 2
        assert max(peaks.values()) < TERMINATE * LIMIT_MB * MB, peaks
        print(f"\n{n}x2 chunks of {CHUNK_MB} MB: {elapsed:.1f}s, peak RSS per worker"
              f" {sorted(p // MB for p in peaks.values())} MB of {LIMIT_MB} MB"
              f" (terminate at {TERMINATE * LIMIT_MB:.0f}), spilled {on_disk // MB} MB")


def test_a_graph_larger_than_the_memory_limit_finishes_by_spilling() -> None:
    # given 640 MB of results held on two 200 MB workers (the normal suite's, cheaper case)
    run_graph_larger_than_memory(16)


@pytest.mark.slow
def test_a_graph_three_times_the_memory_limit_finishes_by_spilling() -> None:
    # given 1.2 GB of results held on two 200 MB workers: 3x their memory
    run_graph_larger_than_memory(30)


def hog(megabytes: int) -> int:
    """Hold ``megabytes`` of memory in this worker process (outside the store)."""
    sys._shoal_test_hog = np.ones(megabytes * MB // 8)  # type: ignore[attr-defined]
    return megabytes


def free_hog() -> bool:
    return sys.__dict__.pop("_shoal_test_hog", None) is not None


def task_states() -> dict[str, str]:
    """The states of the tasks on the worker of this process (run with `Client.run`)."""
    import gc

    from shoal.worker.server import Worker

    [worker] = [o for o in gc.get_objects() if isinstance(o, Worker) and o.status == "running"]
    assert worker.state is not None
    return {key: ts.state for key, ts in worker.state.tasks.items()}


def test_a_worker_above_its_pause_fraction_starts_no_task_until_back_under(
    tmp_path: Path,
) -> None:
    # given one worker process with 500 MB and a low pause fraction: 30%, 150 MB (no spilling
    # or restarting here: what fills it is outside the store)
    fractions = MemoryFractions(target=None, spill=None, pause=0.3, terminate=None)
    tally = Tally(tmp_path / "runs.txt")
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="500MB",
                     memory_fractions=fractions, timeout=60) as client:  # fmt: skip
        [address] = client.scheduler_info()["workers"]

        def paused() -> bool:
            return bool(client.scheduler_info()["workers"][address]["paused"])

        # when a task makes the process hold 200 MB
        assert client.submit(hog, 200, pure=False).result(timeout=30) == 200
        # then the worker pauses (its heartbeat says so)
        wait_until(paused, timeout=10, message="the worker pauses")

        # and a task submitted now reaches the worker but does not start
        late = client.submit(tally.record, "late", pure=False)
        wait_until(lambda: client.run(task_states)[address].get(late.key) == "ready",
                   timeout=10, message="the task waits on the paused worker")  # fmt: skip
        assert tally.count() == 0 and not late.done()

        # when the memory is freed (`run` is not a task: it runs while paused)
        assert client.run(free_hog) == {address: True}

        # then the worker resumes and the waiting task runs
        assert late.result(timeout=10) == "late"
        wait_until(lambda: not paused(), timeout=10, message="the worker resumes")
        assert tally.count("late") == 1
        assert client.worker_deaths() == []


def test_in_process_workers_spill_by_the_target_only() -> None:
    # given an in-process worker with a 100 MB limit (target 60 MB)
    with gen_cluster(n_workers=1, threads_per_worker=1, processes=False,
                     memory_limit="100MB") as client:  # fmt: skip
        # when 10 arrays of 10 MB are held, then the results are right and some were spilled
        xs = [client.submit(make, i, key=f"x-{i}") for i in range(10)]
        assert [total(x) for x in client.gather(xs)] == [i * ARRAY_LEN for i in range(10)]
        [worker] = client.cluster.workers
        wait_until(lambda: worker.data.spilled_bytes > 0, timeout=10, message="spilled")
        assert worker.data.memory_bytes <= 60 * MB
        assert client.submit(total, xs[0]).result(timeout=10) == 0.0
        spill_dir = worker.data.directory
        assert spill_dir is not None and os.listdir(spill_dir)
    # and its spill directory is gone with it
    assert not os.path.exists(spill_dir)
