"""Shared memory between the client and worker processes of one host, its off switch, and
the lifetime of segments (released everywhere, or a process SIGKILLed: nothing holds one)."""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest

import shoal
from shoal.comm import shm
from shoal.testing import gen_cluster, wait_until
from shoal.worker.context import get_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests
pytestmark = pytest.mark.skipif(not shm.host_id(), reason="needs Linux memfds")

N = 13_000_000  # 104 MB of float64
SUM = float(N * (N - 1) // 2)


def make(n: int) -> np.ndarray:
    return np.arange(n, dtype="f8")


def total(x: np.ndarray, _: int = 0) -> float:
    return float(x.sum())


def stats(key: str = "") -> dict[str, object]:
    w = get_worker()
    return {"in": w.shm.bytes_in, "out": w.shm.bytes_out, "backed": bool(key) and
            w.data.segment(key) is not None, "pid": os.getpid()}  # fmt: skip


def on(client: shoal.Client, address: str, key: str = "") -> dict[str, object]:
    return client.submit(stats, key, workers=[address], pure=False).result(timeout=30)


def memfd_holders(pids: list[int]) -> dict[int, list[str]]:
    """Segments (fds and mappings named memfd:shoal) each live process of ``pids`` holds."""
    out: dict[int, list[str]] = {}
    for pid in pids:
        found: list[str] = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if "memfd:shoal" in target:
                    found.append(f"fd {fd}: {target}")
            with open(f"/proc/{pid}/maps") as f:
                found += [line.strip() for line in f if "memfd:shoal" in line]
        except FileNotFoundError:
            continue  # gone
        if found:
            out[pid] = found
    return out


def processes(client: shoal.Client) -> list[int]:
    """This process (the client) and the live worker processes."""
    return [os.getpid(), *client.run(os.getpid).values()]


def wait_no_segments(client: shoal.Client) -> None:
    wait_until(lambda: not memfd_holders(processes(client)), timeout=20,
               message="segments still held")  # fmt: skip


def test_gather_and_scatter_through_segments() -> None:
    """Given worker processes on our host, a gathered 104 MB array arrives through a segment
    (mapped, not copied) and a scattered one leaves through one; once released, no process
    holds a segment."""
    with gen_cluster(n_workers=2, processes=True, timeout=120) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, N, workers=[a])
        got = x.result(timeout=60)
        assert client.bytes_in_shared >= N * 8
        assert float(got.sum()) == SUM and got.flags.writeable  # copy-on-write
        assert on(client, a, x.key)["backed"]

        data = np.ones(N)
        s = client.scatter(data, workers=[b])
        assert client.bytes_out_shared >= N * 8
        assert client.submit(total, s, workers=[b]).result(timeout=60) == float(N)
        assert on(client, b, s.key)["backed"] and on(client, b)["in"] >= N * 8
        del got, x, s
        wait_no_segments(client)


def test_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """SHOAL_COMM__SHARED_MEMORY=false: everything goes through the socket."""
    monkeypatch.setenv("SHOAL_COMM__SHARED_MEMORY", "false")
    with gen_cluster(n_workers=2, processes=True, timeout=120) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, N, workers=[a])
        assert client.submit(total, x, workers=[b]).result(timeout=60) == SUM
        assert float(x.result(timeout=60).sum()) == SUM
        s = client.scatter(np.ones(N), workers=[b])
        assert client.submit(total, s, workers=[a]).result(timeout=60) == float(N)
        assert client.bytes_in_shared == client.bytes_out_shared == 0
        for w in (a, b):
            counts = on(client, w)
            assert counts["in"] == counts["out"] == 0
        assert not memfd_holders(processes(client))


def test_released_everywhere_leaves_no_segment() -> None:
    with gen_cluster(n_workers=2, processes=True, timeout=120) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, N, workers=[a])
        y = client.submit(total, x, workers=[b])
        assert y.result(timeout=60) == SUM
        assert memfd_holders(processes(client))  # held while x lives
        del x, y
        wait_no_segments(client)


@pytest.mark.parametrize("victim", ["holder", "receiver"])
def test_sigkill_leaves_no_segment(victim: str) -> None:
    """SIGKILL the worker that made x (the holder) or the one that received it through a
    segment: the computation still finishes (x is recomputed where needed), and once x is
    released no surviving process holds a segment."""
    with gen_cluster(n_workers=2, processes=True, timeout=120) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, N, workers=[a], allow_other_workers=True)
        assert client.submit(total, x, workers=[b]).result(timeout=60) == SUM
        assert on(client, b)["in"] >= N * 8
        dead = a if victim == "holder" else b
        pid = on(client, dead)["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: dead not in client.scheduler_info()["workers"], timeout=30,
                   message="the scheduler still lists the killed worker")  # fmt: skip
        # Whoever is left (and the nanny's new worker) still computes with x.
        z = client.submit(total, x, 1, pure=False)
        assert z.result(timeout=60) == SUM
        del x, z
        assert pid not in processes(client)
        wait_no_segments(client)
