"""The actors living on one worker: an instance and a thread of its own for each.

The creating task (`shoal.client.actor.ActorFactory`) adds the instance here under the task's
key; calls arrive on the worker's peer listener (`ActorCall`, `ActorGetAttr`) and run one at a
time on the actor's thread, in the order they arrived.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..comm.batched import BatchedSend
from ..protocol.messages import ACTOR_LOST_PREFIX, ActorCall, ActorGetAttr, Reply
from ..protocol.serialize import deserialize, serialize
from .context import TaskContext, running
from .execution import pack_exception

if TYPE_CHECKING:
    from .server import Worker

__all__ = ["ActorRegistry"]


class _Hosted:
    __slots__ = ("key", "instance", "thread")

    def __init__(self, key: str, instance: Any) -> None:
        self.key = key
        self.instance = instance
        #: one thread for this actor: its calls run one at a time, first come first served
        self.thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"shoal-actor-{key[:40]}")


class ActorRegistry:
    """The actors living on one worker, by the key of the task that made each."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._actors: dict[str, _Hosted] = {}
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._actors

    def __len__(self) -> int:
        return len(self._actors)

    def add(self, key: str, instance: Any) -> None:
        """Keep ``instance`` as actor ``key`` (called by its creating task, on its thread)."""
        hosted = _Hosted(key, instance)
        with self._lock:
            old = self._actors.get(key)
            self._actors[key] = hosted
        if old is not None:
            old.thread.shutdown(wait=False)

    def remove(self, key: str) -> None:
        """Drop actor ``key``: calls already queued still run, then its thread ends."""
        with self._lock:
            hosted = self._actors.pop(key, None)
        if hosted is not None:
            hosted.thread.shutdown(wait=False)

    def close(self) -> None:
        """The worker is closing: drop every actor and the calls queued for them."""
        with self._lock:
            hosted, self._actors = list(self._actors.values()), {}
        for h in hosted:
            h.thread.shutdown(wait=False, cancel_futures=True)

    def serve(self, msg: ActorCall | ActorGetAttr, send: BatchedSend) -> None:
        """Queue a call on its actor's thread (on the worker's loop); the `Reply` goes back on
        ``send`` when the call ends."""
        loop = asyncio.get_running_loop()

        def answer(reply: Reply) -> None:
            if not send.closed:
                send.send(reply)

        def answer_threadsafe(reply: Reply) -> None:
            try:
                loop.call_soon_threadsafe(answer, reply)
            except RuntimeError:  # the loop closed: the worker is gone, and so is the caller
                pass

        hosted = self._actors.get(msg.key)
        if hosted is None:
            answer(self._lost(msg))
            return
        try:
            hosted.thread.submit(self._run, hosted, msg, answer_threadsafe)
        except RuntimeError:  # dropped meanwhile
            answer(self._lost(msg))

    def _lost(self, msg: ActorCall | ActorGetAttr) -> Reply:
        return Reply(msg.rid, error=f"{ACTOR_LOST_PREFIX}worker {self.worker.address} holds no actor"
                                    f" {msg.key!r} (it was released or lost)")  # fmt: skip

    def _run(self, hosted: _Hosted, msg: ActorCall | ActorGetAttr,
             answer: Callable[[Reply], None]) -> None:  # fmt: skip
        with running(TaskContext(self.worker, hosted.key, is_actor=True)):
            try:
                if isinstance(msg, ActorCall):
                    args, kwargs = deserialize(msg.args)
                    what = f"result of {type(hosted.instance).__name__}.{msg.method}"
                    value = getattr(hosted.instance, msg.method)(*args, **kwargs)
                else:
                    what = f"attribute {type(hosted.instance).__name__}.{msg.name}"
                    value = getattr(hosted.instance, msg.name)
                reply = Reply(msg.rid, [True, serialize(value, what)])
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
                # KeyboardInterrupt and SystemExit too (see `run_task`): the caller re-raises
                # it; raised here it would only end this call without an answer.
                packed, tb, _text = pack_exception(exc)
                reply = Reply(msg.rid, [False, packed, tb])
        answer(reply)
