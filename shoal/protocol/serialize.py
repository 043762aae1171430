"""User objects <-> bytes: cloudpickle, protocol 5, out-of-band buffers.

A `Serialized` is opaque to the scheduler: it is carried and forwarded, never
unpickled there. Its first frame is the pickle stream, the rest are the
out-of-band buffers (NumPy arrays, bytes-like data) that pickle protocol 5
hands us without copying.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, Union

import cloudpickle

Buffer = Union[bytes, bytearray, memoryview]

#: Buffers smaller than this are kept in-band: a separate frame costs more than a copy.
MIN_OOB_BYTES = 64 * 1024


class SerializationError(TypeError):
    """An object could not be pickled; the message names the object."""


class Serialized:
    """A pickled object as frames: ``frames[0]`` the pickle stream, the rest its buffers."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Buffer]) -> None:
        self.frames = frames

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)

    def __repr__(self) -> str:
        return f"<Serialized {len(self.frames)} frames, {self.nbytes} bytes>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Serialized):
            return NotImplemented
        return [bytes(f) for f in self.frames] == [bytes(f) for f in other.frames]

    __hash__ = None  # type: ignore[assignment]


def _describe(obj: object) -> str:
    text = repr(obj)
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(obj).__qualname__} object {text}"


#: Types the standard pickler writes by value, exactly as cloudpickle would.
_PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _is_plain(obj: object, depth: int = 0) -> bool:
    """Small nests of plain values (a `map` call's arguments, mostly): the C pickler writes
    them several times faster than cloudpickle, whose per-object hook only matters for code."""
    kind = type(obj)
    if kind in _PLAIN_TYPES:
        return True
    if depth >= 3:
        return False
    # Exact types only: a subclass may pickle itself in its own way. Loops, not all():
    # this runs once per task of a map, and a generator costs more than the check.
    if (kind is tuple or kind is list) and isinstance(obj, (tuple, list)):
        if len(obj) > 16:
            return False
        for item in obj:
            if type(item) not in _PLAIN_TYPES and not _is_plain(item, depth + 1):
                return False
        return True
    if kind is dict and isinstance(obj, dict):
        if len(obj) > 16:
            return False
        for k, v in obj.items():
            if type(k) is not str or (type(v) not in _PLAIN_TYPES and not _is_plain(v, depth + 1)):
                return False
        return True
    return False


def serialize_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Serialized | None:
    """``serialize((args, kwargs))`` when they are small nests of plain values (no code, no
    futures inside); None for anything else. Inlined for the common shape: this runs once
    per task of a `map`."""
    if len(args) > 16 or len(kwargs) > 16:
        return None
    for value in args:
        if type(value) not in _PLAIN_TYPES and not _is_plain(value, 2):
            return None
    if kwargs:
        for k, value in kwargs.items():
            if type(k) is not str or (type(value) not in _PLAIN_TYPES
                                      and not _is_plain(value, 2)):  # fmt: skip
                return None
    if type(args) is not tuple or type(kwargs) is not dict:
        return None
    return Serialized([pickle.dumps((args, kwargs), protocol=5)])


def serialize(obj: object, what: str = "object") -> Serialized:
    """Pickle ``obj``; raise `SerializationError` naming ``what`` and the object on failure."""
    if _is_plain(obj):
        return Serialized([pickle.dumps(obj, protocol=5)])
    buffers: list[pickle.PickleBuffer] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        # Returning True keeps the buffer in-band.
        if buf.raw().nbytes < MIN_OOB_BYTES:
            return True
        buffers.append(buf)
        return False

    try:
        header = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {what} {_describe(obj)}: {type(exc).__name__}: {exc}"
        ) from exc
    frames: list[Buffer] = [header]
    frames.extend(b.raw() for b in buffers)
    return Serialized(frames)


def deserialize(ser: Serialized) -> Any:
    """Unpickle a `Serialized`; its buffers are used in place, not copied."""
    frames: Sequence[Buffer] = ser.frames
    return pickle.loads(frames[0], buffers=frames[1:])


def dumps_function(fn: object) -> bytes:
    """Pickle a function on its own; used to cache and deduplicate task functions."""
    try:
        payload: bytes = cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize function {_describe(fn)}: {type(exc).__name__}: {exc}"
        ) from exc
    return payload
