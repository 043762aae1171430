"""Property-based tests of the journal: replaying a recorded event stream rebuilds the live
state, a compacted journal rebuilds its tasks, holds and data, and a torn or corrupt tail is
cut cleanly at the last whole record.

The event streams come from the scheduler's own property model
(tests/core/test_scheduler_state_properties.py): clients submit, want, release, cancel and
scatter; workers join, leave, finish, fail and send late reports. The model here journals
every event it feeds the state, and at the end replays the journal into a fresh state.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import run_state_machine_as_test

from shoal.core.scheduler_events import KeysWanted, SchedulerEvent, Tick, WorkerJoined
from shoal.core.scheduler_state import SchedulerState
from shoal.journal import JournalError, JournalVersionError, JournalWriter, describe, replay, scan
from shoal.journal.file import write_new
from shoal.journal.records import HEADER, MAGIC, SNAPSHOT, encode_record
from shoal.journal.replay import snapshot_events


def _load_model() -> Any:
    # Test directories are not packages: load the scheduler's model by its path.
    path = Path(__file__).parents[1] / "core" / "test_scheduler_state_properties.py"
    spec = importlib.util.spec_from_file_location("scheduler_properties_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_model = _load_model()


class JournaledModel(_model.SchedulerModel):  # type: ignore[misc]
    """The scheduler model, with every event it handles appended to a journal."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="shoal-journal-test-")
        self.path = Path(self.directory) / "journal"
        self.writer = JournalWriter(self.path)

    def handle(self, event: SchedulerEvent) -> None:
        self.writer.append(self.now + 1.0, [event])  # the model's handle adds 1 to now
        super().handle(event)

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:
                self.drain()
                self.check_settled()
                self.writer.flush()
                self.check_replay()
                self.check_snapshot()
        finally:
            self.writer.close()
            for name in os.listdir(self.directory):
                os.unlink(os.path.join(self.directory, name))
            os.rmdir(self.directory)

    def check_replay(self) -> None:
        replayed = SchedulerState(allowed_failures=2, validate=True)
        stats = replay(self.path, replayed)
        assert stats.cut_bytes == 0
        got, want = describe(replayed), describe(self.state)
        differ = {k: (got["tasks"].get(k), row) for k, row in want["tasks"].items()
                  if got["tasks"].get(k) != row}  # fmt: skip
        assert not differ, differ
        assert got == want

    def check_snapshot(self) -> None:
        """A compacted journal rebuilds every task, its dependencies, holds and holders;
        erred tasks (and what waits on them) are the documented exception: run again."""
        compacted = Path(self.directory) / "compacted"
        write_new(compacted, [encode_record(SNAPSHOT, self.now, snapshot_events(self.state),
                                            False)])  # fmt: skip
        rebuilt = SchedulerState(allowed_failures=2, validate=True)
        replay(compacted, rebuilt)
        live, new = describe(self.state), describe(rebuilt)
        erred = {k for k, row in live["tasks"].items() if row["state"] == "erred"}
        # Their dependents, and the inputs made again to recompute them.
        affected = set(erred)
        stack = list(erred)
        while stack:
            row = live["tasks"][stack.pop()]
            for k in row["dependencies"] + row["dependents"]:
                if k not in affected:
                    affected.add(k)
                    stack.append(k)
        extra = (set(new["tasks"]) - affected) ^ (set(live["tasks"]) - affected)
        assert not extra, {k: (new["tasks"].get(k), live["tasks"].get(k)) for k in extra}
        assert new["workers"] == live["workers"]
        for client, keys in live["clients"].items():
            assert [k for k in new["clients"].get(client, []) if k not in affected] == [
                k for k in keys if k not in affected], client
        # A task in memory may have lost the links to its inputs in the live state (an input
        # forgotten, then made anew); the snapshot links them again. Both are right: the links
        # of a task in memory only matter to recompute it, and then they are made again.
        for rows in (live["tasks"], new["tasks"]):
            done = {k for k, row in rows.items() if row["state"] == "memory"}
            for row in rows.values():
                row["dependents"] = [k for k in row["dependents"]
                                     if k not in affected and k not in done]  # fmt: skip
                if row["state"] == "memory":
                    del row["dependencies"]
        differ = {k: (new["tasks"].get(k), row) for k, row in live["tasks"].items()
                  if k not in affected and new["tasks"].get(k) != row}  # fmt: skip
        assert not differ, differ


SETTINGS = settings(_model.SETTINGS, max_examples=300)


def test_replay_rebuilds_the_live_state(tmp_path: Path) -> None:
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        run_state_machine_as_test(JournaledModel, settings=SETTINGS)
    finally:
        set_hypothesis_home_dir(None)


# ------------------------------------------------------------- torn and corrupt tails


def _write_journal(path: Path, n: int) -> list[int]:
    """``n`` records; returns the byte offset at which each record ends."""
    writer = JournalWriter(path)
    ends = []
    for i in range(n):
        writer.append(float(i), [KeysWanted(f"s{i}", "c", [f"k{i}"], [i]), Tick(f"t{i}")])
        writer.flush()
        ends.append(writer.size)
    writer.close()
    return ends


def test_a_torn_or_corrupt_tail_is_cut_at_the_last_whole_record(tmp_path: Path) -> None:
    set_hypothesis_home_dir(tmp_path / "hypothesis")  # not .hypothesis in the working directory
    try:
        _torn_or_corrupt_tail()
    finally:
        set_hypothesis_home_dir(None)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(n=st.integers(1, 6), cut=st.integers(1, 200), flip=st.booleans(), data=st.data())
def _torn_or_corrupt_tail(n: int, cut: int, flip: bool, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-journal-test-") as directory:
        path = Path(directory) / "journal"
        ends = _write_journal(path, n)
        raw = bytearray(path.read_bytes())
        if flip:  # a bad byte somewhere in the records: everything from its record goes
            at = data.draw(st.integers(HEADER.size, len(raw) - 1), label="flip at")
            raw[at] ^= 0xFF
            whole = [e for e in ends if e <= at]
        else:  # a torn write: the file ends in the middle of a record
            raw = raw[: max(HEADER.size, len(raw) - cut)]
            whole = [e for e in ends if e <= len(raw)]
        path.write_bytes(bytes(raw))
        result = scan(path)
        assert len(result.records) == len(whole)
        assert [r.now for r in result.records] == [float(i) for i in range(len(whole))]
        boundary = whole[-1] if whole else HEADER.size
        assert path.stat().st_size == boundary
        assert result.cut_bytes == len(raw) - boundary
        # What is left is a whole journal, and appending goes on after it.
        writer = JournalWriter(path)
        writer.append(99.0, [Tick("after")])
        writer.flush()
        writer.close()
        assert [r.now for r in scan(path).records][-1] == 99.0


def test_the_cut_is_logged_with_what_was_dropped(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal"
    ends = _write_journal(path, 3)
    with open(path, "r+b") as f:
        f.truncate(ends[-1] - 5)
    with caplog.at_level(logging.WARNING, logger="shoal.journal"):
        result = scan(path)
    assert len(result.records) == 2
    cut = ends[-1] - 5 - ends[1]
    assert f"cut {cut} bytes at byte {ends[1]}" in caplog.text
    assert "torn record" in caplog.text


def test_an_incompatible_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    _write_journal(path, 2)
    raw = bytearray(path.read_bytes())
    raw[len(MAGIC):HEADER.size] = (7).to_bytes(4, "big")
    path.write_bytes(bytes(raw))
    with pytest.raises(JournalVersionError, match="format version 7; this shoal reads version 1"):
        replay(path, SchedulerState())
    assert path.read_bytes() == bytes(raw)  # refused, not repaired


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b"hello, this is not a journal at all")
    with pytest.raises(JournalError, match="is not a shoal journal"):
        replay(path, SchedulerState())


def test_replay_after_a_restart_marker_accepts_held_results(tmp_path: Path) -> None:
    """After a restart, a worker that comes back with a result of a waiting task gives it."""
    from shoal.journal.records import RESTART
    from shoal.testing.core import make_spec

    path = tmp_path / "journal"
    writer = JournalWriter(path)
    from shoal.core.scheduler_events import TasksSubmitted

    writer.append(1.0, [TasksSubmitted("s", "c", [make_spec("a")], ["a"], [1])])
    writer.append(2.0, [], kind=RESTART, restored=True)
    writer.append(3.0, [WorkerJoined("j", "w1", 1, keys=["a"], nbytes=[8])], restored=True)
    writer.flush()
    writer.close()
    state = SchedulerState(validate=True)
    replay(path, state)
    assert state.restored
    assert state.tasks["a"].state == "memory"
    assert [w.address for w in state.tasks["a"].who_has] == ["w1"]
