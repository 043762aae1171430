"""The `shoal` command and process lifetimes: real scheduler and worker processes that
stop cleanly on SIGTERM and SIGINT, and an embedded cluster that never leaves a worker
process behind, even when its client's process is killed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import shoal
from shoal.testing import no_leaks, spawn_scheduler, spawn_worker, wait_until


def shoal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that is not us counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["scheduler", "worker", "demo", "shoal.Client"]),
        (["scheduler"], ["--host", "--port", "--token", "SHOAL_TOKEN", "0 picks a free one"]),
        (["worker"], ["SCHEDULER_ADDRESS", "--nthreads", "--name", "--token", "--connect-timeout"]),
    ],
    ids=["shoal", "scheduler", "worker"],
)
def test_help_explains_the_flags(args: list[str], expected: list[str]) -> None:
    # when --help is asked of the command or a subcommand
    done = shoal_cli(*args, "--help")
    # then it exits 0 and names every flag
    assert done.returncode == 0, done.stderr
    for word in expected:
        assert word in done.stdout, f"{word!r} missing from `shoal {' '.join(args)} --help`"


def test_scheduler_and_workers_as_processes_run_work_and_stop_cleanly() -> None:
    # given a scheduler process and two worker processes
    with no_leaks(timeout=15), spawn_scheduler(port=0) as scheduler, \
            spawn_worker(scheduler.address, nthreads=1, name="cli-a") as worker_a, \
            spawn_worker(scheduler.address, nthreads=2, name="cli-b") as worker_b:  # fmt: skip
        assert scheduler.address.startswith("tcp://127.0.0.1:")
        # when a client connects and runs work
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=20)
            assert client.nthreads() == {worker_a.address: 1, worker_b.address: 2}
            squares = client.map(lambda x: x * x, range(20))
            assert client.submit(sum, squares).result(timeout=30) == 2470
            # (each worker runs in a child process of its `shoal worker`, the nanny)
            pids = client.run(os.getpid)
            assert {psutil.Process(p).ppid() for p in pids.values()} == {worker_a.pid,
                                                                         worker_b.pid}
        # then SIGTERM and SIGINT each stop a worker with exit code 0
        worker_a.stop(signal.SIGTERM, timeout=15)
        worker_b.stop(signal.SIGINT, timeout=15)
        # and SIGTERM stops the scheduler with exit code 0
        scheduler.stop(signal.SIGTERM, timeout=15)


def test_scheduler_stops_on_sigint_with_a_worker_attached() -> None:
    # given a scheduler with a worker joined
    with spawn_scheduler(port=0) as scheduler, spawn_worker(scheduler.address) as worker:
        # when the scheduler gets SIGINT, then it exits cleanly
        scheduler.stop(signal.SIGINT, timeout=15)
        # and the worker, having lost its scheduler, exits cleanly on its own
        wait_until(lambda: worker.proc.poll() is not None, timeout=15,
                   message="worker exits after its scheduler")  # fmt: skip
        worker.stop()


def test_a_worker_with_the_wrong_token_is_refused() -> None:
    with spawn_scheduler(port=0, token="sesame") as scheduler:
        done = shoal_cli("worker", scheduler.address, "--token", "nope", "--connect-timeout", "5")
        assert done.returncode != 0
        assert "invalid authentication token" in done.stderr


def test_embedded_cluster_leaves_no_worker_process_after_close() -> None:
    with no_leaks(timeout=15):
        client = shoal.Client(n_workers=2, threads_per_worker=1)
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
        client.close()
        assert all(gone(pid) for pid in pids)


def test_embedded_cluster_leaves_no_worker_process_after_its_with_block() -> None:
    with no_leaks(timeout=15):
        with shoal.Client(n_workers=2, threads_per_worker=1) as client:
            pids = set(client.run(os.getpid).values())
            assert client.submit(lambda: 1).result(timeout=10) == 1
        assert all(gone(pid) for pid in pids)


SCRIPT = textwrap.dedent("""
    import os, sys, time
    import shoal

    client = shoal.Client(n_workers=2, threads_per_worker=1)
    pids = sorted(client.run(os.getpid).values())
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(120)
""")


def test_embedded_workers_exit_when_the_client_process_is_killed() -> None:
    # given a process holding an embedded cluster with two worker processes
    with no_leaks(timeout=15):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            # the script prints once its workers answered; wait for that with a deadline
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "the script printed nothing within 60s"
            line = proc.stdout.readline()
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2, f"unexpected output {line!r}"
            assert all(not gone(pid) for pid in pids)
            # when that process is killed with SIGKILL
            proc.kill()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # then its worker processes exit on their own
        wait_until(lambda: all(gone(pid) for pid in pids), timeout=15,
                   message=f"worker processes {pids} exit after their parent's death")  # fmt: skip
