"""`shoal.testing`'s cluster helpers catch what they promise to: leaked threads, child
processes and listening ports, and a body that runs too long."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from shoal.testing import ClusterTimeoutError, gen_cluster, no_leaks, wait_until


def test_gen_cluster_yields_a_working_client_and_leaves_nothing() -> None:
    with gen_cluster(n_workers=1) as client:
        assert client.submit(lambda: 1).result(timeout=10) == 1
    assert client.status == "closed"


def test_gen_cluster_fails_on_a_leaked_thread() -> None:
    stop = threading.Event()
    try:
        with pytest.raises(AssertionError, match="threads.*'leaky-thread'"), \
                gen_cluster(n_workers=1, leak_timeout=0.2):  # fmt: skip
            threading.Thread(target=stop.wait, name="leaky-thread", daemon=True).start()
    finally:
        stop.set()


def test_no_leaks_fails_on_a_leaked_listening_port() -> None:
    sock = socket.socket()
    try:
        with pytest.raises(AssertionError, match="listening ports 127.0.0.1:"), \
                no_leaks(timeout=0.2):  # fmt: skip
            sock.bind(("127.0.0.1", 0))
            sock.listen()
    finally:
        sock.close()


def test_no_leaks_fails_on_a_leaked_child_process() -> None:
    proc = None
    try:
        with pytest.raises(AssertionError, match="child processes"), no_leaks(timeout=0.2):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def test_no_leaks_waits_for_things_that_are_shutting_down() -> None:
    with no_leaks(timeout=5):
        threading.Thread(target=time.sleep, args=(0.2,), name="short-lived").start()


def test_gen_cluster_fails_when_the_body_runs_over_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(ClusterTimeoutError, match="within 0.3s"), \
            gen_cluster(n_workers=1, timeout=0.3):  # fmt: skip
        threading.Event().wait(10)  # a blocked wait is interrupted
    assert time.monotonic() - start < 5


def test_wait_until_returns_the_value_or_fails_with_the_message() -> None:
    assert wait_until(lambda: 5, timeout=1) == 5
    with pytest.raises(AssertionError, match="never true did not hold within 0.05s"):
        wait_until(lambda: False, timeout=0.05, message="never true")


def test_gen_cluster_puts_back_an_outer_alarm() -> None:
    # given an outer SIGALRM timer and handler (pytest-timeout sets one like it)
    handler = signal.getsignal(signal.SIGALRM)
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    # when gen_cluster runs with a shorter limit of its own
    with gen_cluster(n_workers=1, timeout=5):
        pass
    # then the outer handler is back, and so is the outer timer if there was one
    assert signal.getsignal(signal.SIGALRM) is handler
    if outer:
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= outer
