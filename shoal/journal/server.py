"""The scheduler's side of the journal: record each `handle` call, fsync on a timer, compact.

`ServerJournal.record` runs on the scheduler's loop for every batch of events and only
encodes into memory. `run` wakes every ``fsync_interval`` and writes what is pending with one
fsync, in a thread (the loop keeps serving). When the file has grown past ``compact_factor``
times the last snapshot (and at least ``min_compact_bytes``), it is rewritten as a snapshot
of the live state (`snapshot_events`), into a new file renamed over the old one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from ..core.scheduler_events import SchedulerEvent
from ..core.scheduler_state import SchedulerState
from .file import JournalWriter
from .records import BATCH, RESTART, SNAPSHOT, encode_record
from .replay import ReplayStats, replay, snapshot_events

logger = logging.getLogger("shoal.journal")

#: The default most events a kill may lose: the interval between fsyncs (seconds).
DEFAULT_FSYNC_INTERVAL = 0.05


class ServerJournal:
    """A scheduler's journal file: replayed at start, appended while it runs."""

    def __init__(self, path: str | os.PathLike[str], fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
                 compact_factor: float = 4.0, min_compact_bytes: int = 8 << 20) -> None:  # fmt: skip
        if not fsync_interval > 0:
            raise ValueError(f"the journal's fsync interval must be > 0 seconds, not"
                             f" {fsync_interval!r}")  # fmt: skip
        if not compact_factor > 1:
            raise ValueError(f"the journal's compaction factor must be > 1, not {compact_factor!r}")
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self.compact_factor = compact_factor
        self.min_compact_bytes = min_compact_bytes
        self._writer: JournalWriter | None = None
        #: the file's size right after the last compaction (or the replay)
        self._live_bytes = 0
        self.compactions = 0
        self._failed: BaseException | None = None

    def open(self, state: SchedulerState) -> ReplayStats | None:
        """Replay an existing journal into ``state`` (a fresh one); open it for appending.
        Returns None when there was nothing to replay."""
        stats: ReplayStats | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            started = time.perf_counter()
            stats = replay(self.path, state)
            logger.info("journal %s: replayed %d records (%d events, %d bytes) in %.2fs: %d"
                        " tasks, %d clients", self.path, stats.records, stats.events,
                        stats.bytes, time.perf_counter() - started, len(state.tasks),
                        len(state.clients))  # fmt: skip
            if not stats.records:
                stats = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = JournalWriter(self.path)
        self._live_bytes = self._writer.size
        return stats

    def record(self, now: float, events: list[SchedulerEvent], restored: bool) -> None:
        assert self._writer is not None, "open() the journal first"
        self._writer.append(now, events, BATCH, restored)

    def mark_restart(self, now: float) -> None:
        """From here on the state accepts held results (`SchedulerState.restored`)."""
        assert self._writer is not None
        self._writer.append(now, [], RESTART, True)

    async def run(self, state: SchedulerState, stopping: asyncio.Event) -> None:
        """Flush every ``fsync_interval`` until ``stopping``; compact when due."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self.fsync_interval)
            except asyncio.TimeoutError:
                pass
            try:
                await self.flush()
                if self._compaction_due():
                    await self.compact(state)
            except OSError as exc:  # a full or failing disk: say so, keep serving
                if self._failed is None:
                    logger.error("journal %s: cannot write (%s); a restart now loses what"
                                 " came since", self.path, exc)  # fmt: skip
                self._failed = exc

    async def flush(self) -> None:
        writer = self._writer
        if writer is not None and writer.pending_bytes:
            await asyncio.to_thread(writer.write, writer.take())

    def flush_now(self) -> None:
        """Flush, blocking (at close)."""
        if self._writer is not None:
            self._writer.flush()

    def _compaction_due(self) -> bool:
        assert self._writer is not None
        return self._writer.size > self.compact_factor * max(self._live_bytes,
                                                             self.min_compact_bytes)  # fmt: skip

    async def compact(self, state: SchedulerState) -> None:
        """Rewrite the journal as one snapshot of ``state``; events after it follow."""
        writer = self._writer
        assert writer is not None
        started = time.perf_counter()
        before = writer.size
        # What is pending happened before the snapshot: the snapshot holds it already.
        dropped = writer.take()
        record = encode_record(SNAPSHOT, time.time(), snapshot_events(state), state.restored)
        try:
            await asyncio.to_thread(writer.replace, [record])
        except OSError:
            writer.write(dropped)  # keep the old journal whole
            raise
        self._live_bytes = writer.size
        self.compactions += 1
        logger.info("journal %s: compacted %d bytes into %d (%d tasks) in %.2fs", self.path,
                    before, writer.size, len(state.tasks), time.perf_counter() - started)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            finally:
                self._writer.close()
