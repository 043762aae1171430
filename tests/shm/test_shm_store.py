"""A worker's store with shared values: counted like any value, segment closed when the key
goes (dropped, replaced, spilled), and one promotion for concurrent requests."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shoal.comm import shm
from shoal.comm.shm.segments import open_fds
from shoal.testing import wait_until
from shoal.worker.shared import WorkerShm
from shoal.worker.spill import Packed, SpillBuffer

pytestmark = pytest.mark.skipif(not shm.host_id(), reason="needs Linux memfds")

MB = 1 << 20


@pytest.fixture
def store():
    data = SpillBuffer(name="shm-test")
    worker = WorkerShm(data, enabled=True)
    worker.start()
    before = open_fds()
    yield data, worker
    data.close()
    worker.stop()
    assert open_fds() <= before


def test_promotion_counts_and_closes(store: tuple[SpillBuffer, WorkerShm]) -> None:
    """Given a 4 MB array in the store, when a same-host peer asks for it, then it is copied
    into a segment once, the stored value is the one made from the segment (counted at its
    full size), and dropping the key closes the segment."""
    data, worker = store
    value = np.arange(MB // 2, dtype="f8")
    data["x"] = value
    counted = data.memory_bytes
    ref, ser = worker.ref_for("x")
    assert ref is not None and ser is None and worker.promotions == 1
    held = data.segment("x")
    assert held is not None and data["x"] is not value
    assert np.array_equal(data["x"], value) and data.memory_bytes == counted
    assert worker.ref_for("x")[0] == ref and worker.promotions == 1  # no second copy
    data.validate()
    del data["x"]
    assert held.segment.closed and data.segment("x") is None
    with pytest.raises(shm.PullError):  # no longer handed out
        shm.pull(worker.endpoint, [(ref.segment, ref.token)])


def test_small_values_go_through_the_socket(store: tuple[SpillBuffer, WorkerShm]) -> None:
    data, worker = store
    data["small"] = np.zeros(1000)
    ref, ser = worker.ref_for("small")
    assert ref is None and ser is not None and data.segment("small") is None


def test_concurrent_requests_share_one_promotion(store: tuple[SpillBuffer, WorkerShm]) -> None:
    data, worker = store
    data["x"] = np.ones(4 * MB // 8)
    refs = []
    threads = [threading.Thread(target=lambda: refs.append(worker.ref_for("x")[0]))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert worker.promotions == 1 and len({r.segment for r in refs if r}) == 1 and all(refs)


def test_received_value_is_counted_and_spilled_without_its_segment(
        store: tuple[SpillBuffer, WorkerShm]) -> None:  # fmt: skip
    """A value received through a segment counts its full size; spilling it writes its bytes
    to disk and closes the segment; read back it is equal."""
    data, worker = store
    holder = SpillBuffer(name="holder")
    other = WorkerShm(holder, enabled=True)
    other.start()
    try:
        holder["x"] = np.arange(MB // 2, dtype="f8")
        ref, _ = other.ref_for("x")
        assert ref is not None
        got = worker.receive(other.endpoint, {"x": ref})
        assert worker.keep("x", got["x"], replace=False)
        assert isinstance(data["x"], Packed) and data.memory_bytes >= 4 * MB
        data.target = 0  # spill everything
        data.ceiling = 0
        wait_until(lambda: "x" in data.slow, timeout=10, message="x spilled")
        assert got["x"].segment.closed and data.segment("x") is None
        assert np.array_equal(data["x"], np.arange(MB // 2, dtype="f8"))
        data.validate()
    finally:
        holder.close()
        other.stop()


def test_holder_gone_between_reply_and_pull(store: tuple[SpillBuffer, WorkerShm]) -> None:
    """The holder answered with a ref, then went away (its broker with it): the pull fails
    (a failed gather for the worker), it does not hang, and nothing is stored."""
    data, worker = store
    holder = SpillBuffer(name="holder")
    other = WorkerShm(holder, enabled=True)
    other.start()
    holder["x"] = np.ones(MB)
    ref, _ = other.ref_for("x")
    endpoint = other.endpoint
    holder.close()
    other.stop()
    assert ref is not None
    with pytest.raises(shm.PullError):
        worker.receive(endpoint, {"x": ref})
    assert "x" not in data


def test_over_the_fd_cap_values_go_through_the_socket(
        store: tuple[SpillBuffer, WorkerShm], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from shoal.comm.shm import segments

    data, worker = store
    data["x"] = np.ones(MB)
    monkeypatch.setattr(segments, "_budget", segments.open_fds())  # no fd left to spend
    assert worker.wants() == ""  # a fetch asks for no segment
    ref, ser = worker.ref_for("x")
    assert ref is None and data.segment("x") is None and worker.promotions == 0
