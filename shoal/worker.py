"""The worker server: binds the network and a thread pool to a pure `WorkerState`.

It listens for peers (other workers and clients fetching data), keeps one batched
connection to the scheduler, runs tasks on ``nthreads`` threads and holds their results.
Decisions (what to run, fetch or drop) are the state machine's; this file only carries
them out and feeds the outcomes back as events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .comm.batched import BatchedSend
from .comm.core import Comm, CommClosedError
from .comm.registry import connect, listen
from .core.worker_events import (
    ComputeTaskEvent,
    DataPut,
    Execute,
    ExecuteDone,
    ExecuteFailed,
    FreeKeysEvent,
    GatherDep,
    GatherDone,
    GatherFailed,
    RefreshWhoHasEvent,
    ReleaseData,
    ToScheduler,
    WorkerEvent,
    WorkerInstruction,
)
from .core.worker_state import WorkerState
from .execution import FunctionCache, Outcome, install_warning_capture, pack_exception, run_task
from .protocol.messages import (
    PROTOCOL_VERSION,
    CloseWorker,
    ComputeTask,
    DataReply,
    FreeKeys,
    GetData,
    Hello,
    RefreshWhoHas,
    RegisterWorker,
    Reply,
    RunFunction,
    UpdateData,
)
from .protocol.serialize import Serialized, deserialize, serialize
from .rpc import PeerPool, next_rid

logger = logging.getLogger("shoal.worker")


class Packed:
    """Data received from the network, unpickled only when a task first needs it."""

    __slots__ = ("ser",)

    def __init__(self, ser: Serialized) -> None:
        self.ser = ser


class Worker:
    """A worker process's server. ``await start()``, then `finished()` until it closes."""

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        memory_limit: int = 0,
        resources: dict[str, float] | None = None,
        connect_timeout: float = 10.0,
        in_process: bool = False,
        validate: bool = False,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.name = name or f"worker-{os.getpid()}"
        self.listen_address = f"tcp://{host}:{port}" if "://" not in host else host
        self.token = token
        self.memory_limit = memory_limit
        self.resources = resources or {}
        self.connect_timeout = connect_timeout
        self.in_process = in_process
        self.validate = validate
        self.data: dict[str, Any] = {}
        self.functions = FunctionCache()
        self.address = ""
        self.state: WorkerState | None = None
        self._executor = ThreadPoolExecutor(nthreads, thread_name_prefix=f"shoal-{self.name}")
        self._done: collections.deque[Outcome] = collections.deque()
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Any = None
        self._scheduler: BatchedSend | None = None
        self._scheduler_comm: Comm | None = None
        self._peers: PeerPool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        self._closing = False
        self.status = "created"

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> Worker:
        self._loop = asyncio.get_running_loop()
        install_warning_capture(always=not self.in_process)
        self._listener = await listen(
            self.listen_address, self._serve_peer, name=self.name, token=self.token,
            roles={"client", "worker", "peer"},
        )  # fmt: skip
        self.address = self._listener.address
        self.state = WorkerState(self.address, self.nthreads, validate=self.validate)
        hello = Hello(PROTOCOL_VERSION, "worker", self.name, self.token, os.getpid())
        self._peers = PeerPool(Hello(PROTOCOL_VERSION, "peer", self.name, self.token,
                                     os.getpid()), self.connect_timeout)  # fmt: skip
        comm = await connect(self.scheduler_address, hello, timeout=self.connect_timeout)
        rid = next_rid()
        await comm.write([RegisterWorker(
            rid, self.address, self.nthreads, self.name, self.memory_limit, self.resources,
            os.getpid())])  # fmt: skip
        answer = await asyncio.wait_for(comm.read(), self.connect_timeout)
        if not answer or not isinstance(answer[0], Reply) or answer[0].error:
            await comm.close()
            raise ConnectionError(f"scheduler {self.scheduler_address} refused worker: {answer}")
        self._scheduler_comm = comm
        self._scheduler = BatchedSend(comm)
        self._spawn(self._read_scheduler(comm))
        self.status = "running"
        logger.info("worker %s at %s joined %s", self.name, self.address, self.scheduler_address)
        return self

    def __await__(self) -> Any:
        return self.start().__await__()

    async def finished(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "closed") -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.status = "closing"
        logger.info("worker %s closing: %s", self.address, reason)
        if self._listener is not None:
            await self._listener.stop()
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._peers is not None:
            await self._peers.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current),
                             return_exceptions=True)  # fmt: skip
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.data.clear()
        self.status = "closed"
        self._closed.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ the scheduler

    async def _read_scheduler(self, comm: Comm) -> None:
        try:
            while True:
                events: list[WorkerEvent] = []
                for msg in await comm.read():
                    if isinstance(msg, ComputeTask):
                        events.append(ComputeTaskEvent(msg.stimulus_id, msg))
                    elif isinstance(msg, FreeKeys):
                        events.append(FreeKeysEvent(msg.stimulus_id, msg.keys))
                    elif isinstance(msg, RefreshWhoHas):
                        events.append(RefreshWhoHasEvent(msg.stimulus_id, msg.who_has))
                    elif isinstance(msg, CloseWorker):
                        self._spawn(self.close(f"scheduler asked: {msg.reason}"))
                        return
                    else:
                        logger.warning("unexpected message from scheduler: %r", type(msg))
                if events:
                    self._handle(events)
        except CommClosedError:
            if not self._closing:
                logger.warning("lost connection to scheduler %s", self.scheduler_address)
                self._spawn(self.close("lost connection to the scheduler"))

    def _handle(self, events: list[WorkerEvent]) -> None:
        assert self.state is not None
        for instruction in self.state.handle(events, time.time()):
            self._run_instruction(instruction)

    def _run_instruction(self, ins: WorkerInstruction) -> None:
        if isinstance(ins, Execute):
            self._execute(ins.key)
        elif isinstance(ins, ToScheduler):
            if self._scheduler is not None and not self._scheduler.closed:
                self._scheduler.send(ins.msg)
        elif isinstance(ins, ReleaseData):
            self.data.pop(ins.key, None)
        elif isinstance(ins, GatherDep):
            self._spawn(self._gather(ins))

    # ---------------------------------------------------------------- execution

    def _execute(self, key: str) -> None:
        assert self.state is not None
        ts = self.state.tasks[key]
        compute = ts.compute
        assert compute is not None
        deps = {dep: self.data[dep] for dep in compute.who_has if dep in self.data}
        self._executor.submit(self._run_in_thread, key, compute.function, compute.args, deps)

    def _run_in_thread(self, key: str, function: bytes, args: Serialized,
                       deps: dict[str, Any]) -> None:  # fmt: skip
        try:
            for dep, value in deps.items():
                if isinstance(value, Packed):
                    deps[dep] = deserialize(value.ser)
                    # Back into the store, so the next task that needs it need not unpickle it.
                    if self.data.get(dep) is value:
                        self.data[dep] = deps[dep]
            outcome = run_task(key, function, args, deps, self.functions, time.time)
        except Exception as exc:  # noqa: BLE001 - an input that cannot be unpickled
            outcome = Outcome(key)
            outcome.exception, outcome.traceback, outcome.text = pack_exception(exc)
        self._done.append(outcome)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._drain_outcomes)
            except RuntimeError:  # the loop closed under us: the worker is going away
                pass

    def _drain_outcomes(self) -> None:
        self._drain_scheduled = False
        events: list[WorkerEvent] = []
        while self._done:
            out = self._done.popleft()
            if out.ok:
                self.data[out.key] = out.value
                events.append(ExecuteDone(f"execute-{out.key}", out.key, out.nbytes,
                                          out.typename, out.start, out.stop, out.warnings))  # fmt: skip
            else:
                assert out.exception is not None
                events.append(ExecuteFailed(f"execute-{out.key}", out.key, out.exception,
                                            out.traceback, out.text, out.start, out.stop,
                                            out.warnings))  # fmt: skip
        if events and not self._closing:
            self._handle(events)

    # ------------------------------------------------------------- data plane

    async def _gather(self, ins: GatherDep) -> None:
        assert self._peers is not None
        stimulus = f"gather-{ins.peer}"
        try:
            reply = await self._peers.request(ins.peer, GetData(next_rid(), ins.keys),
                                              timeout=max(30.0, ins.total_nbytes / 50e6))  # fmt: skip
        except (OSError, asyncio.TimeoutError) as exc:
            logger.info("could not fetch %d keys from %s: %s", len(ins.keys), ins.peer, exc)
            self._handle([GatherFailed(stimulus, ins.peer, ins.keys, str(exc))])
            return
        if not isinstance(reply, DataReply):
            self._handle([GatherFailed(stimulus, ins.peer, ins.keys, "bad reply")])
            return
        nbytes: dict[str, int] = {}
        for key, ser in reply.data.items():
            self.data.setdefault(key, Packed(ser))
            nbytes[key] = ser.nbytes
        self._handle([GatherDone(stimulus, ins.peer, nbytes, reply.missing)])

    async def _serve_peer(self, comm: Comm) -> None:
        """Answer a client's or another worker's requests on one connection."""
        send = BatchedSend(comm)
        try:
            while True:
                for msg in await comm.read():
                    if send.closed:
                        return
                    if isinstance(msg, GetData):
                        send.send(self._get_data(msg))
                    elif isinstance(msg, UpdateData):
                        send.send(self._update_data(msg))
                    elif isinstance(msg, RunFunction):
                        self._spawn(self._run_function(msg, send))
                    else:
                        logger.warning("closing %s: unexpected %s", comm.peer_address,
                                       type(msg).__name__)  # fmt: skip
                        return
        except CommClosedError:
            pass
        finally:
            await send.close()

    def _get_data(self, msg: GetData) -> DataReply:
        data: dict[str, Serialized] = {}
        missing: list[str] = []
        for key in msg.keys:
            if key not in self.data:
                missing.append(key)
                continue
            value = self.data[key]
            try:
                data[key] = value.ser if isinstance(value, Packed) else serialize(value, key)
            except TypeError as exc:
                logger.error("cannot send %s: %s", key, exc)
                missing.append(key)
        return DataReply(msg.rid, data, missing)

    def _update_data(self, msg: UpdateData) -> Reply:
        nbytes = {}
        for key, ser in msg.data.items():
            self.data[key] = Packed(ser)
            nbytes[key] = ser.nbytes
        self._handle([DataPut(f"update-data-{msg.rid}", nbytes)])
        return Reply(msg.rid, nbytes)

    async def _run_function(self, msg: RunFunction, send: BatchedSend) -> None:
        def call() -> Reply:
            try:
                fn = deserialize(msg.function)
                return Reply(msg.rid, {"ok": True, "result": serialize(fn(), "run result")})
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                packed, tb, text = pack_exception(exc)
                return Reply(msg.rid, {"ok": False, "result": packed, "traceback": tb},
                             error=text)  # fmt: skip

        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, call)
        if not send.closed:
            send.send(reply)
