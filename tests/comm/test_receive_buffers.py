"""Receive buffers of large parts are reused once released (`framing.allocate_part`): the
next large frame lands in memory that is already faulted in, and the pool stays bounded."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator

import pytest

from shoal.protocol import framing
from shoal.protocol.framing import MMAP_PART_BYTES, FrameReader, allocate_part, frame_prefix

SIZE = MMAP_PART_BYTES + 12_345


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    gc.collect()  # parts left by earlier tests recycle now, not in the middle of a test
    framing._pool.clear()
    yield
    framing._pool.clear()


def mapping_of(view: memoryview) -> int:
    """The address of the memory under ``view`` (its exporter is a ctypes holder)."""
    assert isinstance(view.obj, ctypes.Array)
    return ctypes.addressof(view.obj)


def receive(payload: bytes) -> memoryview:
    reader = FrameReader(1 << 40)
    (frame,) = reader.feed(frame_prefix([payload]) + payload)
    (part,) = frame
    return part


def test_a_released_part_buffer_is_reused_for_the_next_large_part() -> None:
    # given: a large part received, then released by everything that viewed it
    first = receive(b"\x01" * SIZE)
    view = first[100:200]  # a view of it keeps it alive
    used = mapping_of(first)
    del first
    gc.collect()
    assert len(framing._pool) == 0
    del view
    gc.collect()
    assert len(framing._pool) == 1

    # when: the next large part arrives
    second = receive(b"\x02" * SIZE)

    # then: it landed in the same mapping, with its own bytes only
    assert mapping_of(second) == used
    assert len(framing._pool) == 0
    assert second.nbytes == SIZE and bytes(second[:3]) == b"\x02\x02\x02"
    assert bytes(second[-3:]) == b"\x02\x02\x02"


def test_mid_sized_parts_are_pooled_and_small_ones_are_not() -> None:
    mid = allocate_part(framing.POOL_MIN_PART_BYTES)
    assert isinstance(mid.obj, ctypes.Array)
    small = allocate_part(framing.POOL_MIN_PART_BYTES - 1)
    assert isinstance(small.obj, bytearray)


def test_a_pooled_buffer_is_not_used_for_a_much_smaller_part() -> None:
    big = allocate_part(SIZE + SIZE // 2)
    del big
    gc.collect()
    small = allocate_part(SIZE)
    assert len(framing._pool) == 1  # kept for a part of its size
    assert small.nbytes == SIZE


def test_the_pool_is_bounded() -> None:
    views = [allocate_part(SIZE) for _ in range(10)]  # 10 x 34 MiB (in huge pages)
    del views
    gc.collect()
    assert len(framing._pool) == framing.POOL_BYTES // (34 * 2**20)
    huge = allocate_part(framing.POOL_PART_BYTES + 1)  # too big to pool: a plain mapping
    assert not isinstance(huge.obj, ctypes.Array)


def test_stale_buffers_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    view = allocate_part(SIZE)
    del view
    gc.collect()
    assert framing.trim_pool() == 1
    monkeypatch.setattr(framing, "POOL_MAX_AGE", -1.0)
    assert framing.trim_pool() == 0
