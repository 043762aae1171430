"""Batches of messages <-> frame parts.

A frame is a list of parts: part 0 is the MessagePack body (a list of messages), the rest
are the large out-of-band buffers of the `Serialized` values inside, referenced from the
body by index so they are never copied into it.

Inside the body a `Serialized` is a MessagePack extension (code 1) whose data is a list of
items, one per frame: ``bytes`` kept in-band, or an ``int`` index of an out-of-band part.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .messages import Hello, Message, Msg
from .serialize import MIN_OOB_BYTES, Buffer, Serialized

EXT_SERIALIZED = 1

#: What msgspec raises on hostile input: besides its own errors, invalid UTF-8 in a string
#: raises UnicodeDecodeError and deep nesting raises RecursionError.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


class ProtocolError(ValueError):
    """A peer sent something that is not a valid shoal message."""


class Codec:
    """Encodes and decodes message batches. Not thread-safe: one per connection direction."""

    def __init__(self) -> None:
        self._oob_out: list[Buffer] = []
        self._oob_in: list[memoryview] = []
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._inner_encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(
            list[Message], ext_hook=self._ext_hook, dec_hook=_dec_hook
        )
        self._inner_decoder = msgspec.msgpack.Decoder(list[Any])

    # -- encoding

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, Serialized):
            items: list[Any] = []
            for frame in obj.frames:
                view = memoryview(frame)
                if view.nbytes < MIN_OOB_BYTES:
                    items.append(frame if isinstance(frame, bytes) else view.tobytes())
                else:
                    items.append(len(self._oob_out) + 1)  # part 0 is the body
                    self._oob_out.append(view.cast("B") if view.format != "B" else view)
            return msgspec.msgpack.Ext(EXT_SERIALIZED, self._inner_encoder.encode(items))
        raise TypeError(f"cannot encode {type(obj).__name__} in a shoal message")

    def encode(self, msgs: list[Msg]) -> list[Buffer]:
        """Encode a batch; returns the frame's parts (body first)."""
        self._oob_out = []
        try:
            body = self._encoder.encode(msgs)
            return [body, *self._oob_out]
        finally:
            self._oob_out = []

    # -- decoding

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != EXT_SERIALIZED:
            raise ProtocolError(f"unknown extension type {code}")
        items = self._inner_decoder.decode(data)
        frames: list[Buffer] = []
        for item in items:
            if isinstance(item, bytes):
                frames.append(item)
            elif type(item) is int and 0 < item <= len(self._oob_in):  # not a bool
                frames.append(self._oob_in[item - 1])
            else:
                raise ProtocolError("bad out-of-band reference in a serialized value")
        return Serialized(frames)

    def decode(self, parts: list[memoryview]) -> list[Message]:
        """Decode one frame's parts into its messages; raises `ProtocolError` on bad input."""
        if not parts:
            raise ProtocolError("empty frame")
        self._oob_in = parts[1:]
        try:
            return self._decoder.decode(parts[0])
        except _DECODE_ERRORS as exc:
            raise ProtocolError(f"malformed message: {exc}") from exc
        finally:
            self._oob_in = []


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Serialized and isinstance(obj, Serialized):
        return obj
    raise msgspec.ValidationError(f"expected {typ.__name__}, got {type(obj).__name__}")


def _reject_ext(code: int, data: memoryview) -> Any:
    raise ProtocolError("no serialized values are accepted before the handshake")


_hello_decoder = msgspec.msgpack.Decoder(list[Hello], ext_hook=_reject_ext)
_hello_encoder = msgspec.msgpack.Encoder()


def decode_handshake(parts: list[memoryview], expected: type[Msg] = Hello) -> Msg:
    """Decode the first message of a connection: exactly one ``expected`` struct, no payloads."""
    if len(parts) != 1:
        raise ProtocolError("handshake frame must have exactly one part")
    decoder = (
        _hello_decoder
        if expected is Hello
        else msgspec.msgpack.Decoder(list[expected], ext_hook=_reject_ext)  # type: ignore[valid-type]
    )
    try:
        msgs = decoder.decode(parts[0])
    except (*_DECODE_ERRORS, ProtocolError) as exc:
        raise ProtocolError(f"bad handshake: {exc}") from exc
    if len(msgs) != 1:
        raise ProtocolError("handshake frame must hold exactly one message")
    return msgs[0]


def encode_handshake(msg: Msg) -> list[Buffer]:
    return [_hello_encoder.encode([msg])]
