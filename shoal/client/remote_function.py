"""``@shoal.remote``: Ray's way of saying "run this in the cluster".

On a function: ``f.remote(*args, **kwargs)`` submits a call and returns a `Future`;
``f(*args)`` still runs here; ``f.options(priority=..., resources=..., retries=...,
workers=...)`` is a copy that submits with those options. Every ``.remote()`` call runs
(like Ray, unlike ``client.submit``'s pure keys): remote functions may have side effects.

On a class: ``Counter.remote(*args)`` creates an actor and returns its `Actor` handle at
once (the instance is made on a worker meanwhile; the first call waits for it);
``Counter(*args)`` is a plain local instance.

Work goes to `shoal.get_client()`: inside a task, its worker's client; elsewhere the
default client.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from .actor import Actor
from .annotate import check_options
from .future import Future
from ..worker.context import get_client

__all__ = ["ActorClass", "RemoteFunction", "remote"]

R = TypeVar("R")


class RemoteFunction(Generic[R]):
    """A function that runs locally when called, and in the cluster with `remote`."""

    def __init__(self, fn: Callable[..., R], options: dict[str, Any] | None = None) -> None:
        self._fn = fn
        self._options = check_options(dict(options or {}))
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self._fn(*args, **kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Future:
        """Submit ``fn(*args, **kwargs)``; returns its `Future`."""
        return get_client().submit(self._fn, *args, pure=False, **self._options, **kwargs)

    def options(self, **options: Any) -> RemoteFunction[R]:
        """A copy that submits with these task options on top of this one's."""
        return RemoteFunction(self._fn, {**self._options, **check_options(options)})

    def __repr__(self) -> str:
        return f"<RemoteFunction {getattr(self._fn, '__qualname__', self._fn)!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteFunction, (self._fn, self._options))


class ActorClass:
    """A class whose ``remote(*args)`` makes an actor in the cluster; calling it makes a
    plain local instance."""

    def __init__(self, cls: type, options: dict[str, Any] | None = None) -> None:
        self._cls = cls
        self._options = check_options(dict(options or {}))
        functools.update_wrapper(self, cls, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cls(*args, **kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Actor:
        """Create the actor on a worker; returns its handle at once."""
        client = get_client()
        future = client.submit(self._cls, *args, actor=True, **self._options, **kwargs)
        return Actor(self._cls, future.key, None, future, client)

    def options(self, **options: Any) -> ActorClass:
        """A copy that creates its actors with these task options (e.g. ``workers=``)."""
        return ActorClass(self._cls, {**self._options, **check_options(options)})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._cls, name)

    def __repr__(self) -> str:
        return f"<ActorClass {self._cls.__qualname__!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorClass, (self._cls, self._options))


@overload
def remote(obj: type, /) -> ActorClass: ...  # type: ignore[overload-overlap]  # a class first
@overload
def remote(obj: Callable[..., R], /) -> RemoteFunction[R]: ...
@overload
def remote(obj: None = None, /, **options: Any) -> Callable[[Any], Any]: ...


def remote(obj: Any = None, /, **options: Any) -> Any:
    """Make a function a `RemoteFunction`, or a class an `ActorClass`. Use it bare
    (``@shoal.remote``) or with task options (``@shoal.remote(retries=2)``)."""
    check_options(options)

    def wrap(target: Any) -> Any:
        if isinstance(target, type):
            return ActorClass(target, options)
        if callable(target):
            return RemoteFunction(target, options)
        raise TypeError(f"@remote needs a function or a class, got {type(target).__name__}")

    return wrap if obj is None else wrap(obj)
