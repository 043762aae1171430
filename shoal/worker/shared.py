"""A worker's side of same-host shared memory (`shoal.comm.shm`, docs/shared-memory.md).

`WorkerShm` runs the worker's `Broker` and turns stored values into segments and back:
- answering a same-host peer, a value with `SHM_MIN_BYTES` of buffers or more goes as a
  `SharedRef`: at once if a segment already backs it, else it is *promoted*: its buffers
  copied into a new segment and the stored value replaced by one made from our own mapping
  of it, so that both processes share one physical copy (concurrent requests for one key
  share one promotion);
- a fetched or scattered `SharedRef` becomes a `Packed` whose buffers are views of the
  mapping, stored with its segment (and exported again, for a third process).
The store (`SpillBuffer`) closes a key's segment when the key is dropped, replaced or
spilled. Runs on any thread: it touches only the store (locked) and its own state.
"""

from __future__ import annotations

import logging
import os
import threading

from ..comm.shm import (
    SHM_MIN_BYTES,
    Broker,
    PullError,
    SharedValue,
    adopt,
    buffer_bytes,
    can_hold,
    host_id,
    pull,
    share,
)
from ..comm.shm.segments import raise_fd_limit
from ..protocol.messages import SharedRef
from ..protocol.serialize import Serialized, deserialize, serialize
from .spill import Packed, SpillBuffer

logger = logging.getLogger("shoal.worker")

__all__ = ["WorkerShm", "PullError"]

#: seconds a request waits for another thread's promotion of the same key
PROMOTE_WAIT = 60.0
#: seconds a pull from a peer may take
PULL_TIMEOUT = 10.0


class WorkerShm:
    """Shared memory for one worker (off: ``host`` is "" and every method is a no-op)."""

    def __init__(self, data: SpillBuffer, enabled: bool) -> None:
        self.data = data
        self.enabled = enabled and bool(host_id())
        self.broker: Broker | None = None
        #: bytes sent and received through segments (counted, not timed, by tests)
        self.bytes_out = 0
        self.bytes_in = 0
        #: values copied into new segments
        self.promotions = 0
        self._lock = threading.Lock()
        self._promoting: dict[str, threading.Lock] = {}

    @property
    def host(self) -> str:
        """Our host id when serving shared memory, else ""."""
        return host_id() if self.broker is not None else ""

    @property
    def endpoint(self) -> str:
        return self.broker.endpoint if self.broker is not None else ""

    def start(self) -> None:
        if not self.enabled:
            return
        raise_fd_limit()
        broker = Broker()
        try:
            broker.start()
        except OSError as exc:
            logger.warning("no shared memory: cannot listen on a unix socket: %s", exc)
            return
        self.broker = broker

    def stop(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()

    def same_host(self, host: str) -> bool:
        """A requester that said ``host`` can take our segments."""
        return bool(host) and self.broker is not None and host == host_id()

    def wants(self) -> str:
        """The host to tell a peer we fetch from ("" when we cannot hold more segments)."""
        return self.host if self.broker is not None and can_hold() else ""

    # ---------------------------------------------------------- holder side

    def ref_for(self, key: str) -> tuple[SharedRef | None, Serialized | None]:
        """``key``'s value for a same-host peer: its `SharedRef`, or (None, its frames) when
        it goes through the socket (None, None: look it up as usual)."""
        assert self.broker is not None
        segment = self.data.segment(key)
        if segment is not None:
            return self._sent(segment), None
        with self._lock:
            lock = self._promoting.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=PROMOTE_WAIT):
            return None, None
        try:
            return self._promote(key)
        finally:
            lock.release()
            with self._lock:
                if self._promoting.get(key) is lock:
                    del self._promoting[key]

    def _sent(self, segment: SharedValue) -> SharedRef:
        with self._lock:  # two data threads may answer at once
            self.bytes_out += segment.nbytes
        return segment.ref()

    def _promote(self, key: str) -> tuple[SharedRef | None, Serialized | None]:
        segment = self.data.segment(key)  # promoted while we waited
        if segment is not None:
            return self._sent(segment), None
        if key not in self.data or self.data.disk_bytes([key]) or not can_hold():
            return None, None  # spilled ones are read from disk and sent as usual
        value = self.data.peek(key)
        ser = value.ser if isinstance(value, Packed) else serialize(value, key)
        if buffer_bytes(ser) < SHM_MIN_BYTES:
            return None, ser
        try:
            held = share(ser, key, self.broker)
        except OSError as exc:  # out of memory for the segment, say: the socket still works
            logger.warning("cannot put %s in shared memory: %s", key, exc)
            return None, ser
        try:
            new = Packed(held.serialized())
            if not isinstance(value, Packed):
                new = deserialize(new.ser)
        except BaseException:
            held.close()
            raise
        if not self.data.share(key, value, new, held):
            held.close()  # dropped or replaced meanwhile
            return None, ser
        with self._lock:
            self.promotions += 1
        return self._sent(held), None

    # -------------------------------------------------------- receiver side

    def receive(self, endpoint: str, refs: dict[str, SharedRef]) -> dict[str, SharedValue]:
        """Pull the segments of ``refs`` from ``endpoint`` and hold them (on a thread: it
        waits on the holder, up to `PULL_TIMEOUT`). Raises `PullError`."""
        items = list(refs.items())
        fds = pull(endpoint, [(ref.segment, ref.token) for _, ref in items], PULL_TIMEOUT)
        out: dict[str, SharedValue] = {}
        try:
            for i, (key, ref) in enumerate(items):
                fd, fds[i] = fds[i], -1
                out[key] = adopt(ref, fd, self.broker)
        except (OSError, ValueError) as exc:
            for held in out.values():
                held.close()
            for fd in fds:
                if fd >= 0:
                    _close(fd)
            raise PullError(f"bad segment from {endpoint}: {exc}") from exc
        return out

    def keep(self, key: str, held: SharedValue, replace: bool) -> bool:
        """Store ``held`` as ``key``'s value (a `Packed` of views of its mapping)."""
        if not self.data.put_shared(key, Packed(held.serialized()), held, replace):
            held.close()
            return False
        self.bytes_in += held.nbytes
        return True

    def claim(self, refs: dict[str, SharedRef]) -> dict[str, int]:
        """Store scattered values whose segments a client pushed: key -> nbytes. Raises
        LookupError when a token is unknown (never pushed, or expired)."""
        assert self.broker is not None
        got: dict[str, SharedValue] = {}
        try:
            for key, ref in refs.items():
                fd = self.broker.claim(ref.token)
                if fd is None:
                    raise LookupError(f"no pushed segment for {key} (expired?)")
                got[key] = adopt(ref, fd, self.broker)
        except BaseException:
            for held in got.values():
                held.close()
            raise
        nbytes = {}
        for key, held in got.items():
            nbytes[key] = held.nbytes
            self.keep(key, held, replace=True)
        return nbytes


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
