"""Shared-memory segments: sealed memfds that hold a value's out-of-band pickle buffers.

A segment is an anonymous memory file (``memfd_create``): the kernel frees it when the last
fd and mapping go, so no process, not even one SIGKILLed, can leak one (there is nothing in
/dev/shm). The writer fills it, then seals it (no shrink, grow or write) so that a reader
knows it cannot change under it. Readers map it MAP_PRIVATE and writable: reading shares the
pages, writing copies only the touched page (copy-on-write), so a task that writes into its
input never changes anybody else's copy.

Each open segment fd counts against a per-process budget (`fd_budget`): beyond it callers
fall back to the socket.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import resource
import secrets
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ...protocol.serialize import Buffer

__all__ = ["ALIGN", "Segment", "host_id", "layout", "fd_budget", "raise_fd_limit", "map_private"]

#: Offsets of buffers inside a segment are multiples of this (cache line, SIMD loads).
ALIGN = 64

#: pwrite chunk when huge pages are off: big enough to amortise the call, small enough
#: not to need a second copy in memory
_PWRITE_CHUNK = 64 << 20

_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4) | \
    getattr(fcntl, "F_SEAL_WRITE", 8)  # fmt: skip
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)

_host_id: str | None = None
_lock = threading.Lock()
#: segment fds this process holds open (ours and those kept by mmap objects)
_open_fds = 0
_budget: int | None = None


def host_id() -> str:
    """Same value in two processes = they can share segments (same kernel boot, same
    network namespace, which is what an abstract unix socket needs). "" where memfds or
    abstract sockets are not available: then nothing goes through shared memory."""
    global _host_id
    if _host_id is None:
        try:
            if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
                raise OSError("not Linux")
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            _host_id = f"{boot}/{os.readlink('/proc/self/ns/net')}"
        except OSError:
            _host_id = ""
    return _host_id


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: segments hold fds."""
    global _budget
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass
    with _lock:
        _budget = None  # measured again


def fd_budget() -> int:
    """Segment fds this process may still open: a quarter of the fd limit, less those open."""
    global _budget
    with _lock:
        if _budget is None:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            _budget = (soft if soft != resource.RLIM_INFINITY else 1 << 20) // 4
        return _budget - _open_fds


def _count(n: int) -> None:
    global _open_fds
    with _lock:
        _open_fds += n


def open_fds() -> int:
    """Segment fds this process holds (for tests)."""
    return _open_fds


def layout(lengths: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``lengths`` packed at `ALIGN`-byte boundaries, and the size."""
    offsets = []
    end = 0
    for n in lengths:
        offsets.append(end)
        end = -(-(end + n) // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def _huge_pages_allowed() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            current = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return False
    return current in ("always", "within_size", "advise", "force")


#: mmap's own dup of the fd: Python < 3.13 cannot map without one
_MMAP_DUPS = sys.version_info < (3, 13)


def map_private(fd: int, size: int) -> mmap.mmap:
    """Map a sealed segment copy-on-write (no MAP_POPULATE: on a private writable mapping it
    would copy every page). On Python < 3.13 the map keeps a dup of the fd while it lives."""
    kwargs: dict[str, Any] = {} if _MMAP_DUPS else {"trackfd": False}
    mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                   **kwargs)  # fmt: skip
    return mm


class Segment:
    """One memfd: `create` it, `fill` it, `seal` it; then hand its fd out or `map` it.
    `close` closes our fd (mappings made from it stay valid)."""

    __slots__ = ("fd", "size", "_closed")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._closed = False
        _count(1)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        fd = os.memfd_create(f"shoal-{name[:40]}",
                             os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size)

    @classmethod
    def adopt(cls, fd: int) -> Segment:
        """A segment fd received from another process: checked sealed, sized by fstat."""
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
            if seals & _SEALS != _SEALS:
                raise OSError("segment is not sealed")
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size)

    def fill(self, buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
        """Copy ``buffers`` in at ``offsets``. With huge pages allowed for shmem, through a
        shared mapping advised MADV_HUGEPAGE (page allocation is most of the cost with 4K
        pages); else with pwrite, which beats a 4K-page mapping."""
        views = [memoryview(b).cast("B") for b in buffers]
        if _huge_pages_allowed() and hasattr(mmap, "MADV_HUGEPAGE"):
            mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
                for view, off in zip(views, offsets):
                    mm[off:off + view.nbytes] = view
            finally:
                mm.close()  # no writable shared mapping may remain for the seal
            return
        for view, off in zip(views, offsets):
            done = 0
            while done < view.nbytes:
                done += os.pwrite(self.fd, view[done:done + _PWRITE_CHUNK], off + done)

    def seal(self) -> None:
        fcntl.fcntl(self.fd, _F_ADD_SEALS, _SEALS)

    def map(self) -> mmap.mmap:
        return map_private(self.fd, self.size)

    def dup(self) -> int:
        return os.dup(self.fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            _count(-1)

    @property
    def closed(self) -> bool:
        return self._closed


def new_token() -> bytes:
    """A segment's secret: whoever shows it may have the fd."""
    return secrets.token_bytes(16)


def close_fd(fd: int) -> None:
    """Close a received segment fd we will not use."""
    try:
        os.close(fd)
    except OSError:
        pass
