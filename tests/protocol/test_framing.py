"""Wire framing: the prefix layout, incremental parsing in any chunking, and the limits."""

from __future__ import annotations

import random
import struct

import pytest

from shoal.protocol.codec import ProtocolError
from shoal.protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    DIRECT_READ_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_PARTS,
    MMAP_PART_BYTES,
    FrameReader,
    allocate,
    frame_prefix,
    max_frame_bytes,
)

LIMIT = 1 << 30


def frame(*parts: bytes) -> bytes:
    return frame_prefix(parts) + b"".join(parts)


def test_prefix_is_count_then_lengths_little_endian() -> None:
    prefix = frame_prefix([b"abc", memoryview(b"12345"), bytearray(0)])
    assert prefix == struct.pack("<IQQQ", 3, 3, 5, 0)


def test_prefix_refuses_empty_and_too_many_parts() -> None:
    with pytest.raises(ProtocolError):
        frame_prefix([])
    with pytest.raises(ProtocolError):
        frame_prefix([b""] * (MAX_PARTS + 1))


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "random"])
def test_frames_parse_the_same_in_any_chunking(chunking: str) -> None:
    rng = random.Random(42)
    big = bytes(rng.randrange(256) for _ in range(3 * DIRECT_READ_BYTES + 17))
    frames = [
        [b"body"],
        [b"", b"x"],  # an empty part
        [b"head", big, b"tail"],
        [big[:DIRECT_READ_BYTES]],  # exactly at the direct-read threshold
        [big[: DIRECT_READ_BYTES - 1]] * 5,  # just under it: copied out of the shared buffer
        [bytes(100)] * 50,
    ]
    if chunking == "bytewise":
        frames = frames[:3]  # keep it quick
    stream = b"".join(frame(*parts) for parts in frames)
    reader = FrameReader(LIMIT)
    got: list[list[memoryview]] = []
    if chunking == "whole":
        got = reader.feed(stream)
    else:
        pos = 0
        while pos < len(stream):
            n = 1 if chunking == "bytewise" else rng.randint(1, 200_000)
            got.extend(reader.feed(stream[pos : pos + n]))
            pos += n
    assert [[bytes(p) for p in f] for f in got] == frames
    assert not reader.mid_frame


def test_large_parts_get_their_own_writable_buffer_small_ones_are_copies() -> None:
    big = b"\x01" * (DIRECT_READ_BYTES + 1)
    reader = FrameReader(LIMIT)
    (parts,) = reader.feed(frame(b"small", big))
    small_part, big_part = parts
    assert small_part.readonly and bytes(small_part) == b"small"
    assert not big_part.readonly and big_part.nbytes == len(big)
    assert isinstance(big_part.obj, bytearray) and len(big_part.obj) == len(big)
    # The shared buffer is reused for the next frame; the parts we hold must not change.
    reader.feed(frame(b"XXXXX", b"\x02" * len(big)))
    assert bytes(small_part) == b"small" and bytes(big_part) == big


def test_large_part_arrives_directly_into_its_buffer() -> None:
    """After the prefix, ``get_buffer`` hands out the part's own memory."""
    size = 4 * DIRECT_READ_BYTES
    reader = FrameReader(LIMIT)
    assert reader.feed(frame_prefix([bytes(size)])) == []
    target = reader.get_buffer()
    assert target.nbytes == size  # exactly the part: no bytes of the next frame land there
    target[:] = b"\x07" * size
    (parts,) = reader.buffer_updated(size)
    assert parts[0].obj is target.obj


def test_very_large_parts_use_an_anonymous_mapping() -> None:
    view = allocate(MMAP_PART_BYTES)
    assert view.nbytes == MMAP_PART_BYTES and not view.readonly
    assert view[0] == 0 and view[-1] == 0
    view[-1] = 1  # writable, like a bytearray
    small = allocate(DIRECT_READ_BYTES)
    assert isinstance(small.obj, bytearray)


def test_oversized_frame_is_refused_from_its_prefix_alone() -> None:
    reader = FrameReader(HANDSHAKE_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(struct.pack("<IQ", 1, 2**40))  # no part bytes sent at all


def test_too_many_parts_are_refused_from_the_count_alone() -> None:
    reader = FrameReader(LIMIT)
    with pytest.raises(ProtocolError, match="parts"):
        reader.feed(struct.pack("<I", MAX_PARTS + 1))


def test_length_table_larger_than_the_limit_is_refused_from_the_count() -> None:
    reader = FrameReader(HANDSHAKE_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(struct.pack("<I", HANDSHAKE_MAX_FRAME_BYTES // 8))


def test_frame_with_no_parts_is_refused() -> None:
    with pytest.raises(ProtocolError, match="no parts"):
        FrameReader(LIMIT).feed(struct.pack("<I", 0))


def test_limit_counts_the_prefix_and_can_be_raised_after_the_handshake() -> None:
    body = bytes(HANDSHAKE_MAX_FRAME_BYTES - 12)  # prefix of 1 part is 12 bytes
    assert FrameReader(HANDSHAKE_MAX_FRAME_BYTES).feed(frame(body))
    with pytest.raises(ProtocolError):
        FrameReader(HANDSHAKE_MAX_FRAME_BYTES).feed(frame(body + b"!"))
    reader = FrameReader(HANDSHAKE_MAX_FRAME_BYTES)
    reader.max_frame_bytes = LIMIT
    assert reader.feed(frame(body + b"!"))


def test_first_frame_can_have_a_lower_limit() -> None:
    """The connecting side: the handshake answer is small, what follows it may be big."""
    small, big = frame(b"welcome"), frame(bytes(HANDSHAKE_MAX_FRAME_BYTES))
    reader = FrameReader(LIMIT, first_frame_max_bytes=HANDSHAKE_MAX_FRAME_BYTES)
    assert len(reader.feed(small + big)) == 2  # in one read
    reader = FrameReader(LIMIT, first_frame_max_bytes=HANDSHAKE_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(big[:12])


def test_mid_frame_tells_a_partial_frame() -> None:
    reader = FrameReader(LIMIT)
    data = frame(b"hello")
    reader.feed(data[:3])
    assert reader.mid_frame
    reader.feed(data[3:-1])
    assert reader.mid_frame
    reader.feed(data[-1:])
    assert not reader.mid_frame


def test_max_frame_bytes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_MAX_FRAME_BYTES", raising=False)
    assert max_frame_bytes() == DEFAULT_MAX_FRAME_BYTES == 8 * 1024**3
    monkeypatch.setenv("SHOAL_MAX_FRAME_BYTES", "1000000")
    assert max_frame_bytes() == 1_000_000
    for bad in ("lots", "-1", "0"):
        monkeypatch.setenv("SHOAL_MAX_FRAME_BYTES", bad)
        with pytest.raises(ValueError, match="SHOAL_MAX_FRAME_BYTES"):
            max_frame_bytes()
