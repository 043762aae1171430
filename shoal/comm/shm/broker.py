"""Handing segment fds between processes of one host: a unix socket per worker.

Each worker runs a `Broker`: one daemon thread serving a Linux abstract-namespace
SOCK_SEQPACKET socket (``\\0shoal-shm-<hex>``: nothing on disk to leak). Nothing is
unpickled from it: requests and answers are fixed structs, fds ride as SCM_RIGHTS.
- pull: a receiver shows (segment id, token) pairs it got in an authenticated DataReply
  and gets the fds;
- push: a client hands fds with tokens; the worker keeps them `PUSH_TTL` seconds for the
  UpdateData (over TCP/TLS) that claims them by token, and closes the unclaimed ones.
Every connection is checked: the peer's uid (SO_PEERCRED) must be ours, or root.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence

from .segments import Segment, new_token

logger = logging.getLogger("shoal.shm")

__all__ = ["Broker", "PullError", "pull", "push"]

_MAGIC = b"SHM1"
_HEAD = struct.Struct("<4sBH")  # magic, op or status, count
_PULL_ITEM = struct.Struct("<Q16s")  # segment id, token
_PUSH_ITEM = struct.Struct("<16s")  # token
_PULL, _PUSH = 1, 2
_OK, _REFUSED = 0, 1
#: fds per message (the kernel's SCM_MAX_FD is 253)
MAX_FDS = 64
#: a connection's requests and answers must come within this
CONN_TIMEOUT = 5.0
#: seconds a pushed fd waits for its UpdateData
PUSH_TTL = 60.0
#: how often the serving thread wakes to drop expired pushes
_TICK = 0.5


class PullError(ConnectionError):
    """A segment could not be had from its holder (gone, token refused, timed out)."""


def _peer_ok(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid() or uid == 0)


class Broker:
    """A worker's segment endpoint (see the module's docstring). `start`, then `export`
    segments to be pulled and `claim` pushed ones; `stop` joins the thread and closes
    every fd it still holds."""

    def __init__(self) -> None:
        #: the abstract socket's name, as peers are told it ("" until started)
        self.endpoint = ""
        self._lock = threading.Lock()
        self._exports: dict[int, tuple[bytes, Segment]] = {}
        self._next_id = 1
        #: token -> (fd, expiry on the monotonic clock)
        self._pushed: dict[bytes, tuple[int, float]] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: requests refused (bad uid, bad token): for tests
        self.refused = 0

    def start(self) -> str:
        name = f"shoal-shm-{secrets.token_hex(8)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + name)
            sock.listen(64)
            sock.settimeout(_TICK)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.endpoint = name
        self._thread = threading.Thread(target=self._serve, name="shoal-shm-broker", daemon=True)
        self._thread.start()
        return name

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if sock is not None:
            sock.close()
        with self._lock:
            pushed, self._pushed = self._pushed, {}
            self._exports.clear()
        for fd, _expiry in pushed.values():
            _close(fd)

    # ------------------------------------------------------------ registry

    def export(self, segment: Segment) -> tuple[int, bytes]:
        """Let ``segment`` be pulled against the returned (id, token) until `unexport`."""
        token = new_token()
        with self._lock:
            seg_id = self._next_id
            self._next_id += 1
            self._exports[seg_id] = (token, segment)
        return seg_id, token

    def unexport(self, seg_id: int) -> None:
        with self._lock:
            self._exports.pop(seg_id, None)

    def claim(self, token: bytes) -> int | None:
        """The fd pushed with ``token`` (now the caller's to close), or None."""
        with self._lock:
            item = self._pushed.pop(token, None)
        return None if item is None else item[0]

    def pending(self) -> int:
        """Pushed fds not claimed yet (for tests)."""
        with self._lock:
            return len(self._pushed)

    # ------------------------------------------------------------- serving

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping:
            self._expire()
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping:
                    return
                time.sleep(_TICK)  # out of fds, say: do not spin
                continue
            try:
                with conn:
                    conn.settimeout(CONN_TIMEOUT)
                    self._handle(conn)
            except OSError as exc:
                logger.debug("shared-memory request failed: %s", exc)
            except Exception:  # noqa: BLE001 - one bad request must not stop the thread
                logger.exception("shared-memory request failed")

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [t for t, (_fd, expiry) in self._pushed.items() if expiry < now]
            fds = [self._pushed.pop(t)[0] for t in old]
        for fd in fds:
            _close(fd)
        if fds:
            logger.info("closed %d pushed segments never claimed", len(fds))

    def _handle(self, conn: socket.socket) -> None:
        if not _peer_ok(conn):
            self.refused += 1
            logger.warning("refused a shared-memory request from another user")
            return
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 64 + MAX_FDS * 32, MAX_FDS)
            if not msg:
                for fd in fds:
                    _close(fd)
                return
            if len(msg) < _HEAD.size:
                raise OSError("short request")
            magic, op, count = _HEAD.unpack_from(msg)
            if magic != _MAGIC or count > MAX_FDS:
                raise OSError("bad request")
            if op == _PULL:
                for fd in fds:
                    _close(fd)
                self._answer_pull(conn, msg, count)
            elif op == _PUSH:
                self._accept_push(conn, msg, count, fds)
            else:
                raise OSError("bad request")

    def _answer_pull(self, conn: socket.socket, msg: bytes, count: int) -> None:
        if len(msg) != _HEAD.size + count * _PULL_ITEM.size:
            raise OSError("bad pull request")
        dups: list[int] = []
        try:
            with self._lock:  # dup under the lock: a segment closed meanwhile is not sent
                for i in range(count):
                    seg_id, token = _PULL_ITEM.unpack_from(msg, _HEAD.size + i * _PULL_ITEM.size)
                    item = self._exports.get(seg_id)
                    if item is None or not hmac.compare_digest(item[0], token):
                        break
                    dups.append(item[1].dup())
            if len(dups) != count:
                self.refused += 1
                conn.sendall(_HEAD.pack(_MAGIC, _REFUSED, 0))
                return
            socket.send_fds(conn, [_HEAD.pack(_MAGIC, _OK, count)], dups)
        finally:
            for fd in dups:
                _close(fd)

    def _accept_push(self, conn: socket.socket, msg: bytes, count: int,
                     fds: list[int]) -> None:  # fmt: skip
        if len(fds) != count or len(msg) != _HEAD.size + count * _PUSH_ITEM.size:
            for fd in fds:
                _close(fd)
            raise OSError("bad push request")
        expiry = time.monotonic() + PUSH_TTL
        with self._lock:
            for i, fd in enumerate(fds):
                (token,) = _PUSH_ITEM.unpack_from(msg, _HEAD.size + i * _PUSH_ITEM.size)
                old = self._pushed.get(token)
                self._pushed[token] = (fd, expiry)
                if old is not None:
                    _close(old[0])
        conn.sendall(_HEAD.pack(_MAGIC, _OK, count))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _connect(endpoint: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect("\0" + endpoint)
    except BaseException:
        sock.close()
        raise
    return sock


def pull(endpoint: str, items: Sequence[tuple[int, bytes]], timeout: float = 10.0) -> list[int]:
    """The fds of segments (id, token) from the broker at ``endpoint``, in order; the caller
    closes them. Raises `PullError` (none are left open) when any cannot be had."""
    deadline = time.monotonic() + timeout
    got: list[int] = []
    try:
        sock = _connect(endpoint, timeout)
        with sock:
            for start in range(0, len(items), MAX_FDS):
                chunk = items[start:start + MAX_FDS]
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.sendall(_HEAD.pack(_MAGIC, _PULL, len(chunk))
                             + b"".join(_PULL_ITEM.pack(i, t) for i, t in chunk))  # fmt: skip
                msg, fds, _flags, _addr = socket.recv_fds(sock, 64, MAX_FDS)
                got.extend(fds)
                if len(msg) < _HEAD.size:
                    raise PullError(f"shared-memory endpoint {endpoint} closed the connection")
                magic, status, count = _HEAD.unpack_from(msg)
                if magic != _MAGIC or status != _OK or count != len(chunk) or len(fds) != count:
                    raise PullError(f"shared-memory endpoint {endpoint} refused the segments"
                                    " (released meanwhile?)")  # fmt: skip
    except BaseException as exc:
        for fd in got:
            _close(fd)
        if isinstance(exc, PullError):
            raise
        if isinstance(exc, (OSError, socket.timeout)):
            raise PullError(f"could not pull segments from {endpoint} within {timeout}s:"
                            f" {exc}") from exc  # fmt: skip
        raise
    return got


def push(endpoint: str, items: Sequence[tuple[bytes, int]], timeout: float = 10.0) -> None:
    """Hand (token, fd) pairs to the broker at ``endpoint`` (our fds stay ours to close)."""
    deadline = time.monotonic() + timeout
    try:
        with _connect(endpoint, timeout) as sock:
            for start in range(0, len(items), MAX_FDS):
                chunk = items[start:start + MAX_FDS]
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                socket.send_fds(sock, [_HEAD.pack(_MAGIC, _PUSH, len(chunk))
                                       + b"".join(_PUSH_ITEM.pack(t) for t, _ in chunk)],
                                [fd for _, fd in chunk])  # fmt: skip
                msg = sock.recv(64)
                if len(msg) < _HEAD.size or _HEAD.unpack_from(msg) != (_MAGIC, _OK, len(chunk)):
                    raise PullError(f"shared-memory endpoint {endpoint} refused the push")
    except (OSError, socket.timeout) as exc:
        if isinstance(exc, PullError):
            raise
        raise PullError(f"could not push segments to {endpoint} within {timeout}s:"
                        f" {exc}") from exc  # fmt: skip
