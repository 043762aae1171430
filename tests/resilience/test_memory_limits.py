"""Memory limits and fractions as the user writes them, and the memory monitor's
decisions from RSS readings (pure: no process is measured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.worker.memory import (
    MemoryFractions,
    MemoryMonitor,
    WorkerMemory,
    format_bytes,
    parse_bytes,
    parse_memory_limit,
    system_memory,
)
from shoal.worker.spill import SpillBuffer

MB = 10**6


@pytest.mark.parametrize(("text", "expected"), [
    ("4GB", 4 * 10**9), ("4 gb", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5k", 1500),
    ("1e9", 10**9), ("100", 100), ("2TB", 2 * 10**12), ("3 KiB", 3 * 1024),
])  # fmt: skip
def test_sizes_are_read_with_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "4 apples", "-3MB"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_memory_limits_default_to_a_share_of_the_machine() -> None:
    total = system_memory()
    assert parse_memory_limit(None) == total
    assert parse_memory_limit("auto", n_workers=4) == total // 4
    assert parse_memory_limit("0.5") == int(total * 0.5)
    assert parse_memory_limit("200MB") == 200 * MB
    assert parse_memory_limit(123_456_789) == 123_456_789
    assert parse_memory_limit(0) == parse_memory_limit("0") == parse_memory_limit("none") == 0
    # more than the machine has is lowered to what it has
    assert parse_memory_limit(total * 10) == total
    with pytest.raises(ValueError):
        parse_memory_limit("-1")


def test_fractions_parse_with_defaults_and_can_be_turned_off() -> None:
    assert MemoryFractions.parse("0.6,0.7,0.8,0.95") == MemoryFractions()
    assert MemoryFractions.parse("0.5") == MemoryFractions(target=0.5)
    assert MemoryFractions.parse("none,0.7,off,,0.2") == MemoryFractions(
        target=None, pause=None, terminate=None, transfer=0.2)
    fractions = MemoryFractions(target=0.4, spill=None)
    assert MemoryFractions.parse(str(fractions)) == fractions
    for bad in ("0.6,x", "1,2,3,4,5,6", "0.6,-1"):
        with pytest.raises(ValueError):
            MemoryFractions.parse(bad)


def test_sizes_are_shown_in_binary_units() -> None:
    assert format_bytes(200 * 2**20) == "200.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert format_bytes(12) == "12 B"


# ----------------------------------------------------------------- the monitor


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SpillBuffer]:
    b = SpillBuffer(target=60 * MB, directory=str(tmp_path), name="monitor")
    try:
        yield b
    finally:
        b.close()


def monitor_of(store: SpillBuffer) -> MemoryMonitor:
    """A monitor of a 100 MB worker with the default fractions, that never trims."""
    m = MemoryMonitor(store, 100 * MB, MemoryFractions())
    m.trim = lambda: None
    return m


def test_the_store_may_fill_until_the_process_would_reach_the_spill_fraction(
    store: SpillBuffer,
) -> None:
    # given a process of 30 MB of which the store holds 10 MB (20 MB held elsewhere)
    store["a"] = b"x" * (10 * MB)
    m = monitor_of(store)
    m.check(30 * MB)
    # then the store may hold up to 70 - 20 = 50 MB: below its own 60 MB target
    assert store.ceiling == 50 * MB and not m.spilling and not m.paused


def test_past_the_spill_fraction_the_store_spills_down_to_the_target(store: SpillBuffer) -> None:
    m = monitor_of(store)
    # when the RSS passes 70 MB with 20 MB in the store (55 MB elsewhere)
    store["a"] = b"x" * (20 * MB)
    m.check(75 * MB)
    # then the store must go down to 60 - 55 = 5 MB
    assert m.spilling and store.ceiling == 5 * MB
    # and keeps spilling while the RSS is between the target and the spill fraction
    m.check(65 * MB)
    assert m.spilling
    # until the RSS is back under the target: then it may fill up to the spill fraction again
    m.check(58 * MB)
    assert not m.spilling and store.ceiling == (70 - 58) * MB + store.memory_bytes


def test_the_monitor_wants_a_pause_above_the_pause_fraction_and_a_resume_below(
    store: SpillBuffer,
) -> None:
    m = monitor_of(store)
    m.check(79 * MB)
    assert not m.paused
    m.check(81 * MB)
    assert m.paused
    m.check(79 * MB)
    assert not m.paused


def test_fractions_turned_off_do_nothing(store: SpillBuffer) -> None:
    m = MemoryMonitor(store, 100 * MB, MemoryFractions(spill=None, pause=None))
    m.check(99 * MB)
    assert store.ceiling is None and not m.paused


# ------------------------------------------------------ acting before allocating


def test_reservations_lower_the_ceiling_and_count_toward_the_pause(store: SpillBuffer) -> None:
    # given a 100 MB worker whose process takes 30 MB, 10 MB of it in the store
    store["a"] = b"x" * (10 * MB)
    m = monitor_of(store)
    m.check(30 * MB)
    assert store.ceiling == 50 * MB  # 70 - 20 held elsewhere

    # when a task reserves 20 MB: the store must make room for it under the target (60 MB)
    m.change_reserved(20 * MB, 30 * MB)
    assert store.ceiling == (60 - 20 - 20) * MB and not m.paused

    # when 40 MB more are reserved: 30 + 60 projected is over the pause fraction (80 MB)
    m.change_reserved(40 * MB, 30 * MB)
    assert m.paused
    # and once they are given back, the worker may resume, the store fill up again
    m.change_reserved(-60 * MB, 30 * MB)
    assert not m.paused and store.ceiling == 50 * MB


def test_a_task_waits_for_the_store_to_spill_before_it_allocates(tmp_path: Path) -> None:
    # given a 100 MB worker: 20 MB outside the store, 40 MB of results in it
    memory = WorkerMemory("w", 100 * MB, MemoryFractions(), str(tmp_path))
    memory.read_rss = lambda: 20 * MB + memory.data.memory_bytes  # type: ignore[method-assign]
    try:
        for i in range(4):
            memory.data[f"x-{i}"] = b"x" * (10 * MB)
        assert memory.data.memory_bytes == 40 * MB

        # when a task reserves 20 MB: projected 80 MB, over the 60 MB line
        reserved = memory.reserve(20 * MB, timeout=10)

        # then it returns once the store spilled enough: 20 + 20 + 20 fits under 60 MB
        assert reserved == 20 * MB
        assert memory.data.memory_bytes <= 20 * MB and memory.data.spilled_bytes >= 20 * MB
        assert memory.monitor is not None and memory.monitor.reserved == 20 * MB
        memory.release(reserved)
        assert memory.monitor.reserved == 0
    finally:
        memory.close()


def test_without_spilling_a_reservation_does_not_wait(tmp_path: Path) -> None:
    # given a worker that never spills (no target, no spill fraction), over its line
    fractions = MemoryFractions(target=None, spill=None, pause=0.3, terminate=None)
    memory = WorkerMemory("w", 100 * MB, fractions, str(tmp_path))
    memory.read_rss = lambda: 90 * MB  # type: ignore[method-assign]
    try:
        memory.data["x"] = b"x" * MB
        # then a reservation is counted (it pauses the worker) but does not wait
        assert memory.reserve(10 * MB, timeout=30) == 10 * MB
        assert memory.monitor is not None and memory.monitor.paused
        memory.release(10 * MB)
    finally:
        memory.close()
