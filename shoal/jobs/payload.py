"""User values <-> bytes for jobs: arguments, results and exceptions (cloudpickle, protocol 5).

Arguments are pickled at enqueue so that one that cannot be serialized fails there, with
an error naming it, and never reaches a worker.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from ..protocol.serialize import SerializationError


def _describe(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def dump_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call's arguments, or raise `SerializationError` naming the bad argument."""
    try:
        return bytes(cloudpickle.dumps((args, kwargs), protocol=5))
    except Exception:
        pass
    labelled = [(f"argument {i}", a) for i, a in enumerate(args)]
    labelled += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in labelled:
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot enqueue job {name!r}: {label} ({type(value).__qualname__} "
                f"{_describe(value)}) cannot be serialized: {type(exc).__name__}: {exc}"
            ) from exc
    raise SerializationError(f"cannot enqueue job {name!r}: its arguments cannot be serialized")


def load_arguments(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = pickle.loads(data)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise TypeError("payload is not (args, kwargs)")
    return args, kwargs


def dump_result(value: object) -> bytes:
    """Pickle a job's return value (`SerializationError` if it cannot be)."""
    try:
        return bytes(cloudpickle.dumps(value, protocol=5))
    except Exception as exc:
        raise SerializationError(
            f"the job's result ({type(value).__qualname__} {_describe(value)}) cannot be "
            f"serialized: {type(exc).__name__}: {exc}"
        ) from exc


def dump_exception(exc: BaseException) -> bytes | None:
    """Pickle an exception so that ``result()`` can raise its own type; None if it cannot
    be pickled or unpickled (then the caller sees `JobFailed` with the text)."""
    try:
        data = bytes(cloudpickle.dumps(exc, protocol=5))
        pickle.loads(data)
    except Exception:
        return None
    return data


def load(data: bytes) -> Any:
    return pickle.loads(data)
