"""Client-side plumbing shared by the primitives and datasets: requests and their answers.

Everything here runs on the client's event loop. A wait is a future in the client's
``_replies`` table, so the client fails it (`FutureLostError`) when it closes or loses the
scheduler: no wait outlives its client.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..comm.rpc import next_rid
from ..exceptions import SchedulerGoneError
from ..protocol.messages import Msg, StopWaiting

if TYPE_CHECKING:
    from ..client.client import Client

#: How much longer than the scheduler's deadline a client waits for the scheduler to say
#: "timed out", before it gives up on its own (the scheduler is gone or partitioned away).
GRACE = 5.0

_ERRORS: dict[str, type[Exception]] = {
    "TimeoutError": TimeoutError,
    "ValueError": ValueError,
    "KeyError": KeyError,
    "TypeError": TypeError,
}


def check_running(client: Client) -> None:
    if client.status != "running":
        raise RuntimeError(f"the client is {client.status}; create a new Client")
    lost: str | None = getattr(client, "_scheduler_lost", None)
    if lost is not None:
        raise SchedulerGoneError(f"{lost}; create a new Client")


def register_wait(client: Client) -> tuple[int, asyncio.Future[Any]]:
    """A future the client fails if it closes first, under a fresh request id."""
    check_running(client)
    rid = next_rid()
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client._replies[rid] = fut
    return rid, fut


async def request(client: Client, msg: Msg, timeout: float | None = None) -> Any:
    """Send ``msg`` (which carries a fresh ``rid``) and return its `Reply`'s value.

    ``timeout`` is the one the scheduler enforces (None: wait until answered, or until the
    client closes). Raises the error the scheduler named (``TimeoutError``, ``KeyError``...).
    If the caller is cancelled, the scheduler is told to stop waiting (`StopWaiting`).
    """
    check_running(client)
    rid: int = msg.rid  # type: ignore[attr-defined]
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client._replies[rid] = fut
    client._send_now(msg)
    limit = None if timeout is None else max(timeout, 0) + GRACE
    try:
        reply = await asyncio.wait_for(fut, limit)
    except asyncio.TimeoutError:
        client._send_now(StopWaiting(rid))
        raise TimeoutError(f"no answer from the scheduler at {client.scheduler_address}"
                           f" within {limit}s") from None  # fmt: skip
    except asyncio.CancelledError:
        client._send_now(StopWaiting(rid))
        raise
    finally:
        client._replies.pop(rid, None)
    if reply.error:
        raise remote_error(reply.error)
    return reply.value


def send(client: Client, msg: Msg) -> None:
    """Send ``msg`` without waiting for anything (from any thread)."""
    check_running(client)
    client._send(msg)


def remote_error(text: str) -> Exception:
    """The exception a scheduler's error text names ("KeyError: ..." -> KeyError)."""
    name, sep, rest = text.partition(": ")
    cls = _ERRORS.get(name) if sep else None
    return cls(rest) if cls is not None else RuntimeError(text)


def done_awaitable(client: Client) -> Any:
    """For an asynchronous client: something already done to ``await`` (or not)."""
    if not client.asynchronous:
        return None
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut
