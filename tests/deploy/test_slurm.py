"""SlurmCluster against a real single-host Slurm (see conftest.py's ``slurm`` fixture)."""

from __future__ import annotations

import subprocess
import sys
import time

import cloudpickle
import pytest
from typing import Any

import shoal
from shoal.testing import no_leaks
from shoal.deploy import SlurmCluster
from shoal.deploy.base import LaunchError

SlurmSite = Any  # the `slurm` fixture's site (tests/deploy/conftest.py)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests


def inc(x: int) -> int:
    return x + 1


def _cluster(site: SlurmSite, **kwargs: object) -> SlurmCluster:
    options: dict[str, object] = dict(cores=1, memory="1GB", walltime="00:10:00",
                                      interface="lo", shared_directory=None,
                                      watch_interval=0.5)
    options.update(kwargs)
    return SlurmCluster(**options)  # type: ignore[arg-type]


def test_scale_to_four_workers_computes_and_close_cancels_every_job(slurm_site: SlurmSite) -> None:
    with no_leaks(), _cluster(slurm_site) as cluster:
        start = time.monotonic()
        cluster.scale(4)
        took = cluster.wait_for_workers(4, timeout=120)
        print(f"\nscale(4) -> 4 workers connected: {took:.2f}s")
        assert len(cluster.submitted) == 4
        assert set(slurm_site.jobs()) == set(cluster.submitted)
        with shoal.Client(cluster) as client:
            assert sum(client.gather(client.map(inc, range(100)))) == sum(range(1, 101))
            assert len(client.scheduler_info()["workers"]) == 4
        assert "SlurmCluster running" in repr(cluster) and "workers=4/4" in repr(cluster)
        assert time.monotonic() - start < 120
    assert slurm_site.jobs() == []  # close() cancelled them all


def test_job_script_holds_the_requests_and_no_token() -> None:
    # No Slurm needed: the cluster starts its scheduler here and submits nothing.
    with SlurmCluster(cores=1, memory="1GB", walltime="00:10:00", interface="lo",
                      queue="debug", account="proj42", job_extra=["--comment=shoal"],
                      prologue=["echo prologue-ran"]) as cluster:
        script = cluster.job_script()
        assert "#SBATCH --account=proj42" in script
        # walltime 600 s - margin 60 s, stagger min(60, 30) s
        assert "--lifetime 540 --lifetime-stagger 30" in script
        assert "#SBATCH --array=0-4" in cluster.job_script(array_size=5)
        assert cluster.scheduler_address in script and cluster.dashboard_link.startswith("http")
        assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=1G" in script
        assert "#SBATCH --time=00:10:00" in script and "#SBATCH --partition=debug" in script
        assert "#SBATCH --comment=shoal" in script and "echo prologue-ran" in script
        assert "--lifetime" in script and "--token-file" in script
        assert cluster.token not in script


def test_array_job_starts_its_workers_in_one_submission(slurm_site: SlurmSite) -> None:
    with _cluster(slurm_site, array=True) as cluster:
        cluster.scale(jobs=3)
        assert len(cluster.submitted) == 1  # one sbatch --array
        cluster.wait_for_workers(3, timeout=120)
        with shoal.Client(cluster) as client:
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        job = cluster.submitted[0]
        assert names == {f"slurm-{job}_{i}" for i in range(3)}
    assert slurm_site.jobs() == []


def test_scale_down_cancels_and_retires(slurm_site: SlurmSite) -> None:
    with _cluster(slurm_site) as cluster:
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=120)
        with shoal.Client(cluster) as client:
            futures = client.map(inc, range(20))
            assert client.gather(futures) == list(range(1, 21))
            cluster.scale(1)
            _wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, 60)
            assert client.gather(futures) == list(range(1, 21))  # moved, not lost
        _wait_for(lambda: len(slurm_site.jobs()) == 1, 60)


def test_submission_failure_is_raised_backed_off_and_given_up(slurm_site: SlurmSite) -> None:
    with _cluster(slurm_site, queue="no-such-partition", max_launch_failures=3,
                  launch_backoff=0.5) as cluster:
        with pytest.raises(LaunchError, match="sbatch failed.*partition"):
            cluster.scale(2)
        _wait_for(lambda: cluster.status == "failed", 30)
        times = [t for t, _ in cluster.errors]
        assert len(times) == 3  # given up after 3, not looping
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[0] >= 0.4 and gaps[1] >= 0.9, gaps  # 0.5 s, then 1 s
        time.sleep(2 * cluster.watch_interval)
        assert len(cluster.errors) == 3
        assert cluster.submitted == []


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        time.sleep(0.1)


def test_squeue_sees_our_jobs(slurm_site: SlurmSite) -> None:
    done = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True,
                          check=True)
    assert "debug* up" in done.stdout


@pytest.mark.slow
def test_worker_at_its_lifetime_retires_is_replaced_and_no_result_is_lost(
        slurm_site: SlurmSite, tally: Any) -> None:
    lifetime = 20.0
    with _cluster(slurm_site, lifetime=lifetime, lifetime_stagger=0) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=120)
        with shoal.Client(cluster) as client:
            first = set(client.scheduler_info()["workers"])
            futures = client.map(tally.record, range(40), pure=False)
            assert client.gather(futures) == list(range(40))
            # A second worker half a lifetime later: the two never leave at once.
            time.sleep(lifetime / 2)
            cluster.scale(2)
            cluster.wait_for_workers(2, timeout=60)
            originals = set(client.scheduler_info()["workers"])
            assert first < originals

            def replaced() -> bool:
                now = set(client.scheduler_info()["workers"])
                return len(now) == 2 and not now & originals

            _wait_for(replaced, 2 * lifetime + 60)
            assert client.gather(futures) == list(range(40))
            assert sorted(int(x) for x in tally.lines()) == list(range(40))  # none rerun
        ended = [n for n, log in cluster.get_logs().items() if "reached its lifetime" in log]
        assert len(ended) >= 2, cluster.get_logs()
        assert len(cluster.submitted) >= 4  # two replacements


def slow_record(tally: Any, i: int, seconds: float) -> int:
    time.sleep(seconds)
    return int(tally.record(i))


def _count(client: shoal.Client) -> int:
    return len(client.scheduler_info()["workers"])


@pytest.mark.slow
def test_adaptive_burst_to_maximum_idle_to_minimum_nothing_lost(slurm_site: SlurmSite,
                                                                 tally: Any) -> None:
    with _cluster(slurm_site) as cluster:
        adaptive = cluster.adapt(minimum=1, maximum=4, target_duration=1.0, wait_count=3,
                                 interval=0.5, max_pending=4)
        cluster.wait_for_workers(1, timeout=120)
        with shoal.Client(cluster) as client:
            start = time.monotonic()
            futures = [client.submit(slow_record, tally, i, 0.5, pure=False) for i in range(60)]
            _wait_for(lambda: _count(client) == 4, 90)
            print(f"\nSlurm adaptive: burst -> 4 workers in {time.monotonic() - start:.1f}s")
            assert len(cluster.submitted) <= 4  # never more jobs than the maximum
            assert client.gather(futures) == list(range(60))
            _wait_for(lambda: _count(client) == 1, 60)
            assert client.gather(futures) == list(range(60))  # moved off, not lost
            assert sorted(int(x) for x in tally.lines()) == list(range(60))  # not recomputed
        assert adaptive.error == ""
        _wait_for(lambda: len(slurm_site.jobs()) == 1, 60)  # retired jobs ended


@pytest.mark.slow
def test_adaptive_flapping_load_keeps_the_jobs(slurm_site: SlurmSite, tally: Any) -> None:
    with _cluster(slurm_site) as cluster:
        adaptive = cluster.adapt(minimum=1, maximum=3, target_duration=0.3, wait_count=8,
                                 interval=0.5)
        cluster.wait_for_workers(1, timeout=120)
        with shoal.Client(cluster) as client:
            # 18 s of work on one worker: still running when the two new jobs' workers join
            batch = [client.submit(slow_record, tally, i, 0.3, pure=False) for i in range(60)]
            _wait_for(lambda: _count(client) == 3, 90)
            client.gather(batch)
            for round_ in range(6):  # ~1 s of work, ~2 s idle: shorter than 8 steps of 0.5 s
                batch = [client.submit(slow_record, tally, 1000 + round_ * 100 + i, 0.3,
                                       pure=False) for i in range(10)]
                client.gather(batch)
                time.sleep(2.0)
                assert _count(client) == 3
        assert not any(d.retire for _, d in adaptive.log), adaptive.log
        assert len(cluster.submitted) == 3


def test_tls_cluster_speaks_only_tls(slurm_site: SlurmSite) -> None:
    from shoal.security.credentials import Security

    security = Security.temporary()
    with _cluster(slurm_site, security=security) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=120)
        with shoal.Client(cluster) as client:
            assert client.submit(inc, 41).result(timeout=60) == 42
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        assert "--tls-cert" in cluster.job_script()


def test_walltime_parsing() -> None:
    from shoal.deploy.slurm import parse_walltime

    assert parse_walltime("01:00:00") == 3600 and parse_walltime("1-02:00:00") == 93600
    assert parse_walltime("30") == 1800 and parse_walltime("05:30") == 330


def test_bad_settings_are_named_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="no network interface 'nope0'"):
        SlurmCluster(interface="nope0")
    with pytest.raises(ValueError, match="walltime 'soon' is not"):
        SlurmCluster(walltime="soon")
    with pytest.raises(ValueError, match="memory 'lots' is not a size"):
        SlurmCluster(memory="lots", interface="lo").close()


def test_adaptive_scaling_does_not_loop_failing_submissions(slurm_site: SlurmSite) -> None:
    with _cluster(slurm_site, queue="no-such-partition", max_launch_failures=3,
                  launch_backoff=0.5) as cluster:
        cluster.adapt(minimum=2, maximum=4, interval=0.1)
        _wait_for(lambda: cluster.status == "failed", 30)
        time.sleep(1.0)  # ten more adaptive steps: no more sbatch attempts
        assert len(cluster.errors) == 3, cluster.errors
        assert "partition" in cluster.errors[-1][1]
