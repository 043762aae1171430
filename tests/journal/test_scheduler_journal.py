"""The scheduler with a journal, in this process (its state readable): compaction on a live
scheduler, a restart on a compacted journal, the grace period for clients that do not come
back, a client that gives up past its reconnect limit, and the CLI's refusals."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from shoal.exceptions import SchedulerGoneError
from shoal.journal import scan
from shoal.journal.records import HEADER, SNAPSHOT
from shoal.scheduler import Scheduler
from shoal.testing import no_leaks, wait_until
from shoal.utils.loop import LoopThread
from shoal.worker.server import Worker


def inc(x: int) -> int:
    return x + 1


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with no_leaks(timeout=15):
        thread = LoopThread(name="test-journal-loop")
        try:
            yield thread
        finally:
            thread.stop()


def _start(loop: LoopThread, path: Path, port: int = 0, grace: float = 30.0) -> Scheduler:
    return loop.run(Scheduler(port=port, journal=path, restart_grace=grace).start(), 20)


def test_a_live_scheduler_compacts_and_restarts_on_the_compacted_journal(
        loop: LoopThread, tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "journal"
    s = _start(loop, path)
    assert s.journal is not None
    s.journal.min_compact_bytes = 0  # compact as soon as the file is 1.5x the live size
    s.journal.compact_factor = 1.5
    worker = loop.run(Worker(s.address, nthreads=2, in_process=True).start(), 20)
    try:
        with shoal.Client(s.address, reconnect_timeout=30, set_as_default=False) as client:
            futures = client.map(inc, range(200))
            assert client.gather(futures) == list(range(1, 201))
            for _ in range(3):  # churn: the history grows, the live state does not
                extra = client.map(inc, range(1000, 1100))
                client.gather(extra)
                del extra
            wait_until(lambda: s.journal is not None and s.journal.compactions >= 1,
                       timeout=20, message="a compaction")  # fmt: skip
            held = {f.key for f in futures}
            client_name = next(iter(s.state.clients))
            port = int(s.address.rsplit(":", 1)[1])
            loop.run(s.close(), 20)
            # The compacted journal starts with a snapshot; events follow it.
            records = scan(path, repair=False).records
            assert records[0].kind == SNAPSHOT
            s = _start(loop, path, port=port)
            # Restored: the client's holds (under its old name until the grace ends), each
            # task with its recipe; the worker is gone until it registers again (it is
            # retrying), then its results are kept rather than computed again.
            assert s.replayed_clients == {client_name}
            assert held <= {ts.key for ts in loop.run(_held_by(s, client_name), 5)}
            wait_until(lambda: len(s.state.workers) == 1, timeout=30,
                       message="the worker to come back")  # fmt: skip
            assert client.gather(futures) == list(range(1, 201))
    finally:
        loop.run(worker.close(), 20)
        loop.run(s.close(), 20)


def test_clients_that_do_not_come_back_within_the_grace_lose_their_holds(
        loop: LoopThread, tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "journal"
    s = _start(loop, path)
    worker = loop.run(Worker(s.address, nthreads=1, in_process=True).start(), 20)
    client = shoal.Client(s.address, set_as_default=False)
    try:
        futures = client.map(inc, range(10))
        client.gather(futures)
        port = int(s.address.rsplit(":", 1)[1])
        loop.run(s.close(), 20)
    finally:
        client.close()  # it does not reconnect (reconnect_timeout=0): it is gone
    s = _start(loop, path, port=port, grace=0.3)
    try:
        assert len(s.replayed_clients) == 1
        assert all(ts.who_wants for ts in s.state.tasks.values())
        wait_until(lambda: loop.run(_no_tasks(s), 5), timeout=10,
                   message="the holds of the client that did not come back to end")
        assert not s.replayed_clients
    finally:
        loop.run(worker.close(), 20)
        loop.run(s.close(), 20)


async def _held_by(s: Scheduler, client: str) -> set[object]:
    return {ts for ts in s.state.clients.get(client, set())}


async def _no_tasks(s: Scheduler) -> bool:
    return not s.state.tasks and not s.state.clients


def test_a_client_fails_its_futures_only_past_its_reconnect_limit(
        loop: LoopThread, tmp_path: Path) -> None:  # fmt: skip
    s = _start(loop, tmp_path / "journal")
    with shoal.Client(s.address, reconnect_timeout=1.0, set_as_default=False) as client:
        future = client.submit(inc, 1)  # no worker: it stays pending
        loop.run(s.close(), 20)
        started = time.monotonic()
        with pytest.raises(SchedulerGoneError, match="did not come back within"
                                                     " reconnect_timeout=1.0s"):
            future.result(timeout=30)
        waited = time.monotonic() - started
        assert 0.8 <= waited < 10, waited


def _cli_scheduler(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "scheduler", "--port", "0",
                           "--no-dashboard", "--journal", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_cli_refuses_a_journal_of_another_version(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(HEADER.pack(b"SHOALJNL", 99))
    done = _cli_scheduler(path)
    assert done.returncode != 0
    assert "format version 99; this shoal reads version 1" in done.stderr


def test_the_cli_refuses_a_file_that_is_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_text("precious data, not a journal\n")
    done = _cli_scheduler(path)
    assert done.returncode != 0 and "is not a shoal journal" in done.stderr
    assert path.read_text() == "precious data, not a journal\n"


def test_the_cli_cuts_a_torn_tail_says_so_and_serves(tmp_path: Path) -> None:
    from shoal.core.scheduler_events import KeysWanted
    from shoal.journal import JournalWriter
    from shoal.testing import spawn_scheduler

    path = tmp_path / "journal"
    writer = JournalWriter(path)
    writer.append(1.0, [KeysWanted("w", "old-client-1", [])])
    writer.flush()
    whole = writer.size
    writer.append(2.0, [KeysWanted("w", "old-client-2", [])])
    writer.flush()
    writer.close()
    with open(path, "r+b") as f:
        f.truncate(writer.size - 3)  # the kill came in the middle of the last write
    with no_leaks(timeout=15), spawn_scheduler(extra_args=["--journal", str(path),
                                                           "--no-dashboard"]) as scheduler:
        line = wait_until(lambda: next((x for x in scheduler.stderr if "cut" in x), None),
                          timeout=10, message="the log line about the cut")  # fmt: skip
        assert f"cut {writer.size - 3 - whole} bytes at byte {whole}" in line
        with shoal.Client(scheduler.address, set_as_default=False) as client:
            assert client.nthreads() == {}  # it answers (no worker yet)
    assert scan(path, repair=False).cut_bytes == 0
