"""Segments and the broker on their own: no cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from shoal.comm import shm
from shoal.comm.shm import broker as broker_mod
from shoal.comm.shm.segments import Segment, layout, open_fds
from shoal.protocol.codec import Codec
from shoal.protocol.messages import DataReply, GetData, SharedRef, UpdateData
from shoal.protocol.serialize import deserialize, serialize

pytestmark = pytest.mark.skipif(not shm.host_id(), reason="needs Linux memfds")


@pytest.fixture
def broker():
    b = shm.Broker()
    b.start()
    before = open_fds()
    yield b
    b.stop()
    assert open_fds() <= before


def test_layout_aligns_buffers() -> None:
    offsets, size = layout([1, 100, 64, 0])
    assert offsets == [0, 64, 192, 256]
    assert size == 256


def test_round_trip_through_a_segment(broker: shm.Broker) -> None:
    """Given a value with big buffers, when shared and pulled by its ref, then the receiver's
    copy equals it, is writable copy-on-write, and writing it leaves the holder's intact."""
    array = np.arange(1 << 18, dtype="f8")  # 2 MiB
    ser = serialize({"a": array, "b": b"x" * (1 << 20)})
    assert shm.buffer_bytes(ser) >= shm.SHM_MIN_BYTES
    held = shm.share(ser, "k", broker)
    ref = held.ref()
    (fd,) = shm.pull(broker.endpoint, [(ref.segment, ref.token)])
    got = shm.adopt(ref, fd, None)
    value = deserialize(got.serialized())
    assert np.array_equal(value["a"], array) and value["b"] == b"x" * (1 << 20)
    value["a"][0] = -1.0  # copy-on-write: our page only
    assert deserialize(held.serialized())["a"][0] == 0.0
    with pytest.raises(OSError):  # sealed
        os.write(held.segment.fd, b"no")
    del value
    got.close()
    held.close()


def test_pull_with_a_wrong_token_is_refused(broker: shm.Broker) -> None:
    held = shm.share(serialize(np.zeros(1 << 18)), "k", broker)
    try:
        with pytest.raises(shm.PullError):
            shm.pull(broker.endpoint, [(held.seg_id, b"\0" * 16)])
        with pytest.raises(shm.PullError):
            shm.pull(broker.endpoint, [(held.seg_id + 99, held.token)])
        assert broker.refused == 2
    finally:
        held.close()
    with pytest.raises(shm.PullError):  # released: gone
        shm.pull(broker.endpoint, [(held.seg_id, held.token)])


def test_pull_from_a_missing_endpoint_fails_fast() -> None:
    with pytest.raises(shm.PullError):
        shm.pull("shoal-shm-nobody", [(1, b"\0" * 16)], timeout=1.0)


def test_peer_of_another_uid_is_refused(broker: shm.Broker) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as another user")
    held = shm.share(serialize(np.zeros(1 << 18)), "k", broker)
    try:
        # The child drops to nobody before it connects (SO_PEERCRED is taken at connect);
        # it speaks the request by hand: the venv may not be readable by nobody.
        request = broker_mod._HEAD.pack(broker_mod._MAGIC, broker_mod._PULL, 1) + \
            broker_mod._PULL_ITEM.pack(held.seg_id, held.token)
        code = ("import os, socket, sys\n"
                "os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                "s.settimeout(10)\n"
                f"s.connect({chr(0) + broker.endpoint!r})\n"
                "try:\n"
                f"    s.send({request!r})\n"
                "    msg, fds, _, _ = socket.recv_fds(s, 64, 4)\n"
                "except (ConnectionResetError, BrokenPipeError):  # refused: closed on us\n"
                "    fds = []\n"
                "sys.exit(3 if not fds else 4)\n")
        proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
        assert proc.returncode == 3, proc.stderr
        assert broker.refused == 1
    finally:
        held.close()


def test_push_claim_and_expiry(broker: shm.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushed fds wait for their claim by token; unclaimed ones are closed after the TTL."""
    seg = Segment.create("push", 4096)
    seg.seal()
    try:
        shm.push(broker.endpoint, [(b"a" * 16, seg.fd)])
        fd = broker.claim(b"a" * 16)
        assert fd is not None and broker.claim(b"a" * 16) is None
        os.close(fd)
        monkeypatch.setattr(broker_mod, "PUSH_TTL", 0.0)
        shm.push(broker.endpoint, [(b"b" * 16, seg.fd)])
        deadline = time.monotonic() + 10
        while broker.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.pending() == 0
        assert broker.claim(b"b" * 16) is None
    finally:
        seg.close()


def test_unsealed_segment_is_not_adopted() -> None:
    seg = Segment.create("open", 4096)
    fd = seg.dup()
    try:
        with pytest.raises(OSError):
            Segment.adopt(fd)
    finally:
        seg.close()


def test_messages_carry_shared_refs() -> None:
    ref = SharedRef(b"hdr", 3, b"t" * 16, [0, 64], [10, 20], 33)
    for msg in (GetData(1, ["k"], host="h"), DataReply(2, {}, [], {"k": ref}, "ep"),
                UpdateData(3, {}, {"k": ref})):
        codec = Codec()
        (back,) = codec.decode([memoryview(bytes(p)) for p in codec.encode([msg])])
        assert back == msg


def test_read_copy_when_a_segment_cannot_be_mapped(broker: shm.Broker) -> None:
    array = np.arange(1 << 18, dtype="f8")
    held = shm.share(serialize(array), "k", broker)
    try:
        ref = held.ref()
        (fd,) = shm.pull(broker.endpoint, [(ref.segment, ref.token)])
        copy = shm.values.read_copy(ref, fd)
        assert np.array_equal(deserialize(copy), array)
    finally:
        held.close()
