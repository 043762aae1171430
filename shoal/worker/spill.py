"""A worker's store: results in memory up to a byte target, the least recently used on disk.

`SpillBuffer` is the mapping a worker keeps its data in (``Worker.data``). It weighs each
value with `shoal.execution.sizeof` (a `Packed` by its frames) and keeps them in LRU order.
When the bytes in memory pass ``target``, or pass the lower ``ceiling`` the memory monitor
sets while the whole process is too big (`shoal.memory`), a background thread writes the
least recently used values to files in a per-worker directory, as the frames of
`shoal.protocol.serialize.serialize` (a `Packed` value as the frames it arrived in), and
drops them from memory. Reading a spilled key loads it back and counts it in memory again;
deleting a key removes its file.

For task threads, `hold` hands out spilled values as `Spilled` handles that the thread
loads itself (`Lazy.load`), so that reading a big value back is not done on the event loop;
`loaded` then puts the value back in memory, if the store still holds that copy.

Invariants (under ``_lock``; checked by `validate`):
- a key is in exactly one of ``fast`` (in memory) and ``slow`` (on disk);
- ``memory_bytes`` is the sum of the sizes of the values in ``fast``, ``spilled_bytes`` the
  sum of the file sizes of the entries in ``slow``;
- every entry of ``slow`` has its file; a file of an entry no longer in ``slow`` lives only
  while a task thread or a peer's read holds it (`hold`, `peek`) and is removed when the
  last one lets go (a big one by the spill thread, soon after).

No disk I/O happens under ``_lock`` but removing small files and making the directory: the
event loop takes it for every lookup, so a spilled value is read, written or (when big)
removed outside it.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from .execution import sizeof as default_sizeof
from ..protocol.framing import allocate
from ..protocol.serialize import Buffer, SerializationError, Serialized, deserialize, serialize

logger = logging.getLogger("shoal.spill")

__all__ = ["Lazy", "Packed", "SpillBuffer", "Spilled", "read_frames", "write_frames"]

_COUNT = struct.Struct("<I")
#: Spilled files at least this big are removed by the spill thread, not by the caller.
BIG_FILE_BYTES = 64 * 2**20


class Lazy:
    """A value the store holds in a form a task cannot use as is; `load` makes it usable."""

    __slots__ = ()

    @property
    def nbytes(self) -> int:
        """Bytes it takes in memory once loaded (as weighed now)."""
        raise NotImplementedError

    def load(self) -> Any:
        raise NotImplementedError


class Packed(Lazy):
    """Data received from the network, unpickled only when a task first needs it."""

    __slots__ = ("ser",)

    def __init__(self, ser: Serialized) -> None:
        self.ser = ser

    @property
    def nbytes(self) -> int:
        return self.ser.nbytes

    def load(self) -> Any:
        return deserialize(self.ser)


class _OnDisk:
    """One spilled value: its file, and what it weighed in memory."""

    __slots__ = ("path", "nbytes", "disk_bytes", "live", "holds")

    def __init__(self, path: str, nbytes: int, disk_bytes: int) -> None:
        self.path = path
        #: its size in memory (as `sizeof` weighed it) when it was spilled
        self.nbytes = nbytes
        self.disk_bytes = disk_bytes
        #: still the store's copy of its key (False once deleted, replaced or loaded back)
        self.live = True
        #: task threads holding it (`hold`); its file stays until they are done with it
        self.holds = 0


class Spilled(Lazy):
    """A spilled value handed to a task thread by `SpillBuffer.hold`: `load` reads it back."""

    __slots__ = ("entry",)

    def __init__(self, entry: _OnDisk) -> None:
        self.entry = entry

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    def load(self) -> Any:
        return deserialize(Serialized(read_frames(self.entry.path)))


def write_frames(path: str, frames: Iterable[Buffer]) -> int:
    """Write ``frames`` to a new file at ``path``: a count, their lengths, then each frame
    as it is (no copy). Returns the bytes written."""
    views = [memoryview(f).cast("B") for f in frames]
    header = _COUNT.pack(len(views)) + struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views))
    total = 0
    with open(path, "xb", buffering=0) as f:
        for view in (memoryview(header), *views):
            while view.nbytes:
                written = f.write(view)
                assert written is not None  # a blocking file never answers None
                view = view[written:]
                total += written
    return total


def read_frames(path: str) -> list[Buffer]:
    """The frames `write_frames` wrote to ``path``, each read into its own writable buffer
    (so a NumPy array loaded from them is writable)."""
    with open(path, "rb", buffering=0) as f:
        (count,) = _COUNT.unpack(_read_exactly(f, _COUNT.size))
        lengths = struct.unpack(f"<{count}Q", _read_exactly(f, 8 * count))
        frames: list[Buffer] = []
        for length in lengths:
            # A big frame gets a fresh mapping: ``bytearray`` zeroes it with the GIL held
            # (0.4 s per GB, a stall for the event loop), the kernel zeroes it lazily.
            buf = allocate(length)
            view = buf
            while view.nbytes:
                got = f.readinto(view)
                if not got:
                    raise OSError(f"spill file {path} is truncated")
                view = view[got:]
            frames.append(buf)
    return frames


def _read_exactly(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise OSError(f"spill file {f.name} is truncated")
    return bytes(data)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - nothing better to do than say so
        logger.warning("could not remove spill file %s: %s", path, exc)


class SpillBuffer(MutableMapping[str, Any]):
    """Key -> value, in memory up to ``target`` bytes and spilled to disk beyond (see the
    module's docstring). Thread-safe: the event loop, task threads and the spill thread
    share it. `close` stops the spill thread and removes every file (and the directory,
    unless it was given)."""

    def __init__(
        self,
        target: int | None = None,
        directory: str | None = None,
        *,
        name: str = "worker",
        sizeof: Callable[[Any], int] = default_sizeof,
    ) -> None:
        #: spill once the values in memory weigh more than this (None: only on request)
        self.target = target
        #: a limit below ``target`` the memory monitor sets from the process's RSS (None: none)
        self._ceiling: int | None = None
        self.name = name
        self._sizeof = sizeof
        #: where files go; made on first spill (a fresh temporary directory if not given)
        self._directory = directory
        self._own_directory = directory is None
        self._made_directory = False
        #: in memory, least recently used first
        self.fast: OrderedDict[str, Any] = OrderedDict()
        self._sizes: dict[str, int] = {}
        #: on disk
        self.slow: dict[str, _OnDisk] = {}
        self.memory_bytes = 0
        self.spilled_bytes = 0
        #: since the start: values written to disk, and read back
        self.spill_count = 0
        self.unspill_count = 0
        self.spilled_bytes_total = 0
        #: keys whose value in memory is backed by a shared-memory segment (a handle with
        #: ``close()``, `shoal.comm.shm.SharedValue`): closed when the key is dropped,
        #: replaced or spilled
        self._segments: dict[str, Any] = {}
        #: keys whose values cannot be pickled: they stay in memory
        self._unspillable: set[str] = set()
        self._files = itertools.count()
        #: big files of deleted keys, for the spill thread to remove (`_remove_file`)
        self._trash: list[str] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        #: threads in `wait_for_room`, told when bytes leave memory
        self._room = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------ the mapping

    def __len__(self) -> int:
        with self._lock:
            return len(self.fast) + len(self.slow)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter([*self.fast, *self.slow])

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self.fast or key in self.slow

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key in self.fast:
                self.fast.move_to_end(key)
                return self.fast[key]
            entry = self.slow[key]
            entry.holds += 1
        # Read outside the lock, as in `peek`.
        try:
            value = Spilled(entry).load()
        except BaseException:
            self._let_go(entry)
            raise
        size = self._sizeof(value)
        with self._lock:
            entry.holds -= 1
            if self.slow.get(key) is entry:
                self._unspill(key, entry, value, size)
            elif not entry.live and entry.holds == 0:
                self._remove_file(entry)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        size = self._sizeof(value)
        with self._lock:
            self._drop(key)
            self._keep(key, value, size)
            if self.target is not None and size > self.target:
                self.fast.move_to_end(key, last=False)  # too big to keep: spill it first
            self._maybe_spill()

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if not self._drop(key):
                raise KeyError(key)

    def discard(self, key: str) -> None:
        """Delete ``key`` if it is here (a spilled one without reading it back)."""
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            for key in [*self.fast, *self.slow]:
                self._drop(key)

    def __repr__(self) -> str:
        return (f"<SpillBuffer {len(self.fast)} in memory ({self.memory_bytes} bytes),"
                f" {len(self.slow)} on disk ({self.spilled_bytes} bytes)>")  # fmt: skip

    # ------------------------------------------------------ beyond the mapping

    def peek(self, key: str) -> Any:
        """``key``'s value for a peer to copy: a spilled one as a `Packed` of its frames,
        read from disk but left there (a peer's read says nothing of our own next use).
        The file is read outside the lock (its entry held meanwhile, as by `hold`): reading
        1 GB takes seconds, and the event loop takes the lock for every lookup."""
        with self._lock:
            if key in self.fast:
                return self.fast[key]
            entry = self.slow[key]
            entry.holds += 1
        try:
            return Packed(Serialized(read_frames(entry.path)))
        finally:
            self._let_go(entry)

    def _let_go(self, entry: _OnDisk) -> None:
        """A reader is done with ``entry``'s file: remove it if its key let go of it too."""
        with self._lock:
            entry.holds -= 1
            if not entry.live and entry.holds == 0:
                self._remove_file(entry)

    def segment(self, key: str) -> Any:
        """The shared-memory segment backing ``key``'s value in memory, or None."""
        with self._lock:
            return self._segments.get(key)

    def put_shared(self, key: str, value: Any, segment: Any, replace: bool = True) -> bool:
        """Store ``value`` (made from ``segment``'s mapping) under ``key``, backed by
        ``segment``. Unless ``replace``, a key already here is kept and False returned (the
        caller closes ``segment``)."""
        size = self._sizeof(value)
        with self._lock:
            if self._closed or (not replace and (key in self.fast or key in self.slow)):
                return False
            self._drop(key)
            self._keep(key, value, size)
            self._segments[key] = segment
            self._maybe_spill()
            return True

    def share(self, key: str, old: Any, new: Any, segment: Any) -> bool:
        """Swap ``key``'s value ``old`` for ``new``, the same value made from ``segment``'s
        mapping (so that the private copy can go), if the store still holds ``old`` in
        memory; else False (the caller closes ``segment``)."""
        size = self._sizeof(new)
        with self._lock:
            if self._closed or self.fast.get(key) is not old or key in self._segments:
                return False
            self.memory_bytes += size - self._sizes[key]
            self._sizes[key] = size
            self.fast[key] = new
            self._segments[key] = segment
            return True

    def _close_segment(self, key: str) -> None:
        segment = self._segments.pop(key, None)
        if segment is not None:
            segment.close()

    def hold(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those of ``keys`` that are here, for a task about to run: spilled
        ones as `Spilled` handles, which stay readable (their files stay) until `loaded`
        is called with them, even if the key is deleted meanwhile."""
        out: dict[str, Any] = {}
        with self._lock:
            for key in keys:
                if key in self.fast:
                    self.fast.move_to_end(key)
                    out[key] = self.fast[key]
                elif key in self.slow:
                    entry = self.slow[key]
                    entry.holds += 1
                    out[key] = Spilled(entry)
        return out

    def loaded(self, key: str, lazy: Lazy, value: Any) -> None:
        """A task thread loaded ``lazy`` (from `hold`: a `Packed` or `Spilled`) as
        ``value``: keep ``value`` in memory in its place, if the store still holds that copy.
        A spilled value stays on disk instead if memory has no room for it now: it would
        only push out another (the task has its copy). A `Spilled` never passed back here
        keeps its file until `close`; pass ``value`` None to let go of one unloaded."""
        size = self._sizeof(value) if value is not None else 0
        with self._lock:
            if isinstance(lazy, Spilled):
                entry = lazy.entry
                entry.holds -= 1
                limit = self._limit()
                room = limit is None or self.memory_bytes + size <= limit
                if value is not None and room and self.slow.get(key) is entry:
                    self._unspill(key, entry, value, size)
                elif not entry.live and entry.holds == 0:
                    self._remove_file(entry)
            elif value is not None and self.fast.get(key) is lazy:
                self.memory_bytes += size - self._sizes[key]
                self._sizes[key] = size
                self.fast[key] = value
                self._maybe_spill()

    @property
    def ceiling(self) -> int | None:
        return self._ceiling

    @ceiling.setter
    def ceiling(self, value: int | None) -> None:
        """Spill until the values in memory weigh no more than ``value`` (None: lift it)."""
        with self._lock:
            self._ceiling = value
            self._maybe_spill()

    @property
    def directory(self) -> str | None:
        """Where spilled values go (None until the first spill, for a temporary one)."""
        return self._directory

    def disk_bytes(self, keys: Iterable[str]) -> int:
        """Bytes those of ``keys`` that are on disk take once read back (for `peek`)."""
        with self._lock:
            return sum(self.slow[k].nbytes for k in keys if k in self.slow)

    def sizes(self, keys: Iterable[str]) -> tuple[int, int]:
        """Bytes those of ``keys`` that are here take in memory, and on disk once read back
        (what sending them costs, for the worker to choose where to do it)."""
        in_memory = on_disk = 0
        with self._lock:
            for key in keys:
                size = self._sizes.get(key)
                if size is not None:
                    in_memory += size
                elif key in self.slow:
                    on_disk += self.slow[key].nbytes
        return in_memory, on_disk

    def spillable_bytes(self) -> int:
        """Bytes in memory that could still be spilled."""
        with self._lock:
            return self.memory_bytes - sum(self._sizes[k] for k in self._unspillable)

    def close(self) -> None:
        """Stop the spill thread, drop everything, remove the files, and the directory if
        it is our own or left empty."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            self._room.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self.clear()
            directory, made = self._directory, self._made_directory
        if directory is None:
            return
        if self._own_directory:
            if made:
                shutil.rmtree(directory, ignore_errors=True)
            return
        try:
            for entry in os.scandir(directory):
                if entry.name.endswith(".spill"):
                    _unlink(entry.path)
            # Left empty, it goes too: a worker whose nanny was killed leaves nothing behind
            # (a nanny makes it again for the next worker).
            os.rmdir(directory)
        except OSError:
            pass

    def validate(self) -> None:
        """Check the invariants (for tests)."""
        with self._lock:
            assert not set(self.fast) & set(self.slow), set(self.fast) & set(self.slow)
            assert set(self._sizes) == set(self.fast)
            assert set(self._segments) <= set(self.fast), set(self._segments) - set(self.fast)
            assert self.memory_bytes == sum(self._sizes.values())
            assert self.spilled_bytes == sum(e.disk_bytes for e in self.slow.values())
            for entry in self.slow.values():
                assert entry.live and os.path.exists(entry.path), entry.path

    # -------------------------------------------------------------- mechanics

    def _keep(self, key: str, value: Any, size: int) -> None:
        self.fast[key] = value
        self._sizes[key] = size
        self.memory_bytes += size

    def _drop(self, key: str) -> bool:
        self._close_segment(key)
        if key in self.fast:
            del self.fast[key]
            self.memory_bytes -= self._sizes.pop(key)
            self._unspillable.discard(key)
            self._room.notify_all()
            return True
        entry = self.slow.pop(key, None)
        if entry is None:
            return False
        self.spilled_bytes -= entry.disk_bytes
        entry.live = False
        if entry.holds == 0:
            self._remove_file(entry)
        return True

    def _remove_file(self, entry: _OnDisk) -> None:
        """Remove a spilled file no longer needed (under the lock). A big one goes to the
        spill thread: freeing 1 GB of extents takes ~50 ms, too long for the event loop
        (which deletes keys) or for holding the lock."""
        if entry.disk_bytes >= BIG_FILE_BYTES and self._thread is not None and not self._closed:
            self._trash.append(entry.path)
            self._wake.notify()
        else:
            _unlink(entry.path)

    def _unspill(self, key: str, entry: _OnDisk, value: Any, size: int | None = None) -> None:
        del self.slow[key]
        self.spilled_bytes -= entry.disk_bytes
        entry.live = False
        if entry.holds == 0:
            self._remove_file(entry)
        self._keep(key, value, self._sizeof(value) if size is None else size)
        self.unspill_count += 1
        self._maybe_spill()

    def _limit(self) -> int | None:
        limits = [x for x in (self.target, self._ceiling) if x is not None]
        return min(limits) if limits else None

    def _victim(self) -> str | None:
        """The key to spill next, if the values in memory weigh too much."""
        limit = self._limit()
        if limit is None or self.memory_bytes <= limit:
            return None
        for key in self.fast:
            if key not in self._unspillable:
                return key
        return None

    def wait_for_room(self, nbytes: int, timeout: float = 10.0) -> None:
        """Block until ``nbytes`` more fit in memory under the limits, the spill thread
        making room meanwhile. A task thread calls it before its result goes in: tasks that
        make results faster than the disk takes them wait, rather than fill memory. Returns
        early when nothing more can be spilled, and after ``timeout`` seconds at most."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed:
                limit = self._limit()
                if limit is None or self.memory_bytes + nbytes <= limit:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or self._victim() is None:
                    return  # nothing left to spill (or too long): go over rather than hang
                self._maybe_spill()
                self._room.wait(left)

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_for_change(self, timeout: float) -> None:
        """Block until bytes leave memory (a spill, a delete), or ``timeout`` seconds."""
        with self._lock:
            if not self._closed:
                self._room.wait(timeout)

    def wait_to_load(self, held: Mapping[str, Any]) -> None:
        """`wait_for_room` for the values a task is about to read back from disk (the
        `Spilled` handles among ``held``, from `hold`), before they come into memory."""
        nbytes = sum(v.nbytes for v in held.values() if isinstance(v, Spilled))
        if nbytes:
            self.wait_for_room(nbytes)

    def _maybe_spill(self) -> None:
        if self._closed or self._victim() is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._spill_loop, daemon=True,
                                            name=f"shoal-spill-{self.name}")  # fmt: skip
            self._thread.start()
        self._wake.notify()

    def _path(self) -> str:
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix=f"shoal-spill-{self.name}-")
        elif not self._made_directory:
            os.makedirs(self._directory, exist_ok=True)
        self._made_directory = True
        return os.path.join(self._directory, f"{next(self._files)}.spill")

    def _spill_loop(self) -> None:
        """The spill thread: write the least recently used values out while there are too
        many bytes in memory. The value stays readable in ``fast`` while it is written."""
        while True:
            with self._lock:
                trash, self._trash = self._trash, []
            for old in trash:  # big files of deleted keys (`_remove_file`)
                _unlink(old)
            with self._lock:
                key = self._victim()
                while key is None and not self._trash and not self._closed:
                    self._room.notify_all()  # as much room as there will be
                    self._wake.wait()
                    key = self._victim()
                if self._closed:
                    return  # (`close` removes every file, the trash's too)
                if key is None:
                    continue  # files to remove
                try:
                    path = self._path()
                except OSError as exc:
                    logger.error("cannot make a spill directory: %s; not spilling", exc)
                    self._unspillable.update(self.fast)
                    continue
                value, size = self.fast[key], self._sizes[key]
            self._spill_one(key, value, size, path)
            # Not kept while this thread waits for the next victim: that would hold the
            # memory the spill was to free.
            del value

    def _spill_one(self, key: str, value: Any, size: int, path: str) -> None:
        # Its own frame, so that nothing here outlives the write (the loop then waits).
        try:
            frames = value.ser.frames if isinstance(value, Packed) else serialize(value, key).frames
            disk_bytes = write_frames(path, frames)
        except (SerializationError, OSError) as exc:
            _unlink(path)
            logger.warning("keeping %s in memory: cannot spill it: %s", key, exc)
            with self._lock:
                if self.fast.get(key) is value:
                    self._unspillable.add(key)
                self._room.notify_all()
            return
        with self._lock:
            self._room.notify_all()
            if self.fast.get(key) is not value or self._closed:
                _unlink(path)  # deleted or replaced while it was written
                return
            del self.fast[key]
            self.memory_bytes -= self._sizes.pop(key)
            self._close_segment(key)  # on disk now: the mapping and fd go
            self.slow[key] = _OnDisk(path, size, disk_bytes)
            self.spilled_bytes += disk_bytes
            self.spill_count += 1
            self.spilled_bytes_total += disk_bytes
