"""BatchedSend: one write per event-loop tick, one tick of latency, no fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shoal.comm import BatchedSend, Comm, CommClosedError, connect, listen
from shoal.protocol.messages import PROTOCOL_VERSION, Hello, Message, Msg, Reply

Run = Callable[..., Any]  # the `run` fixture (conftest.py)


class RecordingComm(Comm):
    """Records each write; a write can be held open with ``hold``."""

    def __init__(self) -> None:
        self.writes: list[list[Msg]] = []
        self.hold: asyncio.Event | None = None
        self.fail_with: Exception | None = None
        self._closed = False

    async def write(self, msgs: list[Msg]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.writes.append(list(msgs))
        if self.hold is not None:
            await self.hold.wait()

    async def read(self) -> list[Message]:
        raise NotImplementedError

    async def close(self) -> None:
        self._closed = True

    def abort(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_address(self) -> str:
        return "test://peer"

    @property
    def local_address(self) -> str:
        return "test://local"

    async def write_handshake(self, msg: Msg) -> None:
        raise NotImplementedError

    async def read_handshake(self, expect: tuple[type[Msg], ...]) -> Msg:
        raise NotImplementedError


async def next_tick() -> None:
    await asyncio.sleep(0)


def test_messages_of_one_tick_go_out_as_one_write(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        batched = BatchedSend(comm)
        for rid in range(100):
            batched.send(Reply(rid=rid))
        batched.send_many([Reply(rid=100), Reply(rid=101)])
        assert comm.writes == []  # nothing is written synchronously
        await next_tick()
        assert comm.writes == [[Reply(rid=rid) for rid in range(102)]]
        await batched.close()

    run(body())


def test_a_single_message_waits_one_tick_only(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        batched = BatchedSend(comm)
        for rid in range(3):
            batched.send(Reply(rid=rid))
            await next_tick()
            assert comm.writes[-1] == [Reply(rid=rid)]
        assert batched.batches_sent == 3 and batched.messages_sent == 3
        await batched.close()

    run(body())


def test_messages_sent_during_a_write_go_out_together_right_after(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        comm.hold = asyncio.Event()
        batched = BatchedSend(comm)
        batched.send(Reply(rid=0))
        await next_tick()
        assert comm.writes == [[Reply(rid=0)]]  # this write is now in flight
        for rid in (1, 2, 3):
            batched.send(Reply(rid=rid))
            await next_tick()
        assert len(comm.writes) == 1
        comm.hold.set()
        comm.hold = None
        await next_tick()  # the flusher wakes and writes the accumulated batch at once
        assert comm.writes == [[Reply(rid=0)], [Reply(rid=1), Reply(rid=2), Reply(rid=3)]]
        await batched.close()

    run(body())


def test_close_flushes_then_closes_and_later_sends_raise(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        batched = BatchedSend(comm)
        batched.send(Reply(rid=1))
        await batched.close()
        assert comm.writes == [[Reply(rid=1)]] and comm.closed and batched.closed
        with pytest.raises(CommClosedError):
            batched.send(Reply(rid=2))

    run(body())


def test_a_broken_comm_calls_on_error_and_later_sends_raise(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        comm.fail_with = CommClosedError("gone")
        errors: list[BaseException] = []
        batched = BatchedSend(comm, on_error=errors.append)
        batched.send(Reply(rid=1))
        await next_tick()
        assert len(errors) == 1 and isinstance(errors[0], CommClosedError)
        assert comm.closed and batched.closed
        with pytest.raises(CommClosedError, match="gone"):
            batched.send(Reply(rid=2))
        await batched.close()

    run(body())


def test_abort_drops_what_is_queued(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        batched = BatchedSend(comm)
        batched.send(Reply(rid=1))
        batched.abort()
        await next_tick()
        assert comm.writes == [] and comm.closed

    run(body())


def test_one_tick_of_messages_is_one_frame_over_tcp(run: Run, loop_name: str) -> None:
    async def body() -> None:
        batches: asyncio.Queue[list[Message]] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            try:
                while True:
                    batches.put_nowait(await comm.read())
            except CommClosedError:
                pass

        listener = await listen("tcp://127.0.0.1:0", handler, name="s")
        comm = await connect(listener.address, Hello(PROTOCOL_VERSION, "client", "c"))
        batched = BatchedSend(comm)
        batched.send_many([Reply(rid=rid) for rid in range(500)])
        batched.send(Reply(rid=500))
        batch = await asyncio.wait_for(batches.get(), 5)
        assert [m.rid for m in batch if isinstance(m, Reply)] == list(range(501))
        await batched.close()
        await listener.stop()

    run(body(), loop=loop_name)


def test_close_after_abort_does_not_raise(run: Run) -> None:
    async def body() -> None:
        comm = RecordingComm()
        comm.hold = asyncio.Event()
        batched = BatchedSend(comm)
        batched.send(Reply(rid=1))
        await next_tick()  # a write is in flight
        batched.abort()
        await batched.close()
        assert comm.closed

    run(body())
