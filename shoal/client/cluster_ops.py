"""What the client asks of the cluster rather than of its keys: who holds what, the
scheduler's state and logs, running a function on every worker, retiring and restarting
workers (`ClusterMixin`, a base of `Client`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from ..comm.rpc import next_rid
from ..protocol.messages import (
    Identity,
    Nthreads,
    RestartRequest,
    RetireWorkersRequest,
    RunOnWorkers,
    SchedulerLogs,
    Story,
    WhoHas,
    WorkerDeaths,
    WorkerLogs,
)
from ..protocol.serialize import deserialize, serialize
from .future import Future

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ClusterMixin"]


class ClusterMixin:
    """Cluster-wide queries and controls of `Client` (kept apart from the client's own code)."""

    # --------------------------------------------------------------- queries

    def who_has(self, futures: Iterable[Future] | None = None) -> Any:
        client = cast("Client", self)
        keys = None if futures is None else [f.key for f in futures]
        return client._sync(client._request(WhoHas(next_rid(), keys)))

    def nthreads(self) -> Any:
        client = cast("Client", self)
        return client._sync(client._request(Nthreads(next_rid())))

    ncores = nthreads

    def scheduler_info(self) -> Any:
        client = cast("Client", self)
        return client._sync(client._request(Identity(next_rid())))

    def story(self, key: str | Future) -> Any:
        client = cast("Client", self)
        k = key.key if isinstance(key, Future) else key
        return client._sync(client._request(Story(next_rid(), k)))

    def worker_deaths(self) -> Any:
        """Worker processes that died lately and were restarted by their nanny, oldest
        first: ``[{"address", "name", "reason", "time"}]``, where reason is e.g. "signal
        SIGKILL", "exit code 1" or "memory: RSS 190.2 MiB of limit 200.0 MiB"."""
        client = cast("Client", self)
        return client._sync(client._request(WorkerDeaths(next_rid())))

    # ---------------------------------------------------------- observability

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the scheduler's dashboard, or None when it serves none."""
        client = cast("Client", self)
        if client._dashboard_link is None:
            local = getattr(client.cluster, "dashboard_link", None)
            if local is not None:
                client._dashboard_link = str(local)
            elif client.status == "running" and not client.asynchronous:
                client._dashboard_link = str(client.scheduler_info().get("dashboard") or "")
        return client._dashboard_link or None

    def get_scheduler_logs(self, n: int = 1000) -> Any:
        """The scheduler's newest ``n`` log records, oldest first, as ``(time, level,
        logger, message)`` tuples (those that passed the ``shoal`` logger's level: see
        ``SHOAL_LOG_LEVEL``)."""
        client = cast("Client", self)

        async def go() -> list[tuple[Any, ...]]:
            rows = await client._request(SchedulerLogs(next_rid(), n))
            return [tuple(row) for row in rows]

        return client._sync(go())

    def get_worker_logs(self, n: int = 1000, workers: list[str] | None = None) -> Any:
        """Each worker's newest ``n`` log records: ``{address: [(time, level, logger,
        message), ...]}`` (``workers``: addresses or names; all by default). A worker that
        did not answer maps to ``{"error": text}``."""
        client = cast("Client", self)

        async def go() -> dict[str, Any]:
            replies = await client._request(WorkerLogs(next_rid(), n, workers))
            return {address: [tuple(row) for row in rows] if isinstance(rows, list) else rows
                    for address, rows in replies.items()}  # fmt: skip

        return client._sync(go())

    def run(self, fn: Callable[..., Any], *args: Any, workers: list[str] | None = None,
            **kwargs: Any) -> Any:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` once on every worker; returns ``{address: result}``."""
        client = cast("Client", self)
        packed = serialize(lambda: fn(*args, **kwargs), "function")

        async def go() -> dict[str, Any]:
            replies = await client._request(RunOnWorkers(next_rid(), packed, workers))
            out: dict[str, Any] = {}
            for address, answer in replies.items():
                if not answer.get("ok"):
                    if answer.get("result") is not None:
                        error = deserialize(answer["result"])
                        if not isinstance(error, Exception) and not client.asynchronous:
                            # KeyboardInterrupt...: raised on the client's loop it would stop
                            # it; the caller's thread raises it instead (below).
                            raise _CarriedError(error)
                        raise error
                    raise ConnectionError(f"worker {address}: {answer.get('error')}")
                out[address] = deserialize(answer["result"])
            return out

        try:
            return client._sync(go())
        except _CarriedError as carried:
            raise carried.error from None

    def retire_workers(self, workers: list[str] | None = None, n: int | None = None,
                       timeout: float = 60.0) -> Any:  # fmt: skip
        """Gracefully stop workers: results only they hold move to other workers first.

        ``workers``: addresses (or names) to retire; or ``n``: retire that many, those
        holding the least data. Returns the addresses that left within ``timeout``."""
        client = cast("Client", self)

        async def go() -> list[str]:
            info = await client._request(Identity(next_rid()))
            by_name = {w["name"]: a for a, w in info["workers"].items()}
            if workers is not None:
                chosen = [by_name.get(w, w) for w in workers]
            else:
                ranked = sorted(info["workers"], key=lambda a: info["workers"][a]["nbytes"])
                chosen = ranked[: n or 0]
            gone: list[str] = await client._request(
                RetireWorkersRequest(next_rid(), chosen, timeout), timeout=timeout + 10)
            return gone

        return client._sync(go())

    def restart(self, timeout: float = 60.0) -> Any:
        """Restart every worker: all tasks and data are dropped (pending futures fail as
        lost); returns once as many workers as before are back, or after ``timeout``."""
        client = cast("Client", self)

        async def go() -> int:
            count: int = await client._request(RestartRequest(next_rid(), timeout),
                                             timeout=timeout + 10)  # fmt: skip
            return count

        return client._sync(go())

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> Any:
        client = cast("Client", self)
        async def go() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (timeout if timeout is not None else 60)
            while True:
                info = await client._request(Identity(next_rid()))
                if len(info["workers"]) >= n_workers:
                    return
                if loop.time() > deadline:
                    raise TimeoutError(f"only {len(info['workers'])} of {n_workers} workers"
                                       f" arrived within {timeout}s")  # fmt: skip
                await asyncio.sleep(0.05)

        return client._sync(go())


class _CarriedError(Exception):
    """A function's exception that is not an `Exception` (KeyboardInterrupt, SystemExit...),
    carried off the client's event loop to be raised in the caller's thread."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error
