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
every 20 ms. A result waits on its task's thread for room in
memory (`SpillBuffer.wait_for_room`), so tasks cannot outrun the disk. A worker in the
client's process (``in_process``) shares its RSS with everything else there, so it spills
by the target only and never pauses.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import re
import sys
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
    store's bytes, as last measured), so that it spills as results arrive rather than a
    reading later. Once the RSS passes the spill fraction, the ceiling drops to the target
    fraction less that memory, until the RSS is back under the target. Above the pause
    fraction the worker should be paused (``paused``), and back under, resumed.
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

    def check(self, rss: int) -> None:
        self.rss = rss
        self._checks += 1
        f, limit = self.fractions, self.limit
        if f.spill is not None:
            spill_at = f.spill * limit
            target = (f.target if f.target is not None else f.spill) * limit
            if rss > spill_at:
                self.spilling = True
            elif rss <= target:
                self.spilling = False
                self._warned_unmanaged = False
            unmanaged = max(0, rss - self.data.memory_bytes)
            self.data.ceiling = max(0, int((target if self.spilling else spill_at) - unmanaged))
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
        if f.pause is not None:
            paused = rss > f.pause * limit
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

    async def run(self, worker: Worker) -> None:
        """Read the RSS every ``interval`` and act on it, until cancelled."""
        if self.monitor is None:
            return
        proc = psutil.Process(os.getpid())
        while True:
            try:
                self.monitor.check(proc.memory_info().rss)
            except psutil.Error:  # pragma: no cover - our own process
                pass
            state = worker.state
            # Compared with the state each time: a reconnect starts a fresh, unpaused one.
            if state is not None and state.paused != self.monitor.paused and not worker._closing:
                worker._handle([PauseEvent("memory-monitor", self.monitor.paused)])
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self.data.close()
