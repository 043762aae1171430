"""Adaptive scaling: the policy alone (no cluster), then on LocalCluster (in-process and
process workers). Slurm's adaptive test is in test_slurm.py."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import pytest

import shoal
from shoal.testing import no_leaks
from shoal.deploy.adaptive import AdaptivePolicy, Observation, WorkerLoad

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests


def _workers(*loads: tuple[int, int]) -> tuple[WorkerLoad, ...]:
    return tuple(WorkerLoad(f"tcp://w{i}", 1, p, b) for i, (p, b) in enumerate(loads))


def _obs(workers: tuple[WorkerLoad, ...], tasks: int, seconds: float, pending: int = 0) -> Observation:
    return Observation(workers, pending, tasks, seconds, threads_per_worker=1)


# ------------------------------------------------------------------- the policy


def test_burst_scales_up_at_once_but_pending_workers_are_capped() -> None:
    policy = AdaptivePolicy(minimum=0, maximum=100, target_duration=1.0, max_pending=5)
    decision = policy.recommend(_obs(_workers((1, 0)), tasks=1000, seconds=500.0))
    assert decision.scale_to == 1 + 5  # not 100: at most 5 requested and not connected
    # Those 5 still pending: no more are asked for.
    assert policy.recommend(_obs(_workers((1, 0)), 1000, 500.0, pending=5)).scale_to is None
    assert policy.recommend(_obs(_workers((1, 0)), 1000, 500.0, pending=3)).scale_to == 1 + 3 + 2


def test_many_tiny_tasks_ask_for_few_workers() -> None:
    policy = AdaptivePolicy(minimum=0, maximum=100, target_duration=5.0)
    # 10,000 tasks of 1 ms: 10 s of work -> 2 workers finish it in 5 s.
    assert policy.desired(_obs((), tasks=10_000, seconds=10.0)) == 2
    # 3 long tasks: never more workers than tasks.
    assert policy.desired(_obs((), tasks=3, seconds=3000.0)) == 3
    assert policy.desired(_obs((), tasks=0, seconds=0.0)) == 0
    assert AdaptivePolicy(minimum=2, maximum=4).desired(_obs((), 0, 0.0)) == 2


def test_scale_down_only_after_wait_count_low_recommendations_and_idle_first() -> None:
    policy = AdaptivePolicy(minimum=1, maximum=10, target_duration=1.0, wait_count=3)
    workers = _workers((0, 500), (0, 10), (2, 0))
    for _ in range(2):
        assert policy.recommend(_obs(workers, tasks=2, seconds=0.1)).retire == ()
    decision = policy.recommend(_obs(workers, tasks=2, seconds=0.1))
    # 1 worker is enough; the busy one stays, the idle ones with the least data go.
    assert decision.scale_to == 1 and decision.retire == ("tcp://w1", "tcp://w0")


def test_a_flapping_load_does_not_flap_the_workers() -> None:
    policy = AdaptivePolicy(minimum=1, maximum=10, target_duration=1.0, wait_count=4)
    workers = _workers(*[(1, 0)] * 5)
    busy, idle = _obs(workers, 50, 50.0), _obs(workers, 0, 0.0)
    for _ in range(20):  # busy, idle, idle, idle, busy, ...
        for obs in (busy, idle, idle, idle):
            decision = policy.recommend(obs)
            assert decision.retire == () and (decision.scale_to or 5) >= 5


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptivePolicy(minimum=5, maximum=2)
    with pytest.raises(ValueError, match="target_duration"):
        AdaptivePolicy(target_duration=0)
    with pytest.raises(ValueError, match="wait_count"):
        AdaptivePolicy(wait_count=0)


# ------------------------------------------------------------------ LocalCluster


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def _count(client: shoal.Client) -> int:
    return len(client.scheduler_info()["workers"])


def slow_record(tally: Any, i: int, seconds: float) -> int:
    time.sleep(seconds)
    return int(tally.record(i))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_local_burst_scales_to_maximum_then_idle_scales_to_minimum_losing_nothing(
        processes: bool, tally: Any) -> None:
    with no_leaks(), shoal.Client(n_workers=1, threads_per_worker=1,
                                  processes=processes) as client:
        adaptive = client.cluster.adapt(minimum=1, maximum=4, target_duration=0.5,
                                        wait_count=3, interval=0.2)
        futures = [client.submit(slow_record, tally, i, 0.25, pure=False) for i in range(48)]
        took = _wait_for(lambda: _count(client) == 4, 30, "scale up to 4")
        print(f"\nburst -> 4 workers ({'processes' if processes else 'threads'}): {took:.2f}s")
        assert client.gather(futures) == list(range(48))
        # Idle now, results held: back to 1 worker, through retire_workers.
        _wait_for(lambda: _count(client) == 1, 30, "scale down to 1")
        assert client.gather(futures) == list(range(48))  # nothing lost
        assert sorted(int(x) for x in tally.lines()) == list(range(48))  # nothing recomputed
        assert max(d.scale_to or 0 for _, d in adaptive.log) == 4
        assert adaptive.error == ""
        time.sleep(1.0)  # several more steps at the minimum: it stays there
        assert _count(client) == 1


def test_local_flapping_load_keeps_the_workers(tally: Any) -> None:
    with shoal.Client(n_workers=1, threads_per_worker=1, processes=False) as client:
        adaptive = client.cluster.adapt(minimum=1, maximum=3, target_duration=0.2,
                                        wait_count=10, interval=0.2)
        futures = []
        counts = []
        for round_ in range(8):  # ~0.4 s of work, then ~0.6 s idle: shorter than 10 steps
            batch = [client.submit(slow_record, tally, round_ * 100 + i, 0.1, pure=False)
                     for i in range(12)]
            client.gather(batch)
            futures += batch
            time.sleep(0.6)
            counts.append(_count(client))
        assert not any(d.retire for _, d in adaptive.log), adaptive.log
        assert counts[-1] == max(counts) == 3, counts
        assert len(tally.lines()) == 8 * 12


def test_local_scale_by_hand(tally: Any) -> None:
    with shoal.Client(n_workers=1, threads_per_worker=1, processes=False) as client:
        client.cluster.scale(3)
        _wait_for(lambda: _count(client) == 3, 30, "scale to 3")
        futures = client.map(tally.record, range(30), pure=False)
        client.gather(futures)
        client.cluster.scale(1)
        _wait_for(lambda: _count(client) == 1, 30, "scale to 1")
        assert client.gather(futures) == list(range(30))
        assert len(tally.lines()) == 30
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            client.cluster.scale(-1)
        logs = client.cluster.get_logs()
        remaining = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert len(remaining) == 1 and set(logs) == {"scheduler", *remaining}
