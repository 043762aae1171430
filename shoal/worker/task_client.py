"""The client a worker makes for its tasks (`shoal.get_client()` inside a task)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.client import Client
    from ..security.credentials import Security

__all__ = ["TaskClients"]


class TaskClients:
    """A worker's client for its tasks: made on first use (from any task thread, once),
    closed when the worker closes. Closing never waits for a client being made: that one
    closes itself once made."""

    def __init__(self, scheduler_address: str, token: str | None, name: str,
                 timeout: float, security: Security | None = None) -> None:  # fmt: skip
        self.scheduler_address = scheduler_address
        self.token = token
        #: the worker's TLS credentials: its certificate must also hold the client role
        self.security = security
        self.name = name
        self.timeout = timeout
        self._client: Client | None = None
        #: guards ``_client`` and ``_closed`` (held briefly, never while connecting)
        self._lock = threading.Lock()
        #: one task thread makes the client; the others wait for it
        self._making = threading.Lock()
        self._closed = False

    def get(self) -> Client:
        client = self._client
        if client is not None and client.status == "running":
            return client
        with self._making:
            with self._lock:
                if self._closed:
                    raise self._closing_error()
                if self._client is not None and self._client.status == "running":
                    return self._client
            from ..client.client import Client

            client = Client(self.scheduler_address, token=self.token, name=f"{self.name}-tasks",
                            timeout=self.timeout, set_as_default=False,
                            security=self.security)  # fmt: skip
            with self._lock:
                if not self._closed:
                    self._client = client
                    return client
            client.close(timeout=self.timeout)  # the worker closed while we connected
            raise self._closing_error()

    def _closing_error(self) -> RuntimeError:
        return RuntimeError(f"worker {self.name} is closing: no client for its tasks")

    def close(self, timeout: float = 10.0) -> None:
        """Close the client (blocking; call it off the worker's event loop)."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close(timeout=timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._client else "unused"
        return f"<TaskClients {self.name} {state}>"
