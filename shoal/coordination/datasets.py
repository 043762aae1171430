"""Named datasets: `Client.publish_dataset`, `get_dataset`, `list_datasets`, `unpublish_dataset`.

A dataset names a key the scheduler holds (under ``dataset:NAME``) until it is unpublished,
so it outlives the client that published it. A plain object is scattered to the workers
first (the scheduler never holds user data); readers get back what was published: the
object for a plain object, a `Future` for a future.

`DatasetsMixin` is a base of `Client`; with an asynchronous client each method returns an
awaitable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ..comm.rpc import next_rid
from ..protocol.messages import DatasetGet, DatasetList, DatasetPublish, DatasetUnpublish
from .requests import request

if TYPE_CHECKING:
    from ..client.client import Client
    from ..client.future import Future


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


NO_DEFAULT: Any = _NoDefault()


class DatasetsMixin:
    """Dataset methods of `Client` (kept apart from the client's own code)."""

    def publish_dataset(self, override: bool = False, **datasets: Any) -> Any:
        """Publish each keyword as a named dataset: ``publish_dataset(x=future, y=obj)``.

        Futures are published as they are; other objects are scattered first. All or nothing:
        a name already published raises ``KeyError`` unless ``override``.
        """
        client = _client(self)
        if not datasets:
            raise TypeError("publish_dataset needs at least one name=value")
        if client.asynchronous:
            return _publish_async(client, datasets, override)
        futures, scattered = _split(datasets)
        if scattered:
            futures.update(zip(scattered, client.scatter([datasets[n] for n in scattered])))
        client._sync(_publish(client, futures, scattered, override, _inner(datasets, scattered)))
        return None

    def get_dataset(self, name: str, default: Any = NO_DEFAULT) -> Any:
        """The dataset ``name`` (a `Future`, or the object that was published);
        ``default`` if given and there is none, else ``KeyError``."""
        client = _client(self)
        if client.asynchronous:
            return _get_async(client, name, default)
        found = client._sync(request(client, DatasetGet(next_rid(), name)))
        if found is None:
            return _missing(name, default)
        future, scattered = _adopt(client, found)
        return future.result() if scattered else future

    def list_datasets(self) -> Any:
        """The names of the published datasets, sorted."""
        client = _client(self)
        return client._sync(request(client, DatasetList(next_rid())))

    def unpublish_dataset(self, name: str) -> Any:
        """Forget the dataset ``name`` (``KeyError`` if there is none); its key is released
        unless something else holds it."""
        client = _client(self)
        return client._sync(request(client, DatasetUnpublish(next_rid(), name)))


def _client(obj: DatasetsMixin) -> Client:
    return cast("Client", obj)


def _split(datasets: dict[str, Any]) -> tuple[dict[str, Future], list[str]]:
    from ..client.future import Future

    futures = {n: v for n, v in datasets.items() if isinstance(v, Future)}
    return futures, [n for n in datasets if n not in futures]


def _inner(datasets: dict[str, Any], scattered: list[str]) -> dict[str, list[str]]:
    """The keys of the futures inside each plain object (``publish_dataset(x=[f1, f2])``):
    the dataset must hold them too, or they go once the publisher lets its futures go."""
    from ..client.data import _collect_futures

    inner: dict[str, list[str]] = {}
    for name in scattered:
        found: list[Future] = []
        _collect_futures(datasets[name], found)
        if found:
            inner[name] = sorted({f.key for f in found})
    return inner


async def _publish(client: Client, futures: dict[str, Future], scattered: list[str],
                   override: bool, inner: dict[str, list[str]]) -> None:  # fmt: skip
    # The futures (and the objects holding inner ones) are alive until the scheduler has
    # answered, so their keys are still held by this client when the scheduler starts
    # holding them for the datasets.
    msg = DatasetPublish(next_rid(), {n: f.key for n, f in futures.items()}, scattered, override,
                         inner)  # fmt: skip
    await request(client, msg)


async def _publish_async(client: Client, datasets: dict[str, Any], override: bool) -> None:
    futures, scattered = _split(datasets)
    if scattered:
        placed = await client.scatter([datasets[n] for n in scattered])
        futures.update(zip(scattered, placed))
    await _publish(client, futures, scattered, override, _inner(datasets, scattered))


async def _get_async(client: Client, name: str, default: Any) -> Any:
    found = await request(client, DatasetGet(next_rid(), name))
    if found is None:
        return _missing(name, default)
    future, scattered = _adopt(client, found)
    return await future if scattered else future


def _adopt(client: Client, found: list[Any]) -> tuple[Future, bool]:
    """A future for a key the scheduler just made this client want (see `GiveKey`)."""
    from ..client.future import Future

    key, scattered = found
    future = Future(key, client)
    client.want([future])  # asks the scheduler to report the key's state to us again
    return future, bool(scattered)


def _missing(name: str, default: Any) -> Any:
    if default is NO_DEFAULT:
        raise KeyError(f"no dataset named {name!r} is published")
    return default
