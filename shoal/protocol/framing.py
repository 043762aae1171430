"""Wire framing: how a frame's parts (see `codec`) travel on a byte stream.

A frame is ``u32 nparts`` + ``nparts x u64 part lengths`` (little endian), then the parts'
bytes back to back. The sizes come first so that a reader

- can refuse a frame that is too big from its prefix alone, before allocating anything;
- can read each large part straight into a buffer of its own (the kernel copies into its
  final place, we never copy or join it), while small parts are sliced out of one shared,
  reused read buffer.

`FrameReader` is the incremental parser; it fits an asyncio ``BufferedProtocol``:
``get_buffer`` says where the next bytes should land, ``buffer_updated`` parses them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
import weakref
from collections import deque
from collections.abc import Sequence

from .codec import ProtocolError
from .serialize import Buffer

#: Most parts one frame may have (a body plus out-of-band buffers).
MAX_PARTS = 100_000
#: Frame size limit before the handshake has passed: a Hello is tiny, nothing else may come.
HANDSHAKE_MAX_FRAME_BYTES = 64 * 1024
#: Frame size limit after the handshake, unless ``SHOAL_MAX_FRAME_BYTES`` says otherwise.
DEFAULT_MAX_FRAME_BYTES = 8 * 1024**3
#: Parts (and length tables) at least this big are read straight into their own buffer.
DIRECT_READ_BYTES = 16 * 1024
#: Size of the shared buffer small parts are read into, one per connection (so not big:
#: a scheduler has thousands). At least twice `DIRECT_READ_BYTES`, so that compacting it
#: always leaves room for a whole small item.
READ_BUFFER_BYTES = 64 * 1024

#: Parts at least this big get a fresh anonymous mapping instead of a ``bytearray``: glibc
#: maps allocations this big afresh anyway (its largest mmap threshold), the kernel zeroes
#: the pages, ``bytearray`` zeroes them a second time, and with transparent huge pages they
#: fault 512x less often. Allocating 100 MiB this way takes 11 ms instead of 42.
MMAP_PART_BYTES = 32 * 1024 * 1024

#: Receive buffers of large parts are kept for reuse once nothing refers to them: a fresh
#: mapping's pages fault in (the kernel zeroes them) as the bytes arrive, and on a VM whose
#: host takes back free memory that costs ~3 ms per MB: 0.3 s for 100 MB, 10x the transfer.
#: Parts from `POOL_MIN_PART_BYTES` to `POOL_PART_BYTES` are pooled, at most `POOL_BYTES`
#: in all, each for at most `POOL_MAX_AGE` s (checked at the next large allocation, or by
#: `trim_pool`).
POOL_MIN_PART_BYTES = 4 * 1024 * 1024
POOL_PART_BYTES = 128 * 1024 * 1024
POOL_BYTES = 256 * 1024 * 1024
POOL_MAX_AGE = 30.0

_HUGE_PAGE = 2 * 1024 * 1024
_COUNT = struct.Struct("<I")
_MAP_PRIVATE_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def max_frame_bytes() -> int:
    """The post-handshake frame size limit: ``SHOAL_MAX_FRAME_BYTES`` or 8 GiB."""
    value = os.environ.get("SHOAL_MAX_FRAME_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_FRAME_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"SHOAL_MAX_FRAME_BYTES must be a positive integer, got {value!r}")
    return limit


def frame_prefix(parts: Sequence[Buffer]) -> bytes:
    """The prefix to send before ``parts``: write ``[prefix, *parts]`` without joining them."""
    if not 0 < len(parts) <= MAX_PARTS:
        raise ProtocolError(f"a frame must have 1 to {MAX_PARTS} parts, not {len(parts)}")
    lengths = [memoryview(p).nbytes for p in parts]
    return struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths)


def allocate(nbytes: int) -> memoryview:
    """A writable, zeroed buffer for one large part (see `MMAP_PART_BYTES`)."""
    if nbytes >= MMAP_PART_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
        return memoryview(_new_mapping(nbytes))
    return memoryview(bytearray(nbytes))


def _new_mapping(nbytes: int) -> mmap.mmap:
    mapping = mmap.mmap(-1, nbytes, flags=_MAP_PRIVATE_ANONYMOUS)
    if _MADV_HUGEPAGE is not None:
        try:
            mapping.madvise(_MADV_HUGEPAGE)
        except OSError:  # huge pages disabled: small pages still work
            pass
    return mapping


# Free buffers, newest last, as (when freed, mapping). Appended by finalizers (deque
# operations are atomic: no lock), taken by `allocate_part` on the reading thread.
_pool: deque[tuple[float, mmap.mmap]] = deque()


def _recycle(mapping: mmap.mmap) -> None:
    """Runs when the last view of a part's buffer goes: keep its mapping for the next."""
    try:
        held = sum(len(m) for _, m in _pool)
    except RuntimeError:  # another thread changed the pool meanwhile: let this one go
        return
    if held + len(mapping) <= POOL_BYTES:
        _pool.append((time.monotonic(), mapping))
    # else dropped: unmapped when the last reference (this call's) goes


def _take(nbytes: int) -> mmap.mmap | None:
    """A pooled mapping of ``nbytes`` to 5/4 of it, if any; drops the stale ones."""
    entries = []
    while _pool:  # drain first: finalizers may append meanwhile
        try:
            entries.append(_pool.popleft())
        except IndexError:
            break
    found = None
    now = time.monotonic()
    for freed, mapping in entries:
        if found is None and nbytes <= len(mapping) <= nbytes + nbytes // 4:
            found = mapping
        elif now - freed < POOL_MAX_AGE:
            _pool.append((freed, mapping))
    return found


def trim_pool() -> int:
    """Unmap pooled receive buffers unused for `POOL_MAX_AGE` s; returns how many stay."""
    _take(-1)  # matches nothing: only drops the stale ones
    return len(_pool)


def allocate_part(nbytes: int) -> memoryview:
    """A writable buffer for one large part whose every byte the caller will overwrite
    (its contents are undefined): a pooled one when one fits, else a fresh mapping as
    `allocate` makes. The buffer goes back to the pool when its last view goes."""
    if not POOL_MIN_PART_BYTES <= nbytes <= POOL_PART_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return allocate(nbytes)
    mapping = _take(nbytes)
    if mapping is None:  # sized in huge pages: few sizes, so few ctypes array types (cached)
        mapping = _new_mapping(-(-nbytes // _HUGE_PAGE) * _HUGE_PAGE)
    # The views handed out refer to this holder (their exporter), so it lives exactly as
    # long as the last of them, and its finalizer then recycles the mapping.
    holder = (ctypes.c_char * len(mapping)).from_buffer(mapping)
    weakref.finalize(holder, _recycle, mapping).atexit = False  # nothing to do at exit
    return memoryview(holder).cast("B")[:nbytes]


class FrameReader:
    """Incremental frame parser.

    Call ``get_buffer()``, write received bytes at its start, then call
    ``buffer_updated(nbytes)``, which returns the frames completed by those bytes (each a
    list of parts). Large parts are memoryviews over their own writable buffer (see
    `allocate_part`: reused once released); small ones are read-only copies, so a part
    never changes once returned.

    Raises `ProtocolError` on a bad prefix; the reader is then unusable and the connection
    must be closed.
    """

    def __init__(
        self,
        max_frame_bytes: int,
        *,
        first_frame_max_bytes: int | None = None,
        max_parts: int = MAX_PARTS,
        buffer_size: int = READ_BUFFER_BYTES,
    ) -> None:
        if buffer_size < 2 * DIRECT_READ_BYTES:
            raise ValueError("buffer_size must be at least twice DIRECT_READ_BYTES")
        #: Largest frame accepted, prefix included; may be raised once the handshake passes.
        self.max_frame_bytes = max_frame_bytes
        # A lower limit for the first frame only. The connecting side reads the server's
        # handshake answer under it, and what follows under the normal limit, even when both
        # arrive in one read: the server may write right after its Welcome.
        self._first_frame_max_bytes = first_frame_max_bytes
        self.max_parts = max_parts
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte of _buf not parsed yet
        self._end = 0  # end of the bytes received into _buf
        # The frame being parsed: its part count (-1 before the count is read) and lengths.
        self._nparts = -1
        self._lengths: tuple[int, ...] = ()
        self._parts: list[memoryview] = []
        self._want = _COUNT.size  # size of the next item: count, length table or a part
        # A large item being read directly into its own buffer, and how much has arrived.
        self._direct: memoryview | None = None
        self._direct_pos = 0

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived but not all of it."""
        return self._nparts >= 0 or self._direct is not None or self._end > self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._direct is not None:
            return self._direct[self._direct_pos :]
        if len(self._buf) - self._end < DIRECT_READ_BYTES:
            # Little room left: move the unparsed tail (smaller than one small item) to the
            # front. A copy, not a slice assignment, because the ranges may overlap.
            tail = bytes(self._view[self._start : self._end])
            self._buf[: len(tail)] = tail
            self._start, self._end = 0, len(tail)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[list[memoryview]]:
        frames: list[list[memoryview]] = []
        if self._direct is not None:
            self._direct_pos += nbytes
            if self._direct_pos < len(self._direct):
                return frames
            item, self._direct = self._direct, None
            self._accept(item, frames, owned=True)
        else:
            self._end += nbytes
        self._parse(frames)
        return frames

    def feed(self, data: Buffer) -> list[list[memoryview]]:
        """Parse ``data`` (for byte sources that are not a ``BufferedProtocol``, and tests)."""
        view = memoryview(data).cast("B")
        frames: list[list[memoryview]] = []
        pos = 0
        while pos < len(view):
            target = self.get_buffer()
            n = min(len(target), len(view) - pos)
            target[:n] = view[pos : pos + n]
            pos += n
            frames.extend(self.buffer_updated(n))
        return frames

    def _parse(self, frames: list[list[memoryview]]) -> None:
        while True:
            want = self._want
            available = self._end - self._start
            if want >= DIRECT_READ_BYTES:
                # Its own buffer, allocated only now that the prefix passed the limits. Bytes
                # of it already in the shared buffer are copied over; the rest land directly.
                target = allocate_part(want)
                have = min(available, want)
                target[:have] = self._view[self._start : self._start + have]
                self._start += have
                if have < want:
                    self._direct, self._direct_pos = target, have
                    break
                self._accept(target, frames, owned=True)
            elif available >= want:
                item = self._view[self._start : self._start + want]
                self._start += want
                self._accept(item, frames, owned=False)
            else:
                break
        if self._start == self._end:
            self._start = self._end = 0

    @property
    def _limit(self) -> int:
        if self._first_frame_max_bytes is None:
            return self.max_frame_bytes
        return min(self._first_frame_max_bytes, self.max_frame_bytes)

    def _accept(self, item: memoryview, frames: list[list[memoryview]], owned: bool) -> None:
        """Take one complete item (count, length table or part) and move to the next."""
        limit = self._limit
        if self._nparts < 0:
            (nparts,) = _COUNT.unpack(item)
            if nparts == 0:
                raise ProtocolError("frame with no parts")
            if nparts > self.max_parts:
                raise ProtocolError(
                    f"frame of {nparts} parts exceeds the limit of {self.max_parts}"
                )
            if _COUNT.size + 8 * nparts > limit:
                raise ProtocolError(f"frame of {nparts} parts exceeds the limit of {limit} bytes")
            self._nparts = nparts
            self._want = 8 * nparts
        elif not self._lengths:
            lengths = struct.unpack(f"<{self._nparts}Q", item)
            total = _COUNT.size + 8 * self._nparts + sum(lengths)
            if total > limit:
                raise ProtocolError(f"frame of {total} bytes exceeds the limit of {limit} bytes")
            self._lengths = lengths
            self._want = lengths[0]
        else:
            # Small parts live in the reused shared buffer, so they are copied out.
            self._parts.append(item if owned else memoryview(item.tobytes()))
            if len(self._parts) < self._nparts:
                self._want = self._lengths[len(self._parts)]
            else:
                frames.append(self._parts)
                self._parts, self._lengths, self._nparts = [], (), -1
                self._first_frame_max_bytes = None
                self._want = _COUNT.size
