"""Values in segments: put a `Serialized`'s buffers in a sealed segment, describe it as a
`SharedRef`, and rebuild a `Serialized` whose buffers are views of a mapping (no copy).

A `SharedValue` is one process's hold on one segment: its fd (kept so that the value can be
passed on to a third process without a copy), its mapping, and, on a worker, its export
at the worker's `Broker`. `close` lets all go; views already made keep the mapping alive
(the kernel frees the memory when the last fd and mapping are gone).
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

from ...protocol.messages import SharedRef
from ...protocol.serialize import Buffer, Serialized
from .segments import Segment, fd_budget, layout, _count, _MMAP_DUPS

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["SHM_MIN_BYTES", "SharedValue", "buffer_bytes", "share", "adopt"]

#: Values whose out-of-band buffers total less go through the socket: a segment, its fd
#: and a pull cost more than copying that much.
SHM_MIN_BYTES = 1 << 20


def buffer_bytes(ser: Serialized) -> int:
    """Bytes of ``ser``'s out-of-band buffers (what a segment would hold)."""
    return sum(memoryview(f).nbytes for f in ser.frames[1:])


def fds_needed() -> int:
    """Fds a held segment takes: ours, and mmap's own dup on Python < 3.13."""
    return 2 if _MMAP_DUPS else 1


class SharedValue:
    """A held segment with its value's layout (see the module's docstring)."""

    __slots__ = ("segment", "mapping", "header", "offsets", "lengths", "nbytes", "broker",
                 "seg_id", "token")  # fmt: skip

    def __init__(self, segment: Segment, header: bytes, offsets: list[int],
                 lengths: list[int], broker: Broker | None) -> None:  # fmt: skip
        self.segment = segment
        self.mapping: mmap.mmap | None = segment.map()
        if _MMAP_DUPS:
            _count(1)
        self.header = header
        self.offsets = offsets
        self.lengths = lengths
        self.nbytes = len(header) + sum(lengths)
        self.broker = broker
        self.seg_id, self.token = broker.export(segment) if broker is not None else (0, b"")

    def serialized(self) -> Serialized:
        """The value's frames: its header, then views of the mapping (no copy)."""
        assert self.mapping is not None, "closed"
        view = memoryview(self.mapping)
        return Serialized([self.header, *(view[o:o + n] for o, n in
                                          zip(self.offsets, self.lengths))])  # fmt: skip

    def ref(self) -> SharedRef:
        """How a peer on this host gets it (from our broker)."""
        assert self.broker is not None, "not exported"
        return SharedRef(self.header, self.seg_id, self.token, self.offsets, self.lengths,
                         self.nbytes)  # fmt: skip

    def close(self) -> None:
        """Stop exporting, close the fd, drop our reference to the mapping (views made
        from it keep it alive until they go)."""
        if self.broker is not None:
            self.broker.unexport(self.seg_id)
            self.broker = None
        if not self.segment.closed:
            self.segment.close()
            if _MMAP_DUPS:
                _count(-1)
        self.mapping = None

    def __repr__(self) -> str:
        return f"<SharedValue {self.nbytes} bytes, fd {self.segment.fd}>"


def share(ser: Serialized, name: str, broker: Broker | None) -> SharedValue:
    """Copy ``ser``'s out-of-band buffers into a new sealed segment (named after ``name``,
    as /proc/<pid>/fd shows it) and hold it."""
    lengths = [memoryview(f).nbytes for f in ser.frames[1:]]
    offsets, size = layout(lengths)
    segment = Segment.create(name, size)
    try:
        segment.fill(ser.frames[1:], offsets)
        segment.seal()
        return SharedValue(segment, bytes(ser.frames[0]), offsets, lengths, broker)
    except BaseException:
        segment.close()
        raise


def adopt(ref: SharedRef, fd: int, broker: Broker | None) -> SharedValue:
    """Hold a segment received as ``fd`` for ``ref`` (the fd becomes ours). The layout is
    checked against the segment's size: a bad ref raises ValueError, not a bad read."""
    segment = Segment.adopt(fd)
    try:
        if len(ref.offsets) != len(ref.lengths) or any(
                o < 0 or n < 0 or o + n > segment.size
                for o, n in zip(ref.offsets, ref.lengths)):  # fmt: skip
            raise ValueError("shared value does not fit its segment")
        return SharedValue(segment, ref.header, list(ref.offsets), list(ref.lengths), broker)
    except BaseException:
        segment.close()
        raise


def read_copy(ref: SharedRef, fd: int) -> Serialized:
    """``ref``'s value read out of segment ``fd`` into private buffers (a copy), for when it
    cannot be mapped (out of fds or address space); closes ``fd``."""
    try:
        size = os.fstat(fd).st_size
        frames: list[Buffer] = [ref.header]
        for off, n in zip(ref.offsets, ref.lengths):
            if off < 0 or n < 0 or off + n > size:
                raise ValueError("shared value does not fit its segment")
            buf = bytearray(n)
            view = memoryview(buf)
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:]], off + done)
                if not got:
                    raise OSError("segment is shorter than its ref")
                done += got
            frames.append(buf)
        return Serialized(frames)
    finally:
        os.close(fd)


def can_hold() -> bool:
    """Whether this process may hold one more segment (its fd budget)."""
    return fd_budget() >= fds_needed()
