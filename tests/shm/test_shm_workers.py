"""Shared memory between worker processes of one host: a value made on A, used on B."""

from __future__ import annotations

import os
import sys

import cloudpickle
import numpy as np
import pytest

import shoal
from shoal.comm import shm
from shoal.testing import gen_cluster
from shoal.worker.context import get_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests
pytestmark = pytest.mark.skipif(not shm.host_id(), reason="needs Linux memfds")

N = 13_000_000  # 104 MB of float64


def make(n: int) -> np.ndarray:
    return np.arange(n, dtype="f8")


def total(x: np.ndarray) -> float:
    return float(x.sum())


def stats(key: str = "") -> dict[str, object]:
    w = get_worker()
    seg = w.data.segment(key) if key else None
    return {"in": w.shm.bytes_in, "out": w.shm.bytes_out, "promotions": w.shm.promotions,
            "backed": seg is not None, "pid": os.getpid(),
            "stored": w.data.memory_bytes}


def on(client: shoal.Client, address: str, key: str = "") -> dict[str, object]:
    return client.submit(stats, key, workers=[address], pure=False).result(timeout=30)


def test_worker_to_worker_through_a_segment() -> None:
    """Given a 104 MB array made on A, when a task on B uses it, then it came through a
    segment (B's bytes_in_shared), A's stored value is now backed by that segment, and the
    result is right; A's store still counts the value's bytes."""
    with gen_cluster(n_workers=2, processes=True, timeout=120) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, N, workers=[a])
        y = client.submit(total, x, workers=[b])
        assert y.result(timeout=60) == float(N * (N - 1) // 2)
        on_a, on_b = on(client, a, x.key), on(client, b)
        assert on_b["in"] >= N * 8 and on_a["out"] >= N * 8
        assert on_a["promotions"] == 1 and on_a["backed"]
        assert on_a["stored"] >= N * 8  # counted against A's memory
        assert on(client, b, x.key)["backed"]  # B holds it from the segment too
