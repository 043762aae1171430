"""``shoal worker --lifetime``: a worker retires gracefully at its lifetime (its results
move to other workers first) and exits 0; bad values are refused naming the option."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any

import pytest

import shoal
from shoal.testing.cluster import spawn_scheduler, spawn_worker
from shoal.worker.lifetime import effective_lifetime


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny", "no-nanny"])
def test_worker_at_its_lifetime_retires_keeping_its_results(nanny: bool, tally: Any) -> None:
    quiet = ["--no-dashboard"]
    with spawn_scheduler(extra_args=quiet) as scheduler, \
            spawn_worker(scheduler.address, name="keeper", extra_args=quiet), \
            spawn_worker(scheduler.address, name="mortal",
                         extra_args=[*quiet, "--lifetime", "4",
                                     *([] if nanny else ["--no-nanny"])]) as mortal:
        with shoal.Client(scheduler.address) as client:
            futures = client.map(tally.record, range(20), pure=False, workers=["mortal"])
            assert client.gather(futures) == list(range(20))
            assert mortal.proc.wait(timeout=60) == 0  # left on its own, cleanly
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
            assert names == {"keeper"}
            assert client.gather(futures) == list(range(20))  # moved to the keeper
            assert sorted(int(x) for x in tally.lines()) == list(range(20))  # not rerun
        assert "reached its lifetime (4s): retiring" in mortal.output()


@pytest.mark.parametrize("args, message", [
    (["--lifetime", "0"], "lifetime must be a positive number"),
    (["--lifetime", "10", "--lifetime-stagger", "-1"], "stagger must be >= 0"),
])
def test_bad_lifetime_is_refused_naming_the_option(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "shoal.cli", "worker", "tcp://127.0.0.1:1",
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--lifetime" in done.stderr and message in done.stderr


def test_stagger_takes_up_to_its_seconds_off() -> None:
    rng = random.Random(1)
    values = [effective_lifetime(100.0, 10.0, rng) for _ in range(200)]
    assert 90.0 <= min(values) < 92.0 and 98.0 < max(values) <= 100.0
    assert effective_lifetime(5.0, 50.0, rng) >= 0.0
