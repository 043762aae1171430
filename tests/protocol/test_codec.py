"""Codec: batches of messages <-> frame parts, and what it refuses."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from shoal.protocol.codec import Codec, ProtocolError, decode_handshake, encode_handshake
from shoal.protocol.messages import (
    PROTOCOL_VERSION,
    DataReply,
    Heartbeat,
    Hello,
    Reject,
    Reply,
    Welcome,
)
from shoal.protocol.serialize import MIN_OOB_BYTES, Serialized, deserialize, serialize


def roundtrip(msgs: list[object]) -> list[object]:
    parts = Codec().encode(msgs)  # type: ignore[arg-type]
    # What a reader gets: each part as its own memoryview.
    return list(Codec().decode([memoryview(bytes(p)) for p in parts]))


def test_mixed_batch_round_trips() -> None:
    msgs = [
        Hello(version=PROTOCOL_VERSION, role="worker", name="w", token="t", pid=3),
        Heartbeat(executing=1, ready=2, memory=3, cpu=0.25),
        Reply(rid=1, value={"a": [1, "two", None], "b": b"\x00"}),
        Reply(rid=2, value=serialize("nested"), error=None),
        DataReply(rid=3, data={"x": serialize(1), "y": serialize([1, 2])}, missing=["z"]),
    ]
    assert roundtrip(msgs) == msgs


def test_large_buffers_go_out_of_band_and_come_back_without_a_copy() -> None:
    array = np.arange(1_000_000, dtype="f8")
    parts = Codec().encode([DataReply(rid=1, data={"a": serialize(array)})])
    assert len(parts) == 2 and memoryview(parts[1]).nbytes == array.nbytes
    received = [memoryview(bytes(parts[0])), memoryview(bytearray(parts[1]))]
    (msg,) = Codec().decode(received)
    assert isinstance(msg, DataReply)
    result = deserialize(msg.data["a"])
    assert np.array_equal(result, array)
    assert np.shares_memory(result, np.frombuffer(received[1], dtype="f8"))
    assert result.flags.writeable


def test_small_buffers_stay_in_band() -> None:
    small = np.arange(10, dtype="i1")
    assert serialize(small).nbytes < MIN_OOB_BYTES
    parts = Codec().encode([Reply(rid=1, value=serialize(small))])
    assert len(parts) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage",
        b"\x91\x92\xa5reply",  # a reply without its rid
        b"\x91\x92\xa7unknown\x01",  # unknown tag
        b"\x91\x92\xa5reply\xa2\xff\xfe",  # invalid UTF-8 where an int goes
        b"\x91\x93\xa5reply\x01\xa2\xff\xfe",  # invalid UTF-8 in a string
        b"\x91\x93\xa5reply\x01" + b"\x91" * 100_000 + b"\x01",  # absurdly deep nesting
        b"\x91\x93\xa5reply\x01\xc7\x01\x07\x00",  # unknown extension type
        b"\x91\x93\xa5reply\x01\xc7\x02\x01\x91\x05",  # reference to a missing part
        b"\x91\x93\xa5reply\x01\xc7\x02\x01\x91\xc3",  # reference given as a bool
        b"\x91\x93\xa5reply\x01\xc7\x01\x01\xc1",  # malformed serialized value
    ],
)
def test_malformed_bodies_raise_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        Codec().decode([memoryview(body), memoryview(b"spare part")])


def test_random_corruption_raises_only_protocol_error() -> None:
    msgs = [
        Heartbeat(executing=1),
        Reply(rid=1, value={"key": "value" * 10, "ser": serialize(np.zeros(10_000))}),
    ]
    parts = [memoryview(bytes(p)) for p in Codec().encode(msgs)]
    body = bytes(parts[0])
    rng = random.Random(7)
    codec = Codec()
    for _ in range(3000):
        corrupt = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        del corrupt[rng.randrange(len(corrupt) + 1) :]
        try:
            codec.decode([memoryview(bytes(corrupt)), *parts[1:]])
        except ProtocolError:
            pass
        try:
            decode_handshake([memoryview(bytes(corrupt))])
        except ProtocolError:
            pass


def test_handshake_round_trips() -> None:
    hello = Hello(version=PROTOCOL_VERSION, role="client", name="c", token="t")
    assert decode_handshake([memoryview(p) for p in encode_handshake(hello)]) == hello
    welcome = Welcome(version=PROTOCOL_VERSION, name="s")
    assert decode_handshake([memoryview(p) for p in encode_handshake(welcome)], Welcome) == welcome


def test_handshake_refuses_anything_but_one_hello() -> None:
    def parts(msgs: list[object]) -> list[memoryview]:
        return [memoryview(bytes(p)) for p in Codec().encode(msgs)]  # type: ignore[arg-type]

    hello = Hello(version=PROTOCOL_VERSION, role="client", name="c")
    with pytest.raises(ProtocolError):
        decode_handshake(parts([Reject(reason="no")]))
    with pytest.raises(ProtocolError):
        decode_handshake(parts([hello, hello]))
    with pytest.raises(ProtocolError):
        decode_handshake([*parts([hello]), memoryview(b"extra part")])
    # A Serialized payload is refused before anything could unpickle it.
    with pytest.raises(ProtocolError):
        decode_handshake(parts([Reply(rid=1, value=serialize(1))]))
    ext = msgspec.msgpack.encode(msgspec.msgpack.Ext(1, b"\x91\xa1x"))
    sneaky = b"\x91\x94\xa5hello\x01\xa6client" + ext
    with pytest.raises(ProtocolError):
        decode_handshake([memoryview(sneaky)])


def test_serialized_equality_compares_frames() -> None:
    assert Serialized([b"a", memoryview(b"bc")]) == Serialized([b"a", b"bc"])
    assert Serialized([b"a"]) != Serialized([b"b"])
