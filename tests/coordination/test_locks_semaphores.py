"""Locks and semaphores across clients, tasks and processes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension
from shoal.exceptions import FutureLostError
from shoal.testing import gen_cluster, wait_until


def test_lock_excludes_a_second_client_until_released(
    client: shoal.Client, connect: Callable[[], shoal.Client], coordination: CoordinationExtension
) -> None:
    # given a lock held through one client
    other = connect()
    mine, theirs = shoal.Lock("l"), shoal.Lock("l", client=other)
    assert mine.acquire() and mine.locked()
    # when another client tries, then it times out (within about its timeout) or fails at once
    start = time.monotonic()
    assert theirs.acquire(timeout=0.2) is False
    assert 0.2 <= time.monotonic() - start < 0.2 + 10  # waited its timeout, and did not hang
    assert theirs.acquire(blocking=False) is False
    assert not theirs.locked()
    # when the holder releases, then a waiting acquire gets it
    got: list[bool] = []
    waiting = threading.Thread(target=lambda: got.append(theirs.acquire(timeout=10)))
    waiting.start()
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the acquire waits")
    mine.release()
    waiting.join(10)
    assert got == [True] and theirs.locked() and not mine.locked()
    theirs.release()
    with pytest.raises(ValueError, match="not held"):
        theirs.release()


def test_lock_context_manager_and_names_apart(client: shoal.Client) -> None:
    with shoal.Lock("a") as lock:
        assert lock.locked()
        assert shoal.Lock("b").acquire(blocking=False)  # another name is another lock
        assert shoal.Semaphore(name="a").acquire(timeout=0)  # and a semaphore is not a lock
    assert not lock.locked()
    assert shoal.Lock("a").acquire(timeout=1)


def _add_one_under_lock(path: str) -> int:
    """A task: read, pause, write, under a lock; without the lock updates would be lost."""
    with shoal.Lock("counter"):
        n = int(Path(path).read_text())
        time.sleep(0.002)
        Path(path).write_text(str(n + 1))
    return n


def test_tasks_increment_a_shared_file_under_a_lock(tmp_path: Path) -> None:
    # given 8 task threads on 2 workers and a counter file
    counter = tmp_path / "counter"
    counter.write_text("0")
    with gen_cluster(n_workers=2, threads_per_worker=4) as client:
        # when 40 tasks each add one under the same Lock
        seen = client.gather(client.map(_add_one_under_lock, [str(counter)] * 40, pure=False))
    # then no update was lost, and each task saw a different count
    assert counter.read_text() == "40"
    assert sorted(seen) == list(range(40))


def test_lock_passed_into_tasks_by_name(client: shoal.Client) -> None:
    lock = shoal.Lock()  # a made-up name, pickled into the task
    assert lock.acquire()
    future = client.submit(lambda lk: lk.acquire(timeout=0.1), lock, pure=False)
    assert future.result(timeout=10) is False
    lock.release()
    assert client.submit(lambda lk: lk.acquire(timeout=5), lock, pure=False).result(10) is True


def test_semaphore_counts_leases(client: shoal.Client) -> None:
    sem = shoal.Semaphore(max_leases=2, name="s")
    assert sem.acquire() and sem.acquire()
    assert sem.get_value() == 2
    assert sem.acquire(timeout=0.1) is False
    sem.release()
    assert sem.get_value() == 1
    with shoal.Semaphore(max_leases=2, name="s"):
        assert sem.get_value() == 2
    sem.release()
    assert sem.get_value() == 0
    with pytest.raises(RuntimeError, match="released more often"):
        sem.release()
    # every user of a name must agree on its max_leases
    assert sem.acquire()
    with pytest.raises(ValueError, match="in use with max_leases=2, not 3"):
        shoal.Semaphore(max_leases=3, name="s").acquire()
    sem.release()


def test_semaphore_lease_comes_back_when_its_client_closes(
    client: shoal.Client, connect: Callable[[], shoal.Client], coordination: CoordinationExtension
) -> None:
    # given a client holding the only lease, and another waiting for it without a timeout
    holder = connect()
    assert shoal.Semaphore(name="s", client=holder).acquire()
    waiter = shoal.Semaphore(name="s")
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire()))
    thread.start()
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the acquire waits")
    # when the holder closes, then the waiter is granted
    holder.close()
    thread.join(10)
    assert got == [True]
    waiter.release()


_HOLD_LEASE = """
import sys, time, shoal
client = shoal.Client(sys.argv[1])
assert shoal.Semaphore(name="s").acquire(timeout=10)
print("held", flush=True)
time.sleep(60)
"""


def test_semaphore_lease_comes_back_when_its_holder_is_killed(client: shoal.Client) -> None:
    # given a lease held by a client in another process
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, client.scheduler_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == "held", proc.stderr
        sem = shoal.Semaphore(name="s")
        assert sem.get_value() == 1
        assert sem.acquire(timeout=0.05) is False
        # when that process is killed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # then the lease comes back, and another client gets it
        wait_until(lambda: sem.get_value() == 0, timeout=10, message="the lease came back")
        assert sem.acquire(timeout=5)
        sem.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_waiting_forever_ends_when_the_client_closes(
    client: shoal.Client, connect: Callable[[], shoal.Client], coordination: CoordinationExtension
) -> None:
    # given a lock held elsewhere, and a client waiting for it with no timeout
    assert shoal.Lock("l").acquire()
    other = connect()
    errors: list[BaseException] = []

    def wait_for_lock() -> None:
        try:
            shoal.Lock("l", client=other).acquire()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            errors.append(exc)

    thread = threading.Thread(target=wait_for_lock)
    thread.start()
    wait_until(lambda: len(coordination.state.waiting) == 1, message="the acquire waits")
    # when that client closes, then the wait ends, and the scheduler forgets the waiter
    other.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], FutureLostError)
    wait_until(lambda: not coordination.state.waiting, message="the waiter is dropped")
    assert not coordination.timers
