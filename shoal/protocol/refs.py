"""Futures inside task arguments, as they cross the wire.

When a client pickles a task's arguments it collects every future it meets (at any depth,
also inside user objects) as a dependency and pickles it as a call to `resolve_ref`. On the
worker, unpickling the arguments inside `providing(data)` puts the dependency's value right
where the future was, with no walk over the arguments.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

_local = threading.local()


class MissingDependency(KeyError):
    """A task's argument refers to a key the worker does not hold."""


def resolve_ref(key: str) -> Any:
    """Unpickling hook: the value of dependency ``key`` on the worker running the task."""
    data: Mapping[str, Any] | None = getattr(_local, "data", None)
    if data is not None:
        try:
            return data[key]
        except KeyError:
            raise MissingDependency(key) from None
    rebuild: Callable[[str], Any] | None = getattr(_local, "rebuild", None)
    if rebuild is not None:
        return rebuild(key)
    raise MissingDependency(key)


@contextmanager
def providing(data: Mapping[str, Any]) -> Iterator[None]:
    """Within this block, unpickled references resolve to ``data[key]``."""
    previous = getattr(_local, "data", None)
    _local.data = data
    try:
        yield
    finally:
        _local.data = previous


@contextmanager
def collecting() -> Iterator[list[str]]:
    """Within this block, pickled futures record their keys in the yielded list."""
    previous = getattr(_local, "collected", None)
    keys: list[str] = []
    _local.collected = keys
    try:
        yield keys
    finally:
        _local.collected = previous


def collected_keys() -> list[str] | None:
    """The list futures being pickled should add their key to, or None outside `collecting`."""
    result: list[str] | None = getattr(_local, "collected", None)
    return result


@contextmanager
def rebuilding(rebuild: Callable[[str], Any]) -> Iterator[None]:
    """Outside a task, references unpickle through ``rebuild(key)`` (e.g. into futures)."""
    previous = getattr(_local, "rebuild", None)
    _local.rebuild = rebuild
    try:
        yield
    finally:
        _local.rebuild = previous
