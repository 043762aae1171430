"""A scheduler restart loses nothing: SIGKILL ``shoal scheduler --journal`` in the middle of a
5,000-task dependent graph on 3 worker processes, start it again on the same journal and
address, and the client's ``result()`` is right with no user action (it reconnects by itself).

Each trial reports how many task runs were recomputations (runs beyond one per task). The
quick suite runs one trial of each kind; the ``stress`` step runs 10 with a random kill moment,
and 10 with a 1-second fsync interval, so that the kill lands between writes and the events of
the last interval are lost (the workers' re-registration and the client's resubmission make up
for them).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

import shoal
from shoal.testing import no_leaks, wait_until

sys.path.insert(0, str(Path(__file__).parent))
from restart_cluster import (  # noqa: E402
    RestartableCluster,
    count_runs,
    expected,
    submit_graph,
)

WIDTH, DEPTH = 100, 50  # 5,000 dependent tasks and their sum
PAUSE = 0.001
RESULT_DEADLINE = 240.0


def run_trial(directory: Path, seed: int, fsync_interval: float) -> dict[str, float]:
    """One graph, one SIGKILL of the scheduler at a random moment, one restart."""
    rng = random.Random(seed)
    tally = str(directory / "runs")
    cluster = RestartableCluster(directory, fsync_interval=fsync_interval)
    try:
        cluster.start_scheduler()
        cluster.start_workers()
        with shoal.Client(cluster.address, reconnect_timeout=120, set_as_default=False) as client:
            futures, final = submit_graph(client, WIDTH, DEPTH, PAUSE, tally)
            n_tasks = len(futures) + 1
            # Kill once some (not all) of the graph has run: a random share of it.
            share = rng.uniform(0.05, 0.8)
            wait_until(lambda: count_runs(tally) >= share * n_tasks, timeout=120,
                       message=lambda: f"{share:.0%} of the graph ran ({count_runs(tally)})")
            ran_before = count_runs(tally)
            cluster.kill_scheduler()
            killed_at = time.monotonic()
            cluster.start_scheduler()
            assert final.result(timeout=RESULT_DEADLINE) == expected(WIDTH, DEPTH), cluster.logs()
            recovered = time.monotonic() - killed_at
            runs = count_runs(tally)
            assert cluster.scheduler is not None
            late = [line for line in cluster.scheduler.stderr if "not back after" in line]
            assert client._reconnector.reconnects == 1
            del futures, final
        return {"tasks": n_tasks, "ran_before_kill": ran_before,
                "recomputed": runs - n_tasks, "seconds_after_kill": recovered,
                "late": late[0].split("restart: ")[-1] if late else ""}
    finally:
        cluster.close()


def _report(rows: list[dict[str, float]], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        for row in rows:
            print(f"\njournal restart: {row}")


@pytest.mark.timeout(300)
def test_sigkill_and_restart_the_scheduler_mid_graph(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with no_leaks(timeout=20):
        row = run_trial(tmp_path, seed=1, fsync_interval=0.05)
    assert row["recomputed"] >= 0
    _report([row], capsys)


@pytest.mark.timeout(300)
def test_a_kill_between_journal_writes_loses_the_last_interval_and_still_is_right(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with no_leaks(timeout=20):
        row = run_trial(tmp_path, seed=2, fsync_interval=1.0)
    _report([row], capsys)


@pytest.mark.stress
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("fsync_interval", [0.05, 1.0])
def test_ten_kills_at_random_moments(tmp_path: Path, fsync_interval: float,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("SHOAL_CHAOS_SEED", "16"))
    rows = []
    for trial in range(10):
        directory = tmp_path / f"trial-{trial}"
        directory.mkdir()
        with no_leaks(timeout=20):
            rows.append(run_trial(directory, seed + trial, fsync_interval))
    _report(rows, capsys)
