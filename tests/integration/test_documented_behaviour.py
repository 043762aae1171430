"""What the README promises about servers, clients and the ``shoal`` command, checked end
to end with real processes over real TCP on loopback:

- workers reconnect to a scheduler that comes back on the same address (``--death-timeout``);
- ``client.restart()`` gives new worker processes, as many as before, that run new work;
- ``SHOAL_TOKEN`` in the environment of the scheduler, the client and the worker;
- ``shoal worker --memory-limit`` is what the scheduler reports and ``--memory-fractions``
  are applied (a low target fraction spills results);
- ``shoal demo`` runs to the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle
import psutil
import pytest

import shoal
from shoal.testing import (
    ShoalProcess,
    gen_cluster,
    no_leaks,
    spawn_scheduler,
    spawn_worker,
    wait_until,
)

# Worker processes cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ADDRESS_LINE = r"listening at (\S+)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shoal_env(**extra: str) -> dict[str, str]:
    """This environment without any SHOAL_TOKEN, plus ``extra``; output unbuffered."""
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextmanager
def shoal_process(*args: str, env: dict[str, str] | None = None,
                  start_timeout: float = 30.0) -> Iterator[ShoalProcess]:  # fmt: skip
    """``shoal ARGS`` in a subprocess, yielded once it printed its address. Unlike
    `spawn_scheduler`, the test may kill it any way it likes; whatever still runs at the end
    is killed and reaped (a test that wants a clean exit calls `ShoalProcess.stop`)."""
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else shoal_env())  # fmt: skip
    process = ShoalProcess(proc, f"shoal {args[0]}")
    try:
        process.address = process.wait_for_line(ADDRESS_LINE, start_timeout).group(1)
        yield process
    finally:
        _kill_tree(process)


def _kill_tree(process: ShoalProcess) -> None:
    """SIGKILL a process and its children (a nanny's worker), and reap it."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


def whoami() -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.02)  # long enough that both workers get some
    return x * x


def wait_for_file(path: str) -> str:
    """A task that touches ``path.started``, then runs until ``path`` exists (at most 60 s)."""
    Path(path + ".started").touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


def worker_child_pids(client: shoal.Client) -> dict[str, int]:
    return dict(client.run(os.getpid))


# --------------------------------------------------------- reconnecting to a new scheduler


def test_a_worker_rejoins_a_scheduler_that_comes_back_on_the_same_port(tmp_path: Path) -> None:
    # (A scheduler stopped cleanly, by SIGTERM or SIGINT, tells its workers to close instead:
    # test_cli_processes.py checks that. Here the scheduler dies without a word.)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler_args = ("scheduler", "--port", str(port), "--no-dashboard", "--log-level", "warning")
    # given: a worker (under its nanny) joined to a scheduler on a fixed port
    with no_leaks(timeout=15), shoal_process(*scheduler_args) as first:
        assert first.address == address
        with shoal_process("worker", address, "--name", "comeback", "--death-timeout", "30",
                           "--no-dashboard", "--log-level", "warning") as worker:  # fmt: skip
            old_client = shoal.Client(address, timeout=10, set_as_default=False)
            try:
                old_client.wait_for_workers(1, timeout=20)
                before = worker_child_pids(old_client)
                release = str(tmp_path / "release")
                pending = old_client.submit(wait_for_file, release, pure=False)
                wait_until(lambda: os.path.exists(release + ".started"), timeout=20,
                           message="the task started")  # fmt: skip
                # when: the scheduler is killed ...
                first.kill()
                # then: the client's pending future fails, and new work is refused
                with pytest.raises(shoal.SchedulerGoneError):
                    pending.result(timeout=20)
                with pytest.raises(shoal.SchedulerGoneError):
                    old_client.submit(square, 2)
            finally:
                old_client.close()
            # (the task that was running when the scheduler died finishes meanwhile)
            Path(release).touch()
            # ... and a new, empty one starts on the same port
            with shoal_process(*scheduler_args) as second:
                assert second.address == address
                # then: the same worker process registers with it again
                with shoal.Client(address, timeout=10, set_as_default=False) as client:
                    client.wait_for_workers(1, timeout=30)
                    info = client.scheduler_info()["workers"]
                    assert [w["name"] for w in info.values()] == ["comeback"]
                    assert worker_child_pids(client) == before, "the worker was replaced"
                    # and runs new work
                    assert client.submit(square, 7).result(timeout=20) == 49
                    assert client.submit(whoami, pure=False).result(timeout=20) in set(
                        before.values())
                assert worker.proc.poll() is None
                worker.stop(signal.SIGTERM, timeout=15)
                second.stop(signal.SIGTERM, timeout=15)


def test_a_silent_worker_is_dropped_after_worker_ttl_and_its_work_moves() -> None:
    with no_leaks(timeout=15), \
            spawn_scheduler(extra_args=["--no-dashboard", "--worker-ttl", "3"]) as scheduler, \
            spawn_worker(scheduler.address, name="mute", extra_args=["--no-dashboard"]) as mute, \
            spawn_worker(scheduler.address, name="talker",
                         extra_args=["--no-dashboard"]):  # fmt: skip
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=20)
            by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            pids = worker_child_pids(client)
            # given: results spread over both workers, some held only by the one that will
            # go silent
            results = client.map(slow_square, range(20))
            shoal.wait(results, timeout=30)
            assert client.gather(results) == [x * x for x in range(20)]
            who_has = client.who_has(results)
            on_mute = [f for f in results if who_has[f.key] == [by_name["mute"]]]
            assert on_mute, f"no result landed on the worker that will go silent: {who_has}"
            # when: its process stops (alive, connected, silent)
            stopped = psutil.Process(pids[by_name["mute"]])
            stopped.suspend()
            try:
                # then: the scheduler drops it once --worker-ttl has passed ...
                wait_until(lambda: set(client.nthreads()) == {by_name["talker"]}, timeout=20,
                           message="the silent worker removed")  # fmt: skip
                # ... and its lost results are computed again on the other worker
                shoal.wait(results, timeout=30)
                assert client.gather(results) == [x * x for x in range(20)]
                wait_until(lambda: all(ws == [by_name["talker"]]
                                       for ws in client.who_has(on_mute).values()),
                           timeout=20, message="the lost results recomputed on talker")  # fmt: skip
                assert client.submit(square, 4).result(timeout=20) == 16
            finally:
                stopped.resume()
            # and once it wakes up it registers again
            wait_until(lambda: len(client.nthreads()) == 2, timeout=30,
                       message="the woken worker back")  # fmt: skip
        mute.stop(signal.SIGTERM, timeout=15)


# ---------------------------------------------------------------------- client.restart()


def test_restart_of_a_local_process_cluster_gives_new_worker_processes() -> None:
    with no_leaks(timeout=15), shoal.Client(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            set_as_default=False) as client:  # fmt: skip
        # given: two worker processes that hold a result
        held = client.submit(square, 3)
        assert held.result(timeout=20) == 9
        before = worker_child_pids(client)
        assert len(before) == 2 and os.getpid() not in before.values()

        # when
        assert client.restart(timeout=30) == 2

        # then: two workers are back, in new processes, and run new tasks
        after = worker_child_pids(client)
        assert len(after) == 2
        assert not set(after.values()) & set(before.values())
        assert all(_zombie(p) for p in before.values())
        # (results held before are gone)
        with pytest.raises(shoal.FutureLostError, match="restarted"):
            held.result(timeout=10)
        assert client.gather(client.map(square, range(10))) == [x * x for x in range(10)]


def test_restart_replaces_the_worker_processes_of_shoal_worker_nannies() -> None:
    quiet = ["--no-dashboard"]
    with no_leaks(timeout=15), spawn_scheduler(extra_args=quiet) as scheduler, \
            spawn_worker(scheduler.address, name="n1", extra_args=quiet) as n1, \
            spawn_worker(scheduler.address, name="n2", extra_args=quiet) as n2, \
            shoal.Client(scheduler.address, timeout=10,
                         set_as_default=False) as client:  # fmt: skip
        client.wait_for_workers(2, timeout=20)
        before = worker_child_pids(client)
        parents = {psutil.Process(p).ppid() for p in before.values()}
        assert parents == {n1.pid, n2.pid}

        assert client.restart(timeout=30) == 2

        # then: the nannies live on, each with a new worker child
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=20,
                   message="two workers registered after restart")  # fmt: skip
        after = worker_child_pids(client)
        assert len(after) == 2 and not set(after.values()) & set(before.values())
        assert {psutil.Process(p).ppid() for p in after.values()} == {n1.pid, n2.pid}
        names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
        assert names == ["n1", "n2"]
        assert client.submit(sum, client.map(square, range(5))).result(timeout=20) == 30


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------- SHOAL_TOKEN


def test_shoal_token_in_the_environment_guards_the_scheduler(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with no_leaks(timeout=15), shoal_process(
            "scheduler", "--port", "0", "--no-dashboard", "--log-level", "warning",
            env=shoal_env(SHOAL_TOKEN="abc")) as scheduler:  # fmt: skip
        address = scheduler.address
        # a client with no token is refused, naming why
        monkeypatch.delenv("SHOAL_TOKEN", raising=False)
        with pytest.raises(ConnectionError, match="invalid authentication token"):
            shoal.Client(address, timeout=5, set_as_default=False)
        # so is one with the wrong token in its environment
        monkeypatch.setenv("SHOAL_TOKEN", "abd")
        with pytest.raises(ConnectionError, match="invalid authentication token"):
            shoal.Client(address, timeout=5, set_as_default=False)

        # a worker whose environment has the wrong token cannot join
        refused = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "worker", address, "--connect-timeout", "5",
             "--no-dashboard"], env=shoal_env(SHOAL_TOKEN="wrong"), capture_output=True,
            text=True, timeout=60, check=False)  # fmt: skip
        assert refused.returncode != 0
        assert "invalid authentication token" in refused.stderr

        # a worker and a client with SHOAL_TOKEN=abc in their environment get in and work
        monkeypatch.setenv("SHOAL_TOKEN", "abc")
        with shoal_process("worker", address, "--no-dashboard", "--log-level", "warning",
                           env=shoal_env(SHOAL_TOKEN="abc")) as worker:  # fmt: skip
            with shoal.Client(address, timeout=10, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=20)
                assert client.submit(square, 12).result(timeout=20) == 144
            worker.stop(signal.SIGTERM, timeout=15)
        scheduler.stop(signal.SIGTERM, timeout=15)


# ------------------------------------------------------- --memory-limit, --memory-fractions


def ten_megabytes(i: int) -> bytes:
    return bytes([i % 256]) * 10_000_000


def test_memory_limit_is_reported_and_a_low_target_fraction_spills() -> None:
    with no_leaks(timeout=15), spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler, \
            spawn_worker(scheduler.address, name="small", extra_args=[
                "--no-dashboard", "--memory-limit", "1GB",
                # target: spill results beyond 250 MB; the other fractions off
                "--memory-fractions", "0.25,none,none,none"]) as worker:  # fmt: skip
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=20)
            (info,) = client.scheduler_info()["workers"].values()
            assert info["memory_limit"] == 1_000_000_000

            # when: 300 MB of results are held
            held = client.map(ten_megabytes, range(30))
            shoal.wait(held, timeout=60)

            # then: some went to disk (as heartbeats report it), and what stayed in memory
            # is within the target
            def spilled() -> int:
                (w,) = client.scheduler_info()["workers"].values()
                return int(w["spilled_bytes"])

            wait_until(lambda: spilled() >= 40_000_000, timeout=20,
                       message=lambda: f"40 MB spilled (spilled_bytes={spilled()})")  # fmt: skip
            (w,) = client.scheduler_info()["workers"].values()
            assert w["managed_bytes"] <= 260_000_000
            # and they come back when read
            for i, future in enumerate(held):
                value = future.result(timeout=30)
                assert len(value) == 10_000_000 and value[0] == i
            del value
        worker.stop(signal.SIGTERM, timeout=15)


def test_a_bad_memory_flag_is_a_usage_error() -> None:
    for flag, value in [("--memory-limit", "lots"), ("--memory-fractions", "0.6,x")]:
        done = subprocess.run([sys.executable, "-m", "shoal.cli", "worker", "tcp://127.0.0.1:1",
                               flag, value], capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert flag in done.stderr


# -------------------------------------------------------------------------- shoal demo


def test_shoal_demo_runs_to_completion() -> None:
    with no_leaks(timeout=15):
        done = subprocess.run([sys.executable, "-m", "shoal.cli", "demo", "--tasks", "200",
                               "--n-workers", "1"], capture_output=True, text=True, timeout=90,
                              env=shoal_env(COLUMNS="120"), check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Local cluster up" in out and "1 workers at tcp://127.0.0.1:" in out
    assert "Monte Carlo estimate of pi over 200 tasks" in out
    pi = float(out.split("pi ~ ", 1)[1].split()[0])
    assert 2.9 < pi < 3.4
    # load -> clean -> total: the numbers below 800 not divisible by 3
    assert f"total = {sum(r for r in range(800) if r % 3):,}" in out
    assert "result() raised ValueError: invalid literal for int()" in out
    assert "done in" in out


# --------------------------------------------------------- warnings turned into errors


def test_a_warning_filter_set_to_error_does_not_stall_the_client() -> None:
    with gen_cluster(n_workers=1) as client, warnings.catch_warnings():
        warnings.simplefilter("error")
        # given: a task no connected worker may run (the scheduler warns the client)
        stuck = client.submit(square, 5, workers=["tcp://127.0.0.1:1"])
        try:
            # then: the client still works
            assert client.submit(square, 6).result(timeout=10) == 36
        finally:
            stuck.cancel()
