"""`SpillBuffer`, the worker's store: LRU spilling past a byte target, byte accounting,
transparent read-back, files removed with their keys, and nothing left after `close`."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shoal.protocol.serialize import serialize
from shoal.worker.spill import Packed, Spilled, SpillBuffer, read_frames, write_frames
from shoal.testing import wait_until

KB = 1000


@pytest.fixture
def buf(tmp_path: Path) -> Iterator[SpillBuffer]:
    """A buffer that keeps at most 3 KB in memory, spilling to ``tmp_path``/spill; that
    directory is gone once it closes."""
    b = SpillBuffer(target=3 * KB, directory=str(tmp_path / "spill"), name="test")
    try:
        yield b
    finally:
        b.close()
    assert not (tmp_path / "spill").exists()


def blob(tag: int, size: int = KB) -> bytes:
    return bytes([tag]) * size


def settled(b: SpillBuffer) -> bool:
    """The spill thread has nothing left to do (the values in memory fit the limits)."""
    limit = min(x for x in (b.target, b.ceiling, float("inf")) if x is not None)
    return b.memory_bytes <= limit or b.spillable_bytes() == 0


def spill_files(b: SpillBuffer) -> list[str]:
    assert b.directory is not None
    return sorted(f for f in os.listdir(b.directory) if f.endswith(".spill"))


def test_least_recently_used_values_go_to_disk_first(buf: SpillBuffer) -> None:
    # given 3 KB in memory (a, b, c), the limit
    for i, key in enumerate("abc"):
        buf[key] = blob(i)
    assert buf.memory_bytes == 3 * KB and not buf.slow

    # when b is read (a is now the least recently used), then d and e arrive
    assert buf["b"] == blob(1)
    buf["d"] = blob(3)
    wait_until(lambda: set(buf.slow) == {"a"}, message="a spilled")
    buf["e"] = blob(4)

    # then a then c went to disk, the ones read or written last stay in memory
    wait_until(lambda: set(buf.slow) == {"a", "c"}, message="a and c spilled")
    assert list(buf.fast) == ["b", "d", "e"]
    buf.validate()


def test_bytes_are_counted_in_memory_and_on_disk(buf: SpillBuffer) -> None:
    # given 5 values of 1 KB with a 3 KB target
    for i in range(5):
        buf[f"k{i}"] = blob(i)
    wait_until(lambda: settled(buf), message="spilling settles")

    # then 3 KB stay in memory, 2 are on disk (their frames plus a small header)
    assert buf.memory_bytes == 3 * KB
    assert len(buf.slow) == 2 and 2 * KB < buf.spilled_bytes < 2 * KB + 200
    assert buf.spilled_bytes == sum(os.path.getsize(e.path) for e in buf.slow.values())
    assert len(buf) == 5 and set(buf) == {f"k{i}" for i in range(5)}
    assert buf.spill_count == 2 and buf.spilled_bytes_total == buf.spilled_bytes
    buf.validate()

    # when a value is replaced by a smaller one, then the count follows
    buf["k4"] = b"x" * 10
    assert buf.memory_bytes == 2 * KB + 10
    buf.validate()


def test_reading_a_spilled_key_loads_it_back_and_counts_it_in_memory_again(
    buf: SpillBuffer,
) -> None:
    # given a NumPy array spilled to disk
    array = np.arange(1000, dtype="float64")  # 8 KB: more than the target, spilled first
    buf["x"] = array
    wait_until(lambda: "x" in buf.slow, message="x spilled")
    path = buf.slow["x"].path
    assert buf.memory_bytes == 0 and os.path.exists(path)

    # when it is read
    value = buf["x"]

    # then it is the same array, writable, back in memory, and its file is gone
    assert np.array_equal(value, array) and value.flags.writeable
    assert buf.unspill_count == 1 and not os.path.exists(path)
    buf.validate()
    # (over the target again, so it goes back out)
    wait_until(lambda: "x" in buf.slow, message="x spilled again")
    assert np.array_equal(buf["x"], array)


def test_deleting_a_spilled_key_removes_its_file_without_reading_it(buf: SpillBuffer) -> None:
    # given keys on disk
    for i in range(6):
        buf[f"k{i}"] = blob(i)
    wait_until(lambda: len(buf.slow) == 3, message="three spilled")
    assert len(spill_files(buf)) == 3

    # when they are deleted (del, discard, then clear)
    del buf["k0"]
    buf.discard("k1")
    buf.discard("not-there")
    with pytest.raises(KeyError):
        del buf["not-there"]

    # then their files go, and nothing was read back
    assert len(spill_files(buf)) == 1 and buf.unspill_count == 0
    buf.clear()
    assert spill_files(buf) == [] and len(buf) == 0
    assert buf.memory_bytes == 0 and buf.spilled_bytes == 0
    buf.validate()


def test_packed_values_are_written_as_the_frames_they_came_in(buf: SpillBuffer) -> None:
    # given data received from a peer (still pickled) that is spilled
    array = np.ones(20_000)  # 160 KB: sent with an out-of-band frame
    ser = serialize(array)
    assert len(ser.frames) == 2
    buf["p"] = Packed(ser)
    wait_until(lambda: "p" in buf.slow, message="p spilled")

    # then its file holds exactly those frames
    assert [bytes(f) for f in read_frames(buf.slow["p"].path)] == [bytes(f) for f in ser.frames]
    # and a peer gets them back as they are, without them coming back into memory
    peeked = buf.peek("p")
    assert isinstance(peeked, Packed) and peeked.ser == ser and "p" in buf.slow
    # and a local reader gets the array itself
    assert np.array_equal(buf["p"], array)


def test_a_held_spilled_value_stays_readable_after_its_key_is_deleted(buf: SpillBuffer) -> None:
    # given a spilled value handed to a task thread, then deleted from the store
    buf["x"] = blob(7, 5 * KB)
    wait_until(lambda: "x" in buf.slow, message="x spilled")
    held = buf.hold(["x", "missing"])
    assert list(held) == ["x"] and isinstance(held["x"], Spilled)
    del buf["x"]
    assert len(spill_files(buf)) == 1  # kept for the holder

    # when the task thread loads it, then it gets the value, and the file goes afterwards
    value = held["x"].load()
    assert value == blob(7, 5 * KB)
    buf.loaded("x", held["x"], value)
    assert spill_files(buf) == [] and "x" not in buf


def test_a_held_spilled_value_loaded_by_a_task_comes_back_into_memory_if_it_fits(
    buf: SpillBuffer,
) -> None:
    # given two spilled values held by a task (1 KB fits under the target, 4 KB does not),
    # and a Packed value (still pickled, as received) held too
    buf["small"] = blob(1, KB)
    buf["big"] = blob(2, 4 * KB)
    buf["x"] = blob(3, 1500)
    buf["y"] = blob(4, KB)
    wait_until(lambda: set(buf.slow) == {"small", "big"}, message="small and big spilled")
    buf["p"] = Packed(serialize(b"abc"))
    del buf["y"]
    held = buf.hold(["small", "big", "p"])

    # when the task loads them
    values = {key: lazy.load() for key, lazy in held.items()}
    for key, lazy in held.items():
        buf.loaded(key, lazy, values[key])

    # then the store keeps what fits in memory in place of what was held: the small one
    # back from disk, the unpickled Packed value; the big one stays on disk
    assert values["big"] == blob(2, 4 * KB) and values["p"] == b"abc"
    assert set(buf.fast) == {"x", "small", "p"} and set(buf.slow) == {"big"}
    assert buf.fast["p"] == b"abc" and buf.unspill_count == 1
    buf.validate()


def test_a_value_that_cannot_be_pickled_stays_in_memory(buf: SpillBuffer) -> None:
    # given an unpicklable value, oldest in the store, then more values than fit
    buf["lock"] = threading.Lock()
    for i in range(5):
        buf[f"k{i}"] = blob(i)

    # then the others are spilled around it
    wait_until(lambda: settled(buf), message="spilling settles")
    assert "lock" in buf.fast and len(buf.slow) >= 2
    buf.validate()


def test_a_ceiling_spills_below_the_target_until_lifted(tmp_path: Path) -> None:
    # given a buffer with no target (the memory monitor alone decides) and 5 KB in it
    b = SpillBuffer(target=None, directory=str(tmp_path / "spill"), name="ceiling")
    try:
        for i in range(5):
            b[f"k{i}"] = blob(i)
        assert not b.slow

        # when the monitor asks for at most 2 KB in memory
        b.ceiling = 2 * KB

        # then the 3 oldest go to disk
        wait_until(lambda: set(b.slow) == {"k0", "k1", "k2"}, message="three spilled")

        # and once lifted, new values stay in memory
        b.ceiling = None
        b["k5"] = blob(5)
        assert "k5" in b.fast and b.memory_bytes == 3 * KB
    finally:
        b.close()


def test_close_removes_its_own_temporary_directory_and_stops_its_thread() -> None:
    # given a buffer with no directory of its own choosing, that spilled
    threads_before = set(threading.enumerate())
    b = SpillBuffer(target=KB, name="own-dir")
    b["a"] = blob(1)
    b["b"] = blob(2)
    wait_until(lambda: "a" in b.slow, message="a spilled")
    directory = b.directory
    assert directory is not None and os.path.isdir(directory)

    # when it closes, then the directory and the spill thread are gone
    b.close()
    assert not os.path.exists(directory)
    assert set(threading.enumerate()) <= threads_before


def test_frames_round_trip_through_a_file(tmp_path: Path) -> None:
    frames = [b"header", memoryview(np.arange(10, dtype="int32")), bytearray(b"")]
    path = str(tmp_path / "f.spill")
    assert write_frames(path, frames) == os.path.getsize(path)
    assert [bytes(f) for f in read_frames(path)] == [bytes(f) for f in frames]
