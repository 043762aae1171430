"""Reading and appending the journal file (format: `records`).

Reading checks the header (an incompatible version is refused), then every record's length
and CRC32; a torn or corrupt tail (a kill in the middle of a write, a bad sector) is cut at
the last whole record, with a log line saying how many bytes went. Appending is batched:
`JournalWriter.append` only encodes into memory, `flush` writes and fsyncs what is pending,
so one fsync covers every event of an interval.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ..core.scheduler_events import SchedulerEvent
from .records import (
    BATCH,
    HEADER,
    MAX_RECORD_BYTES,
    RECORD_HEAD,
    JournalError,
    Record,
    check_header,
    decode_payload,
    encode_record,
    header,
)

logger = logging.getLogger("shoal.journal")


@dataclass(slots=True)
class ScanResult:
    records: list[Record]
    #: bytes of whole records after the header (where appending resumes)
    good_bytes: int
    #: bytes cut from the end (a torn or corrupt tail); 0 when the file was whole
    cut_bytes: int
    why_cut: str


def scan(path: str | os.PathLike[str], repair: bool = True) -> ScanResult:
    """Read every whole record of the journal at ``path``; with ``repair``, truncate the file
    after the last whole record (a torn or corrupt tail) and log it."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    check_header(data, name)
    records: list[Record] = []
    offset = HEADER.size
    why = ""
    view = memoryview(data)
    while offset < len(data):
        if len(data) - offset < RECORD_HEAD.size:
            why = f"a torn record header ({len(data) - offset} bytes)"
            break
        length, crc = RECORD_HEAD.unpack_from(data, offset)
        start = offset + RECORD_HEAD.size
        if length > MAX_RECORD_BYTES or start + length > len(data):
            why = f"a torn record (needs {length} bytes, {len(data) - start} left)"
            break
        payload = view[start:start + length]
        if zlib.crc32(payload) != crc:
            why = "a record whose CRC32 does not match (corrupt)"
            break
        try:
            records.append(decode_payload(payload))
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
            raise JournalError(f"{name}: record at byte {offset} has a good checksum but cannot"
                               f" be read ({exc}); was it written by another version?") from exc
        offset = start + length
    cut = len(data) - offset
    if cut:
        logger.warning("journal %s: cut %d bytes at byte %d, after the last whole record (%d"
                       " records kept): %s", name, cut, offset, len(records), why)  # fmt: skip
        if repair:
            with open(name, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
    return ScanResult(records, offset - HEADER.size, cut, why)


def iter_events(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The records of a journal, without repairing it (for inspection and tests)."""
    yield from scan(path, repair=False).records


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike[str], records: list[bytes]) -> int:
    """Write a journal holding ``records`` atomically (a temporary file renamed over
    ``path``); return its size."""
    target = Path(path)
    tmp = target.with_name(target.name + ".compacting")
    with open(tmp, "wb") as f:
        f.write(header())
        for rec in records:
            f.write(rec)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, target)
    _fsync_dir(target)
    return size


class JournalWriter:
    """Appends records to a journal file. `append` encodes into memory (cheap, on the
    scheduler's loop); `take` + `write` (or `flush`) put them on disk with one fsync."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            write_new(self.path, [])
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the writer's life
        #: bytes in the file (as of the last write)
        self.size = self._file.tell()
        self._pending = bytearray()

    def append(self, now: float, events: list[SchedulerEvent], kind: int = BATCH,
               restored: bool = False) -> None:  # fmt: skip
        self._pending += encode_record(kind, now, events, restored)

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def take(self) -> bytes:
        """What is pending, now owned by the caller (to `write` from another thread)."""
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def write(self, data: bytes) -> None:
        """Append ``data`` and fsync (blocking: run it off the event loop)."""
        if data:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.size += len(data)

    def flush(self) -> None:
        self.write(self.take())

    def replace(self, records: list[bytes]) -> None:
        """Make the journal exactly ``records`` (compaction); appending goes on after them."""
        size = write_new(self.path, records)  # the old file stays whole if this fails
        self._file.close()
        self._file = open(self.path, "ab")  # noqa: SIM115
        self.size = size

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
