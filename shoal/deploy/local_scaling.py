"""`scale` and `adapt` for a `LocalCluster`, which lives on its client's event loop.

`LocalScaler` is called from other threads (the user's, the adaptive thread): it starts
workers through the cluster's loop (``asyncio.run_coroutine_threadsafe``, with a deadline)
and observes and retires them through its own client connection to the cluster's
scheduler, the same way a deployed cluster does, so retirement moves results first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

from .adaptive import Adaptive, AdaptivePolicy, Decision, Observation, WorkerLoad

if TYPE_CHECKING:
    from ..client.client import Client
    from ..cluster.local import LocalCluster

__all__ = ["LocalScaler"]


class LocalScaler:
    """Scales one `LocalCluster` (see the module's docstring); `close` before the cluster."""

    def __init__(self, cluster: LocalCluster, loop: asyncio.AbstractEventLoop,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.cluster = cluster
        self.loop = loop
        self.timeout = timeout
        self.adaptive: Adaptive | None = None
        self._client: Client | None = None
        #: guards ``_client`` and serialises scaling steps
        self._lock = threading.Lock()

    def _on_loop(self, coro: Any) -> Any:
        if _running_loop() is self.loop:
            coro.close()
            raise RuntimeError("LocalCluster.scale/adapt block: call them from another thread"
                               " than the cluster's event loop (e.g. with a synchronous"
                               " Client)")  # fmt: skip
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"local cluster operation did not finish within"
                               f" {self.timeout}s") from None  # fmt: skip

    def _control(self) -> Client:
        from ..client.client import Client

        if self._client is None:
            cluster = self.cluster
            security = None if cluster.security is None else cluster.security.for_role("client")
            self._client = Client(cluster.scheduler_address, token=cluster.token,
                                  security=security, set_as_default=False,
                                  name="local-cluster-scaler")  # fmt: skip
        return self._client

    # ------------------------------------------------------------------ scaling

    def scale(self, n: int) -> None:
        """Have ``n`` workers: start more, or retire the extra ones (results moved first)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"scale: n must be an int >= 0, got {n!r}")
        with self._lock:
            self._on_loop(self.cluster._prune_workers())
            info = self._control().scheduler_info()
            workers = info["workers"]  # retired ones are gone from it: retire_workers waits
            have = len({w["name"] for w in workers.values()} | self.cluster.starting_names())
            if n > have:
                self._on_loop(self.cluster._add_workers(n - have))
            elif n < have:
                ranked = sorted(workers, key=lambda a: (workers[a]["processing"],
                                                        workers[a]["nbytes"]))  # fmt: skip
                self._retire(ranked[: have - n])

    def _retire(self, addresses: list[str] | tuple[str, ...]) -> None:
        if addresses:
            self._control().retire_workers(list(addresses), timeout=self.timeout)
            self._on_loop(self.cluster._prune_workers())

    def adapt(self, policy: AdaptivePolicy, interval: float) -> Adaptive:
        if self.adaptive is not None:
            self.adaptive.stop()
        self.adaptive = Adaptive(self, policy, interval)
        return self.adaptive

    def adaptive_observe(self) -> Observation:
        info = self._control().scheduler_info()
        workers = tuple(WorkerLoad(a, int(w["nthreads"]), int(w["processing"]), int(w["nbytes"]))
                        for a, w in info["workers"].items())  # fmt: skip
        load = info.get("workload") or {}
        connected = {w["name"] for w in info["workers"].values()}
        pending = len(self.cluster.starting_names() - connected)
        return Observation(workers, pending, int(load.get("tasks", 0)),
                           float(load.get("seconds", 0.0)),
                           self.cluster.threads_per_worker)  # fmt: skip

    def adaptive_apply(self, decision: Decision) -> None:
        with self._lock:
            self._retire(decision.retire)
        if decision.scale_to is not None:
            self.scale(decision.scale_to)

    def get_logs(self, n: int = 1000) -> dict[str, str]:
        """The scheduler's and each worker's newest ``n`` log records: name -> text."""
        client = self._control()
        out = {"scheduler": _format(client.get_scheduler_logs(n))}
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        for address, rows in client.get_worker_logs(n).items():
            out[names.get(address, address)] = (_format(rows) if isinstance(rows, list)
                                                else str(rows))  # fmt: skip
        return out

    def close(self) -> None:
        """Stop adapting and close the control connection (blocking: not on the loop)."""
        if self.adaptive is not None:
            self.adaptive.stop()
            self.adaptive = None
        with self._lock:
            if self._client is not None:
                self._client.close(timeout=10)
                self._client = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _format(rows: list[tuple[Any, ...]]) -> str:
    return "\n".join(f"{t} {level} {name} {message}" for t, level, name, message in rows)
