"""Moving results between the client and the workers: `gather`, `scatter`, and the fetch
both use (`DataMixin`, a base of `Client`).

Data goes straight between the client and the workers, never through the scheduler. Every
request to a worker has a deadline, and the scheduler tells the client when a worker leaves
(`WorkerRemoved`), which fails the requests waiting on it at once: a fetch from a worker that
was stopped or cut off goes to another holder instead of waiting forever. A key whose holders
all died is computed again, and the fetch waits for the new result.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import uuid
from typing import TYPE_CHECKING, Any, cast

from ..comm import shm
from ..comm.rpc import next_rid
from ..exceptions import FutureLostError
from ..protocol.messages import (
    DataReply,
    GetData,
    Reply,
    Scattered,
    ScatterTargets,
    SharedRef,
    UpdateData,
    WhoHas,
)
from ..protocol.serialize import Serialized, serialize
from .future import Future, FutureState, receive, wait

if TYPE_CHECKING:
    from .client import Client

__all__ = ["DataMixin"]

#: fetch rounds in a row that bring nothing before a fetch gives up
_FUTILE_ROUNDS = 8

#: values received together smaller than this (bytes) are unpickled on the event loop
UNPICKLE_INLINE_BYTES = 1 << 20

#: rounds of new targets for values that no worker took before a scatter gives up
_SCATTER_ROUNDS = 3


class DataMixin:
    """Gather and scatter methods of `Client` (kept apart from the client's own code)."""

    #: our host id when shared memory is on (None: not read yet; "": off)
    _shm_host: str | None = None
    #: worker address -> its shared-memory endpoint ("": not on our host, or off)
    _shm_endpoints: dict[str, str] | None = None
    #: bytes gathered and scattered through shared memory (counted, not timed, by tests)
    bytes_in_shared = 0
    bytes_out_shared = 0

    def _shared_memory_host(self) -> str:
        """Our host id if values may go through shared memory (docs/shared-memory.md)."""
        if self._shm_host is None:
            from ..config import load_config

            host = shm.host_id() if load_config().comm.shared_memory else ""
            if host:
                shm.segments.raise_fd_limit()  # each mapped value holds an fd (Python < 3.13)
            self._shm_host = host
            self._shm_endpoints = {}
        return self._shm_host

    # ---------------------------------------------------------------- gather

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Results of futures, in the same nested structure (lists, tuples, dicts, sets)."""
        client = cast("Client", self)
        found: list[Future] = []
        _collect_futures(futures, found)
        states = list({id(f._state): f._state for f in found}.values())
        if client.asynchronous:
            return self._gather_async(futures, states, errors)
        wait(found)
        values = client._sync(self._fetch_async(_fetchable(states, errors)))
        return _rebuild(futures, self._unpack(states, values, errors))

    async def _gather_async(self, futures: Any, states: list[FutureState], errors: str) -> Any:
        for st in states:
            await _until_done(st, None)
        values = await self._fetch_async(_fetchable(states, errors))
        if sum(ser.nbytes for ser in values.values()) < UNPICKLE_INLINE_BYTES:
            return _rebuild(futures, self._unpack(states, values, errors))
        # Big values are unpickled off the loop (the caller's, which serves everything
        # else meanwhile); a thread hop costs more than small ones take.
        unpacked = await asyncio.get_running_loop().run_in_executor(
            None, self._unpack, states, values, errors)  # fmt: skip
        return _rebuild(futures, unpacked)

    def _unpack(self, states: list[FutureState], values: dict[str, Serialized],
                errors: str) -> dict[str, Any]:  # fmt: skip
        client = cast("Client", self)
        result: dict[str, Any] = {}
        for st in states:
            st.emit_warnings()
            if st.key in values:
                result[st.key] = receive(client, values[st.key])
            elif errors == "raise":
                error = st.exception_object()
                assert error is not None
                raise error
            else:
                result[st.key] = st.exception_object()
        return result

    def _fetch_one(self, state: FutureState, timeout: float | None) -> Any:
        client = cast("Client", self)
        values = client._sync(self._fetch_async([state], timeout))
        return receive(client, values[state.key])

    async def _fetch_async(self, states: list[FutureState],
                           timeout: float | None = None) -> dict[str, Serialized]:  # fmt: skip
        """The values of finished keys, straight from their workers.

        A holder that fails or left is dropped and the scheduler asked where else the key
        is; a key that went back to pending (its holders died) is awaited again, up to
        ``timeout``. Raises the key's error if it fails meanwhile, and `FutureLostError` when
        several rounds in a row bring nothing."""
        client = cast("Client", self)
        peers = client._peers
        assert peers is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        out: dict[str, Serialized] = {}
        todo = {st.key: st for st in states}
        holders = {st.key: list(st.workers) for st in states}
        futile = 0
        why = ""
        while todo:
            for st in list(todo.values()):
                if not st.done():  # computed again after a loss: wait for the new result
                    await _until_done(st, None if deadline is None else deadline - loop.time())
                    holders[st.key] = list(st.workers)
                if st.status != "finished":
                    error = st.exception_object()
                    assert error is not None
                    raise error
            by_worker: dict[str, list[str]] = {}
            for key in todo:
                where = holders[key]
                if where:
                    by_worker.setdefault(where[hash(key) % len(where)], []).append(key)
            limit = client.timeout * 6
            if deadline is not None:
                limit = max(0.001, min(limit, deadline - loop.time()))
            host = self._shared_memory_host() if shm.can_hold() else ""
            replies = await asyncio.gather(
                *(peers.request(w, GetData(next_rid(), keys, host=host), limit)
                  for w, keys in by_worker.items()),
                return_exceptions=True,
            )  # fmt: skip
            progressed = False
            for (worker, keys), reply in zip(by_worker.items(), replies):
                if isinstance(reply, DataReply):
                    if reply.shared:  # same host: map the holder's segments (no copy)
                        try:
                            reply.data.update(await loop.run_in_executor(
                                None, _pull_shared, reply.endpoint, reply.shared))
                            self.bytes_in_shared += sum(r.nbytes for r in reply.shared.values())
                        except OSError as exc:  # the holder died or let go: try elsewhere
                            why = f"{worker}: {exc!r}"
                    for key, ser in reply.data.items():
                        if todo.pop(key, None) is not None:
                            out[key] = ser
                            progressed = True
                else:
                    why = f"{worker}: {reply!r}"
                for key in keys:  # what it did not give, it does not have (or it is gone)
                    if key in todo:
                        holders[key] = [w for w in holders[key] if w != worker]
            if not todo:
                break
            futile = 0 if progressed else futile + 1
            if futile >= _FUTILE_ROUNDS:
                raise FutureLostError(f"could not fetch {sorted(todo)[:5]} from their workers"
                                      f" ({why or 'no worker holds them'})")  # fmt: skip
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"could not fetch {sorted(todo)[:5]} within {timeout}s")
            if futile > 1:
                # The scheduler may not have noticed the loss yet: give it a moment.
                await asyncio.sleep(min(0.05 * 2 ** futile, 1.0))
            lost = [key for key in todo if not holders[key]]
            if lost:
                who_has = await client._request(WhoHas(next_rid(), lost))
                for key in lost:
                    holders[key] = list(who_has.get(key) or [])
        return out

    # --------------------------------------------------------------- scatter

    def scatter(self, data: Any, broadcast: bool = False, workers: list[str] | None = None,
                hash: bool = True) -> Any:  # noqa: A002 - dask's name  # fmt: skip
        """Put data on workers directly; returns futures in the shape of ``data``."""
        client = cast("Client", self)
        client._check_running()
        if isinstance(data, dict):
            names, values = list(data), list(data.values())
        elif isinstance(data, (list, tuple, set, frozenset)):
            names, values = None, list(data)
        else:
            names, values = None, [data]
        packed = [serialize(v, f"scattered {type(v).__name__}") for v in values]
        keys = [str(n) for n in names] if names is not None else [
            f"{type(v).__name__}-" + (_hash_frames(p) if hash else uuid.uuid4().hex)
            for v, p in zip(values, packed)]  # fmt: skip
        futures = [Future(k, client) for k in keys]
        coro = self._scatter_async(futures, packed, broadcast, workers)
        if client.asynchronous:
            async def finish() -> Any:
                await coro
                return _scatter_shape(data, futures)

            return finish()
        client._sync(coro)
        return _scatter_shape(data, futures)

    async def _scatter_async(self, futures: list[Future], packed: list[Serialized],
                             broadcast: bool, workers: list[str] | None) -> None:  # fmt: skip
        """Put each value on the workers the scheduler picks. A worker that fails (it died
        meanwhile) is dropped; a value none of its workers took goes to new targets, up to
        `_SCATTER_ROUNDS` times, then `FutureLostError` says which workers failed and why."""
        client = cast("Client", self)
        peers = client._peers
        assert peers is not None
        limit = client.timeout * 6
        todo = list(range(len(futures)))
        held: dict[int, list[str]] = {}
        failures: list[str] = []
        for _round in range(_SCATTER_ROUNDS):
            targets: list[list[str]] = await client._request(
                ScatterTargets(next_rid(), len(todo), broadcast, workers))
            if len(targets) != len(todo):
                raise RuntimeError("no workers to scatter to: start some workers first")
            per_worker: dict[str, dict[str, Serialized]] = {}
            for i, where in zip(todo, targets):
                for w in where:
                    per_worker.setdefault(w, {})[futures[i].key] = packed[i]
            shared = await self._scatter_shared(per_worker, limit)
            replies = await asyncio.gather(
                *(peers.request(w, UpdateData(next_rid(), data, shared.get(w, {})), limit)
                  for w, data in per_worker.items()),
                return_exceptions=True)  # fmt: skip
            failed = set()
            for w, reply in zip(per_worker, replies):
                if isinstance(reply, BaseException) or (isinstance(reply, Reply) and reply.error):
                    failed.add(w)
                    failures.append(f"{w}: {reply!r}")
            for i, where in zip(todo, targets):
                held[i] = [w for w in where if w not in failed]
            todo = [i for i in todo if not held[i]]
            if not todo:
                break
            # The scheduler may not have noticed the failed workers yet: give it a moment.
            await asyncio.sleep(0.5 * (_round + 1))
        if todo:
            why = "; ".join(failures[-3:])
            raise FutureLostError(f"could not scatter {[futures[i].key for i in todo][:5]}:"
                                  f" every worker it was sent to failed ({why})")
        client._send_now(Scattered(
            [f.key for f in futures], [held[i] for i in range(len(futures))],
            [p.nbytes for p in packed], generations=[f._state.generation for f in futures]))

    async def _scatter_shared(self, per_worker: dict[str, dict[str, Serialized]],
                              limit: float) -> dict[str, dict[str, SharedRef]]:  # fmt: skip
        """Move the big values bound for workers on our host into segments and push them to
        those workers (taking them out of ``per_worker``): worker -> the refs its UpdateData
        claims them by. One segment per value, whatever the number of workers; ours closes
        once pushed (the workers hold theirs). A worker the push fails for gets the socket."""
        if not self._shared_memory_host():
            return {}
        big = {key for data in per_worker.values() for key, ser in data.items()
               if shm.buffer_bytes(ser) >= shm.SHM_MIN_BYTES}  # fmt: skip
        if not big:
            return {}
        endpoints = {w: await self._shm_endpoint(w, limit) for w, data in per_worker.items()
                     if big.intersection(data)}  # fmt: skip
        endpoints = {w: e for w, e in endpoints.items() if e}
        if not endpoints:
            return {}
        loop = asyncio.get_running_loop()
        sers = {key: ser for w in endpoints for key, ser in per_worker[w].items() if key in big}
        # Copying a big value takes a while: not on the client's loop.
        segments = await loop.run_in_executor(None, _make_segments, sers)
        out: dict[str, dict[str, SharedRef]] = {}
        try:
            for w, endpoint in endpoints.items():
                refs = {key: ref for key, (_seg, ref) in segments.items() if key in per_worker[w]}
                items = [(ref.token, segments[key][0].segment.fd) for key, ref in refs.items()]
                try:
                    await loop.run_in_executor(None, shm.push, endpoint, items, limit)
                except OSError:
                    assert self._shm_endpoints is not None
                    self._shm_endpoints.pop(w, None)  # asked again next time (restarted?)
                    continue  # the socket then
                for key in refs:
                    del per_worker[w][key]
                out[w] = refs
                self.bytes_out_shared += sum(ref.nbytes for ref in refs.values())
        finally:
            for seg, _ref in segments.values():
                seg.close()
        return out

    async def _shm_endpoint(self, worker: str, limit: float) -> str:
        """``worker``'s shared-memory endpoint if it is on our host (asked once, by an
        empty GetData carrying our host id), else ""."""
        client = cast("Client", self)
        endpoints = self._shm_endpoints
        assert endpoints is not None and client._peers is not None
        if worker not in endpoints:
            try:
                reply = await client._peers.request(
                    worker, GetData(next_rid(), [], host=self._shared_memory_host()), limit)
            except (OSError, asyncio.TimeoutError):
                return ""  # not remembered: the scatter's own request tells what is wrong
            endpoints[worker] = reply.endpoint if isinstance(reply, DataReply) else ""
        return endpoints[worker]


# --------------------------------------------------------------------- helpers


async def _until_done(state: FutureState, timeout: float | None) -> None:
    """Wait on the client's loop until ``state`` is done (TimeoutError after ``timeout``)."""
    if state.done():
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    state.add_async_waiter(waiter)
    try:
        await asyncio.wait_for(waiter, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{state.key} did not finish within {timeout}s") from None


def _pull_shared(endpoint: str, refs: dict[str, SharedRef]) -> dict[str, Serialized]:
    """Map the segments of ``refs`` from ``endpoint``: each value's frames, its buffers views
    of the mapping (no copy; copy-on-write if written). The fds close at once: the mapping
    lives as long as the values made from it."""
    items = list(refs.items())
    fds = shm.pull(endpoint, [(ref.segment, ref.token) for _, ref in items])
    out: dict[str, Serialized] = {}
    for i, (key, ref) in enumerate(items):
        try:
            try:
                held = shm.adopt(ref, os.dup(fds[i]), None)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise
                # Out of fds (each mapping keeps one on Python < 3.13) or address space:
                # a copy still beats failing the fetch.
                fd, fds[i] = fds[i], -1
                out[key] = shm.values.read_copy(ref, fd)
                continue
        except (OSError, ValueError) as exc:
            for fd in fds[i:]:
                if fd >= 0:
                    shm.segments.close_fd(fd)
            raise shm.PullError(f"bad segment from {endpoint}: {exc}") from exc
        shm.segments.close_fd(fds[i])
        out[key] = held.serialized()
        held.close()
    return out


def _make_segments(sers: dict[str, Serialized]) -> dict[str, tuple[shm.SharedValue, SharedRef]]:
    """A sealed segment for each value, and the ref a worker it is pushed to claims it by."""
    out: dict[str, tuple[shm.SharedValue, SharedRef]] = {}
    try:
        for key, ser in sers.items():
            held = shm.share(ser, key, None)
            out[key] = held, SharedRef(held.header, 0, shm.segments.new_token(), held.offsets,
                                       held.lengths, held.nbytes)  # fmt: skip
    except BaseException:
        for held, _ref in out.values():
            held.close()
        raise
    return out


def _hash_frames(ser: Serialized) -> str:
    h = hashlib.blake2b(digest_size=16)
    for frame in ser.frames:
        h.update(frame)
    return h.hexdigest()


def _collect_futures(obj: Any, out: list[Future]) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            _collect_futures(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect_futures(x, out)


def _rebuild(obj: Any, values: dict[str, Any]) -> Any:
    if isinstance(obj, Future):
        return values[obj.key]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_rebuild(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, values) for k, v in obj.items()}
    return obj


def _fetchable(states: list[FutureState], errors: str) -> list[FutureState]:
    # A state may be pending again here (its holders were lost after it finished): not an
    # error, `_fetch_async` waits for it to finish again.
    if errors == "raise":
        for st in states:
            if st.status != "finished":
                error = st.exception_object()
                if error is not None:
                    st.emit_warnings()
                    raise error
    return [st for st in states if st.status == "finished" or st.exception_object() is None]


def _scatter_shape(data: Any, futures: list[Future]) -> Any:
    if isinstance(data, dict):
        return dict(zip(data, futures))
    if isinstance(data, (list, tuple, set, frozenset)):
        return type(data)(futures)
    return futures[0]
