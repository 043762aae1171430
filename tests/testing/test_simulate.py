"""The scheduler simulator (`shoal.testing.simulate`): the real core, simulated workers.

Every workload runs to completion in virtual time, never beats its lower bound, and is
deterministic for a seed; placement claims that need many workers are checked at scale in
milliseconds; and the number of calls into `shoal.core` per task stays flat as graphs grow.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import shoal.core
from shoal.core.scheduler_state import SchedulerState
from shoal.testing.simulate import (
    MB,
    WORKLOADS,
    Simulation,
    Workload,
    main,
    random_placement_bytes,
    simulate,
    tree_reduction,
    wide_map,
)

CORE_DIR = str(Path(shoal.core.__file__).resolve().parent)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_runs_to_completion_within_its_bounds(name: str) -> None:
    """Given a small workload on a validating core, every wanted key ends in memory, no
    faster than physics allows, and releasing it leaves nothing behind anywhere."""
    workload = WORKLOADS[name](200, 1)
    sim = Simulation(workload, workers=6, threads=2, seed=1,
                     state=SchedulerState(validate=True))  # fmt: skip

    result = sim.run()

    assert result.completed, result.problems
    assert result.problems == []
    assert all(k in sim.reports for k in workload.wanted)
    assert result.makespan >= result.lower_bound > 0
    assert result.makespan < 10 * result.lower_bound  # and not absurdly slower
    assert result.missing_data == 0 and result.to_dead_workers == 0
    assert result.runs - result.cancelled_runs >= len(workload)
    assert result.tasks_left_after_release == 0
    assert result.worker_keys_left_after_release == 0


@pytest.mark.parametrize("name", ["tree", "dag"])
def test_workers_dying_mid_run_lose_nothing_for_good(name: str) -> None:
    """Given half the workers die while a graph with dependencies runs, their lost results
    are recomputed and every wanted key still ends in memory; releasing it cleans up."""
    result = simulate(name, tasks=200, workers=6, threads=2, seed=5, kill=3, latency=0.01,
                      validate=True)  # fmt: skip

    assert result.completed, result.problems
    assert result.runs > 200  # something was computed twice
    assert result.tasks_left_after_release == 0
    assert result.worker_keys_left_after_release == 0


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_a_seed_gives_the_same_run(name: str) -> None:
    first = simulate(name, tasks=400, workers=10, threads=2, seed=7)
    second = simulate(name, tasks=400, workers=10, threads=2, seed=7)
    other = simulate(name, tasks=400, workers=10, threads=2, seed=8)

    same = ("makespan", "transitions", "bytes_moved", "transfers", "steals", "runs",
            "tasks_per_worker")  # fmt: skip
    assert [getattr(first, f) for f in same] == [getattr(second, f) for f in same]
    assert first.makespan != other.makespan


def test_wide_map_over_200_workers_uses_every_worker() -> None:
    """Placement spreads independent tasks to the least occupied workers: none stays idle."""
    result = simulate("map", tasks=600, workers=200, threads=1)

    assert result.completed
    assert len(result.tasks_per_worker) == 200
    assert min(result.tasks_per_worker.values()) >= 1
    # ... and roughly evenly: nobody runs many times its share.
    assert max(result.tasks_per_worker.values()) <= 3 * 600 / 200
    assert result.makespan < 1.5 * result.lower_bound


def test_tree_reduction_moves_fewer_bytes_than_random_placement() -> None:
    workload = tree_reduction(1000, seed=3)

    result = simulate(workload, workers=50, threads=2, seed=3)

    assert result.completed
    assert 0 < result.bytes_moved < random_placement_bytes(workload, 50, seed=3)


def test_a_chain_stays_where_its_input_is() -> None:
    """Placement prefers the worker holding the most input bytes: 100 independent chains of
    blockwise steps over big chunks, on 100 workers, run each chain where it began and move
    no data at all (though other workers fall idle as chains end at different times)."""
    keys: list[str] = []
    deps: dict[str, list[str]] = {}
    for chain in range(100):
        previous: list[str] = []
        for step in range(5):
            key = f"step{step}-{chain}"
            keys.append(key)
            deps[key] = previous
            previous = [key]
    workload = Workload("chains", keys, deps, dict.fromkeys(keys, 0.1) | {"step0-7": 2.0},
                        dict.fromkeys(keys, 100 * MB), [f"step4-{c}" for c in range(100)])  # fmt: skip

    result = simulate(workload, workers=100, threads=1)

    assert result.completed
    assert result.bytes_moved == 0
    assert result.steals == 0


def _core_lines(run: Callable[[], Any]) -> int:
    """Lines of `shoal.core` executed while ``run()`` runs (every loop iteration counts,
    comprehensions included: a scan over all tasks shows even when it calls no function)."""
    lines = 0

    def in_core(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return in_core

    def on_call(frame: FrameType, event: str, arg: object) -> Any:
        return in_core if frame.f_code.co_filename.startswith(CORE_DIR) else None

    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize(
    "build",
    [wide_map, tree_reduction, WORKLOADS["dag"], WORKLOADS["array"]],
    ids=["map", "tree", "dag", "array"],
)
def test_core_work_per_task_stays_flat_as_the_graph_grows(
    build: Callable[[int, int], Workload],
) -> None:
    """A scheduler path that goes quadratic in the number of tasks shows as a growing
    number of core lines run per task (counted, not timed: a loaded machine cannot flake it)."""
    small = _core_lines(lambda: simulate(build(200, 0), workers=4, threads=2))
    large = _core_lines(lambda: simulate(build(800, 0), workers=4, threads=2))

    assert large / small < 6, (small, large)


@pytest.mark.parametrize(
    "build",
    [wide_map, tree_reduction, WORKLOADS["dag"], WORKLOADS["array"]],
    ids=["map", "tree", "dag", "array"],
)
def test_core_work_per_task_does_not_grow_with_the_number_of_workers(
    build: Callable[[int, int], Workload],
) -> None:
    """Placing a task costs about the same on 300 workers as on 10 (the issue's 1,000,000
    tasks on 1,000 workers needs it): placement looks at the inputs' holders and a few
    workers with room, never at every worker. Scanning them all made this 4.5x."""
    few = _core_lines(lambda: simulate(build(600, 0), workers=10, threads=1))
    many = _core_lines(lambda: simulate(build(600, 0), workers=300, threads=1))

    assert many / few < 2, (few, many)


def test_the_line_count_sees_a_quadratic_path() -> None:
    """The check above is not vacuous: `validate_state` after every ``handle`` call is O(tasks)
    per call, so a validating run is quadratic, and the count says so."""

    def run(n: int) -> Callable[[], Any]:
        state = SchedulerState(validate=True)
        return lambda: Simulation(wide_map(n, 0), workers=4, threads=2, state=state).run()

    small = _core_lines(run(50))
    large = _core_lines(run(200))

    assert large / small > 8, (small, large)


def test_cli_prints_a_json_line_per_workload(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--workload", "all", "--tasks", "200", "--workers", "4", "--json"])

    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workload"] for r in rows] == list(WORKLOADS)
    for r in rows:
        assert r["completed"] and r["makespan"] >= r["lower_bound"]
        assert r["transitions_per_s"] > 0 and r["core_bytes_per_task"] > 0


def test_cli_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--workload", "tree", "--tasks", "100", "--workers", "3", "--no-memory"])

    assert code == 0
    out = capsys.readouterr().out
    assert "transitions/s" in out and "tree" in out
