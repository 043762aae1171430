"""``shoal jobs``: worker processes (SIGTERM grace, SIGKILL recovery) and the queue tools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli import main
from shoal.jobs import JobQueue
from shoal.testing import wait_until

HERE = Path(__file__).resolve().parent


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Worker processes need a broker they can share: not memory://."""
    return str(request.param)


@pytest.fixture
def url(broker_url: str) -> str:
    return broker_url


def _env(url: str, lease: float = 1.0) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SHOAL_JOBS_TEST_URL"] = url
    env["SHOAL_JOBS_TEST_LEASE"] = str(lease)
    return env


@contextmanager
def job_worker(url: str, *args: str, lease: float = 1.0) -> Iterator[subprocess.Popen[str]]:
    """A ``shoal jobs worker jobs_testapp:app`` process, ready when yielded; killed after."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "worker",
         "jobs_testapp:app", "--log-level", "warning", *args],
        stdout=subprocess.PIPE, text=True, env=_env(url, lease), start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ready" in line, f"worker did not start: {line!r}"
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def testapp(url: str) -> Iterator[JobQueue]:
    sys.path.insert(0, str(HERE))
    import jobs_testapp

    old = jobs_testapp.app._broker, jobs_testapp.app.url
    jobs_testapp.app._broker, jobs_testapp.app.url = None, url
    try:
        yield jobs_testapp.app
    finally:
        jobs_testapp.app.close()
        jobs_testapp.app._broker, jobs_testapp.app.url = old
        sys.path.remove(str(HERE))


def test_worker_process_runs_jobs(testapp: JobQueue, url: str) -> None:
    import jobs_testapp

    handles = [jobs_testapp.add.delay(i, 1) for i in range(20)]
    with job_worker(url, "--concurrency", "2", "--pool", "processes") as proc:
        assert [h.result(timeout=30) for h in handles] == [i + 1 for i in range(20)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_sigterm_lets_running_job_finish_within_grace(testapp: JobQueue, url: str, tmp_path: Path) -> None:
    import jobs_testapp

    marker = str(tmp_path / "done")
    handle = jobs_testapp.sleep_then_mark.delay(0.5, marker)
    with job_worker(url, "--grace", "20") as proc:
        wait_until(lambda: Path(marker + ".started").exists(), timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert handle.status == "succeeded" and Path(marker).exists()


def test_sigterm_hands_back_jobs_after_grace(testapp: JobQueue, url: str, tmp_path: Path) -> None:
    import jobs_testapp

    marker = str(tmp_path / "slow")
    handle = jobs_testapp.sleep_then_mark.delay(60, marker)
    with job_worker(url, "--grace", "0.3", "--pool", "processes") as proc:
        wait_until(lambda: Path(marker + ".started").exists(), timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert handle.status == "queued" and handle.attempts == 0


def test_killed_worker_jobs_run_elsewhere(testapp: JobQueue, url: str, tmp_path: Path) -> None:
    import jobs_testapp

    marker = str(tmp_path / "m")
    handle = jobs_testapp.sleep_then_mark.enqueue(args=(0.5, marker), retries=2)
    with job_worker(url, lease=1.0) as proc:
        wait_until(lambda: Path(marker + ".started").exists(), timeout=20)
        os.killpg(proc.pid, signal.SIGKILL)
    Path(marker + ".started").unlink()
    with job_worker(url, lease=1.0):
        assert handle.result(timeout=30) == marker
    assert handle.attempts == 2 and "WorkerLost" in (handle.last_error or "")


def test_queue_tools(testapp: JobQueue, url: str) -> None:
    @testapp.job(retries=0, name="tools.fails")
    def fails() -> None:
        raise OSError("no route")

    try:
        import jobs_testapp

        ok = jobs_testapp.add.delay(1, 2)
        bad = fails.delay()
        later = jobs_testapp.noop.enqueue(delay=3600)
        with testapp.worker():
            ok.result(timeout=10)
            with pytest.raises(OSError):
                bad.result(timeout=10)
        runner = CliRunner()

        def run(*args: str) -> str:
            result = runner.invoke(main, ["jobs", *args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return result.output

        out = run("status", url)
        assert "default" in out and "dead-letter list: 1 jobs" in out
        assert later.id in run("list", url, "--status", "scheduled")
        dead = run("dead", url, "--traceback")
        assert bad.id in dead and "OSError: no route" in dead and "raise OSError" in dead
        assert "retried 1 jobs" in run("retry", url, bad.id)
        assert bad.status == "queued"
        assert "retried 0" in runner.invoke(main, ["jobs", "retry", url, "nope"]).output
        assert "purged 1 jobs" in run("purge", url, "--yes")  # ok
        assert "purged 2 jobs" in run("purge", url, "--yes", "--pending")
        assert "jobs_testapp" not in run("list", url)
        bad_url = runner.invoke(main, ["jobs", "status", "ftp://x"])
        assert bad_url.exit_code != 0 and "unknown job broker URL" in bad_url.output
    finally:
        del testapp.jobs["tools.fails"]


def test_worker_with_scheduler_lets_jobs_use_get_client(testapp: JobQueue, url: str,
                                                        client: object) -> None:
    import jobs_testapp

    address = client.scheduler_address  # type: ignore[attr-defined]
    handle = jobs_testapp.cluster_sum.delay(10)
    with job_worker(url, "--scheduler", address) as proc:
        assert handle.result(timeout=30) == 45
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
