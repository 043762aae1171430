"""How much memory a worker may use, and what it does as it fills up.

Each worker has a memory limit (``--memory-limit``: bytes, "4GB", or "auto", a share of the
machine). Fractions of it, dask.distributed's defaults (`MemoryFractions`):

- target 0.6: results in memory beyond this are spilled to disk, least recently used first
  (the worker's `shoal.spill.SpillBuffer`);
- spill 0.7: the process's RSS is kept under this by spilling, and once past it, spilled
  down to the target (`MemoryMonitor`);
- pause 0.8: above this the worker starts no new task (`PauseEvent`) until it is back under;
- terminate 0.95: the worker's nanny kills it and starts a new one (`shoal.cluster.nanny`);
- transfer 0.1: inputs being fetched from peers at once (at least one).

`WorkerMemory` is a worker's part: its store and the monitor that reads the process's RSS
every 20 ms. A poll alone acts too late: one task can allocate a tenth of the limit and more
between two readings (its inputs read back from disk and its result), and a peer's data
lands all at once. So the worker also acts *before* it allocates, on the projected memory:

- a task, before it starts (on its thread), reserves what it will allocate: the inputs it
  reads back from disk or unpickles, and a result as big as the last of its kind
  (`WorkerMemory.reserve`). It waits, up to a deadline, until the RSS plus every
  reservation fits under `MemoryMonitor.line`, the store spilling meanwhile: reservations
  lower the store's ceiling like memory already in use. Reservations are kept under the
  target fraction: the band up to the spill fraction is for what no reservation foresees
  (data being sent, buffers);
- a fetch from a peer reserves its bytes the same way (`WorkerMemory.reserve_async`);
- when a result is stored or a peer's data lands, the RSS is read again at once
  (`WorkerMemory.check_now`): the store spills and the worker pauses then, not a poll later;
- the pause decision counts the reservations too (the projected RSS).

Allocations under `SMALL_BYTES` skip both the reservation and the immediate check (the poll
sees them): each costs reads of /proc and the store's lock, which for a tiny task were most
of the worker's own time per task.

A result also waits on its task's thread for room in memory (`SpillBuffer.wait_for_room`),
so tasks cannot outrun the disk. A worker in the client's process (``in_process``) shares
its RSS with everything else there, so it spills by the target only and never pauses.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from ..core.worker_events import PauseEvent
from .spill import SpillBuffer

if TYPE_CHECKING:
    from .server import Worker

logger = logging.getLogger("shoal.memory")

__all__ = ["MemoryFractions", "MemoryMonitor", "WorkerMemory", "format_bytes", "parse_bytes",
           "parse_memory_limit", "system_memory"]  # fmt: skip


@dataclass(frozen=True)
class MemoryFractions:
    """Fractions of the memory limit at which a worker acts; None turns one off."""

    #: spill results beyond this many bytes in memory
    target: float | None = 0.6
    #: spill when the process's RSS passes this (down to ``target``)
    spill: float | None = 0.7
    #: start no new task above this RSS
    pause: float | None = 0.8
    #: the nanny restarts the worker above this RSS
    terminate: float | None = 0.95
    #: inputs in flight from peers at most (one is always allowed)
    transfer: float | None = 0.1

    def __post_init__(self) -> None:
        for name in ("target", "spill", "pause", "terminate", "transfer"):
            value = getattr(self, name)
            if value is not None and not 0 < value:
                raise ValueError(f"memory {name} fraction must be above 0, not {value}")

    @classmethod
    def parse(cls, text: str) -> MemoryFractions:
        """``"0.6,0.7,0.8,0.95,0.1"`` (target, spill, pause, terminate, transfer); an item
        may be empty, "none" or "off" to turn that one off; missing items keep their default."""
        items = [item.strip().lower() for item in text.split(",")]
        if len(items) > 5:
            raise ValueError(f"{text!r}: at most 5 fractions"
                             " (target,spill,pause,terminate,transfer)")  # fmt: skip
        defaults = cls()
        values: list[float | None] = [defaults.target, defaults.spill, defaults.pause,
                                      defaults.terminate, defaults.transfer]  # fmt: skip
        for i, item in enumerate(items):
            if item in ("", "none", "off", "false"):
                values[i] = None
            else:
                try:
                    values[i] = float(item)
                except ValueError:
                    raise ValueError(f"{item!r} in {text!r} is not a fraction") from None
        return cls(*values)

    def __str__(self) -> str:
        return ",".join("none" if v is None else repr(v)
                        for v in (self.target, self.spill, self.pause, self.terminate,
                                  self.transfer))  # fmt: skip


# ------------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([kmgtp]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000, ``"512MiB"``, ``"1e9"``, ``"100"`` (bytes)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 4GB, 512MiB, 1e9)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def format_bytes(n: float) -> str:
    """``format_bytes(200 * 2**20)`` -> ``"200.0 MiB"``."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                        ("KiB", 2**10)):  # fmt: skip
        if abs(n) >= scale * 0.9:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def system_memory() -> int:
    """Bytes of memory this machine (or this container's cgroup) lets us use."""
    total: int = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max",  # cgroup v2
                 "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v1  # fmt: skip
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def parse_memory_limit(value: str | int | float | None, n_workers: int = 1) -> int:
    """A memory limit in bytes, 0 for none. ``None`` or "auto": this machine's memory shared
    by its ``n_workers`` workers; a number up to 1: that fraction of the machine's memory;
    else bytes, or a size like "4GB". A limit above the machine's memory is lowered to it."""
    total = system_memory()
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return total // max(1, n_workers)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("0", "none", "off", "false", ""):
            return 0
        try:
            number = float(text)
        except ValueError:
            number = parse_bytes(text)
    else:
        number = float(value)
    if number < 0:
        raise ValueError(f"a memory limit cannot be negative: {value!r}")
    if 0 < number <= 1:
        return int(total * number)
    if number > total:
        logger.info("memory limit %s is above this machine's %s; using the latter",
                    format_bytes(number), format_bytes(total))  # fmt: skip
        return total
    return int(number)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Reservations and immediate checks are for allocations at least this big, together.
SMALL_BYTES = 1 << 20


def key_prefix(key: str) -> str:
    """``"add-3f2a..."`` -> ``"add"``, ``"x-12"`` -> ``"x"``: tasks of one kind."""
    return key.rsplit("-", 1)[0] if "-" in key else key


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def trim_memory() -> bool:
    """Ask glibc to give freed heap memory back to the system; False where it cannot.

    Freed results (spilled ones) may sit in the heap, counted in the RSS, until this.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# ----------------------------------------------------------------- the worker


class MemoryMonitor:
    """The worker's decisions on process memory, from one RSS reading at a time (`check`).

    The store may hold results until the RSS would reach the spill fraction: its
    ``ceiling`` is that fraction less the memory held outside the store (the RSS less the
    store's bytes, as last measured) and less the bytes reserved for allocations about to
    happen (``reserved``), so that it spills as results arrive rather than a reading later.
    Once the RSS passes the spill fraction, the ceiling drops to the target fraction less
    that memory, until the RSS is back under the target. Above the pause fraction (the RSS
    plus the reservations) the worker should be paused (``paused``), and back under, resumed.
    Thread-safe: task threads reserve while the event loop checks.
    """

    def __init__(self, data: SpillBuffer, limit: int, fractions: MemoryFractions) -> None:
        self.data = data
        self.limit = limit
        self.fractions = fractions
        #: the latest RSS reading
        self.rss = 0
        #: whether the worker should be paused now
        self.paused = False
        #: above the spill fraction lately, and not back under the target yet
        self.spilling = False
        self._warned_unmanaged = False
        #: gives freed memory back to the system (`trim_memory`), tried while spilling
        self.trim: Callable[[], object] = trim_memory
        self._checks = 0
        #: bytes promised to allocations under way or about to start (tasks, fetches)
        self.reserved = 0
        self._lock = threading.RLock()

    @property
    def spills(self) -> bool:
        """Whether the store spills at all (a target or a spill fraction is set)."""
        return self.fractions.target is not None or self.fractions.spill is not None

    @property
    def line(self) -> int | None:
        """Bytes the RSS plus the reservations should stay under: the target fraction (else
        the lowest of spill, pause and terminate that is set); None if every one is off.
        The band from the target up to the spill fraction is left to what no reservation
        foresees: data being sent to peers, buffers, the interpreter's own."""
        f = self.fractions
        for fraction in (f.target, f.spill, f.pause, f.terminate):
            if fraction is not None:
                return int(fraction * self.limit)
        return None

    def change_reserved(self, delta: int, rss: int | None = None) -> None:
        """Add ``delta`` (negative: give back) to ``reserved``, and act on it at once
        (with ``rss``, a fresh reading, if given)."""
        with self._lock:
            self.reserved = max(0, self.reserved + delta)
            self.check(self.rss if rss is None else rss)

    def check(self, rss: int) -> None:
        with self._lock:
            self._check(rss)

    def _check(self, rss: int) -> None:
        self.rss = rss
        self._checks += 1
        f, limit = self.fractions, self.limit
        reserved = self.reserved
        if f.spill is not None:
            spill_at = f.spill * limit
            target = (f.target if f.target is not None else f.spill) * limit
            if rss > spill_at:
                self.spilling = True
            elif rss <= target:
                self.spilling = False
                self._warned_unmanaged = False
            unmanaged = max(0, rss - self.data.memory_bytes)
            line = target if self.spilling else spill_at
            if reserved:  # room for them under their own line (`line`), which may be lower
                line = min(line, self.line or line)
            self.data.ceiling = max(0, int(line - unmanaged - reserved))
            if self.spilling:
                if self._checks % 10 == 1:  # about once a second at most
                    self.trim()
                if self.data.spillable_bytes() == 0 and not self._warned_unmanaged:
                    self._warned_unmanaged = True
                    logger.warning(
                        "worker %s: process memory %s is above %d%% of its limit %s with"
                        " nothing left to spill: memory held outside stored results (a leak,"
                        " or large task temporaries)?", self.data.name, format_bytes(rss),
                        f.spill * 100, format_bytes(limit))  # fmt: skip
        elif f.target is not None:
            # Spilling by the target only: reservations still make room under it.
            unmanaged = max(0, rss - self.data.memory_bytes)
            self.data.ceiling = (max(0, int(f.target * limit - unmanaged - reserved))
                                 if reserved else None)  # fmt: skip
        if f.pause is not None:
            paused = rss + reserved > f.pause * limit
            if paused != self.paused:
                self.paused = paused
                if paused:
                    logger.warning("worker %s paused: process memory %s is above %d%% of its"
                                   " limit %s", self.data.name, format_bytes(rss),
                                   f.pause * 100, format_bytes(limit))  # fmt: skip
                else:
                    logger.info("worker %s resumed: process memory %s", self.data.name,
                                format_bytes(rss))  # fmt: skip


class WorkerMemory:
    """A worker's memory management: its store (``data``) and, when it has a limit, the
    monitor that `run` drives. The worker keeps it; `close` removes the spilled files."""

    def __init__(self, name: str, limit: int, fractions: MemoryFractions | None = None,
                 spill_directory: str | None = None, in_process: bool = False,
                 interval: float = 0.02) -> None:  # fmt: skip
        self.limit = limit
        self.fractions = fractions or MemoryFractions()
        #: seconds between RSS readings: often, as results can pile up faster than the disk
        #: takes them within 100 ms (a reading costs some microseconds)
        self.interval = interval
        f = self.fractions
        target = int(limit * f.target) if limit and f.target is not None else None
        self.data = SpillBuffer(target, spill_directory, name=name)
        #: bytes of inputs in flight at most (`WorkerState.transfer_limit`)
        self.transfer_limit = (int(limit * f.transfer)
                               if limit and f.transfer is not None else None)  # fmt: skip
        #: None without a limit, and in-process (the RSS is not the worker's alone)
        self.monitor = (MemoryMonitor(self.data, limit, f)
                        if limit and not in_process else None)  # fmt: skip
        if self.monitor is not None:
            self.monitor.trim = self._trim
        #: the worker's loop (`run`), whose executor trims; a trim in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trimming = False
        self._proc = psutil.Process(os.getpid())
        #: result sizes by key prefix (`expected_result`), and the last results' sizes
        self._results: dict[str, int] = {}
        self._recent: collections.deque[int] = collections.deque(maxlen=16)
        #: bytes allocated since the last immediate check (`check_now`)
        self._unchecked = 0

    # ------------------------------------------------- acting before allocating

    def read_rss(self) -> int:
        """The process's RSS now (bytes): a few microseconds."""
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):  # not Linux
            return int(self._proc.memory_info().rss)

    def expected_result(self, key: str) -> int:
        """Bytes a task's result is likely to take: as much as the last of its kind (same key
        prefix), else the largest of the last results here."""
        size = self._results.get(key_prefix(key))
        if size is not None:
            return size
        return max(self._recent, default=0)

    def note_result(self, key: str, nbytes: int) -> None:
        self._results[key_prefix(key)] = nbytes
        if len(self._results) > 1000:
            self._results.clear()  # many kinds of tasks: start over rather than grow
        self._recent.append(nbytes)

    def reserve(self, nbytes: int, timeout: float = 30.0) -> int:
        """Reserve ``nbytes`` for an allocation about to happen on this (task) thread, once
        they fit: wait until the RSS plus every reservation is under `MemoryMonitor.line`,
        the store spilling meanwhile. Goes ahead anyway when nothing more can be spilled, or
        after ``timeout`` seconds. Returns what was reserved (give it back with `release`)."""
        monitor = self.monitor
        line = monitor.line if monitor is not None else None
        if monitor is None or line is None or nbytes < SMALL_BYTES:
            return 0
        deadline = time.monotonic() + timeout
        # Reserved at once, even while waiting: it lowers the store's ceiling, so it spills.
        monitor.change_reserved(nbytes, self.read_rss())
        while True:
            rss = self.read_rss()
            with monitor._lock:
                monitor.check(rss)
                if (rss + monitor.reserved <= line or not monitor.spills
                        or self.data.spillable_bytes() == 0):  # fmt: skip
                    return nbytes
            if self.data.closed:
                return nbytes
            if time.monotonic() >= deadline:
                logger.warning("worker %s: %s more would bring the process to %s, over %s;"
                               " going on", self.data.name, format_bytes(nbytes),
                               format_bytes(rss + monitor.reserved), format_bytes(line))  # fmt: skip
                return nbytes
            # The spill thread writes meanwhile; the RSS drops as each value leaves memory.
            self.data.wait_for_change(0.01)

    async def reserve_async(self, nbytes: int, timeout: float = 10.0) -> int:
        """`reserve`, on the event loop (for a fetch from a peer)."""
        monitor = self.monitor
        line = monitor.line if monitor is not None else None
        if monitor is None or line is None or nbytes < SMALL_BYTES:
            return 0
        deadline = time.monotonic() + timeout
        monitor.change_reserved(nbytes, self.read_rss())
        while time.monotonic() < deadline and not self.data.closed:
            rss = self.read_rss()
            monitor.check(rss)
            if (rss + monitor.reserved <= line or not monitor.spills
                    or self.data.spillable_bytes() == 0):  # fmt: skip
                break
            await asyncio.sleep(0.01)
        return nbytes

    def release(self, nbytes: int) -> None:
        """Give back a reservation: what it was for is allocated (counted in the RSS) or
        freed."""
        if self.monitor is not None and nbytes:
            self.monitor.change_reserved(-nbytes, self.read_rss())

    def check_now(self, worker: Worker, nbytes: int) -> None:
        """Read the RSS and act on it now, after ``nbytes`` were allocated, not at the next
        poll; small allocations wait for the poll until they add up to `SMALL_BYTES`."""
        if self.monitor is None:
            return
        self._unchecked += nbytes
        if self._unchecked < SMALL_BYTES:
            return
        self._unchecked = 0
        self.monitor.check(self.read_rss())
        self._sync_pause(worker)

    def _sync_pause(self, worker: Worker) -> None:
        assert self.monitor is not None
        state = worker.state
        # Compared with the state each time: a reconnect starts a fresh, unpaused one.
        if state is not None and state.paused != self.monitor.paused and not worker._closing:
            worker._handle([PauseEvent("memory-monitor", self.monitor.paused)])

    def _trim(self) -> None:
        """`trim_memory`, on the loop's executor: it walks the whole heap (milliseconds for
        a big one) and the monitor calls it under its lock, from the event loop too."""
        loop = self._loop
        if self._trimming or loop is None:
            return
        self._trimming = True

        def trim() -> None:
            try:
                trim_memory()
            finally:
                self._trimming = False

        try:
            loop.call_soon_threadsafe(loop.run_in_executor, None, trim)
        except RuntimeError:  # the loop closed: the worker is going away
            self._trimming = False

    async def run(self, worker: Worker) -> None:
        """Read the RSS every ``interval`` and act on it, until cancelled."""
        if self.monitor is None:
            return
        self._loop = asyncio.get_running_loop()
        while True:
            self.monitor.check(self.read_rss())
            self._sync_pause(worker)
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self.data.close()
