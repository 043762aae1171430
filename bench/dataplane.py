"""Data-plane helpers for bench_core.py: the raw socket floor and the network-namespace hosts.

The raw floor is what two processes get from plain blocking sockets on the same path: the
sender ``sendall``s a ready buffer, the receiver ``recv_into`` a buffer it allocated (and
so touched) once, then answers one byte; the time is the sender's, from the first byte
to the answer. Each sample is a fresh pair of processes that first moves the size once
untimed (so the receive buffer is faulted in and the connection's windows have grown).

    python bench/dataplane.py recv HOST           # prints its port, serves one connection
    python bench/dataplane.py send HOST PORT NBYTES REPS   # prints the times as JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACK = b"k"


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed mid-transfer")
        got += n


def receiver(host: str) -> int:
    srv = socket.create_server((host, 0))
    srv.settimeout(60)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(300)
    buf = memoryview(bytearray(0))
    head = memoryview(bytearray(8))
    with conn:
        while True:
            _recv_exact(conn, head)
            n = int.from_bytes(head, "little")
            if n == 0:
                return 0
            if len(buf) < n:
                buf = memoryview(bytearray(n))  # allocated and zeroed once: pages are in
            _recv_exact(conn, buf[:n])
            conn.sendall(ACK)


def sender(host: str, port: int, nbytes: int, reps: int) -> int:
    data = bytearray(os.urandom(1 << 20)) * (nbytes >> 20) + bytearray(nbytes % (1 << 20))
    times = []
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.settimeout(300)
        for _ in range(reps + 1):  # the first one is the warm-up
            t0 = time.perf_counter()
            conn.sendall(len(data).to_bytes(8, "little"))
            conn.sendall(data)
            if conn.recv(1) != ACK:
                raise ConnectionError("no acknowledgement")
            times.append(time.perf_counter() - t0)
        conn.sendall((0).to_bytes(8, "little"))
    print(json.dumps(times[1:]), flush=True)
    return 0


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise RuntimeError(f"raw receiver printed no port within {timeout} s (rc {proc.poll()})")


def floor_times(nbytes: int, reps: int, recv_host: str = "127.0.0.1",
                recv_prefix: Sequence[str] = (), send_prefix: Sequence[str] = ()) -> list[float]:
    """``reps`` timed transfers of ``nbytes`` (after one warm-up) between two fresh processes;
    the prefixes (``ip netns exec NS``) put each in its namespace. Returns seconds."""
    me = [sys.executable, str(Path(__file__).resolve())]
    recv = subprocess.Popen([*recv_prefix, *me, "recv", recv_host], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        port = int(_read_line(recv, 30).strip())
        out = subprocess.run([*send_prefix, *me, "send", recv_host, str(port), str(nbytes),
                              str(reps)], capture_output=True, text=True, timeout=300,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"raw sender failed: {out.stderr[-2000:]}")
        recv.wait(30)
        return [float(t) for t in json.loads(out.stdout)]
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(10)
        if recv.stdout is not None:
            recv.stdout.close()


def netns_unavailable() -> str:
    """Why the namespace rows cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "not root (ip netns needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command"
    return ""


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for the block (children started in it inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "recv":
        sys.exit(receiver(sys.argv[2]))
    if len(sys.argv) == 6 and sys.argv[1] == "send":
        sys.exit(sender(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
