"""The worker server: binds the network and a thread pool to a pure `WorkerState`.

It listens for peers (other workers and clients fetching data), keeps one batched
connection to the scheduler, runs tasks on ``nthreads`` threads and holds their results.
Decisions (what to run, fetch or drop) are the state machine's; this file only carries
them out and feeds the outcomes back as events.

Tasks may launch tasks through a client the worker makes for them (`task_client`; their
thread context is in `context`); a task waiting on others secedes: it keeps its thread,
which no longer counts against ``nthreads``, so the pool runs more threads than that.
Actors made here live in `actors` and answer calls from the peer listener.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .actors import ActorRegistry
from ..comm.batched import BatchedSend
from ..comm.core import Comm, CommClosedError
from ..comm.registry import connect, listen
from ..core.worker_events import (
    AcquireReplicasEvent,
    ComputeTaskEvent,
    DataPut,
    Execute,
    ExecuteDone,
    ExecuteFailed,
    ExecuteSkipped,
    FreeKeysEvent,
    GatherDep,
    GatherDone,
    GatherFailed,
    RefreshWhoHasEvent,
    Rejoin,
    RejoinEvent,
    ReleaseData,
    Revoke,
    SecedeEvent,
    ToScheduler,
    WorkerEvent,
    WorkerInstruction,
)
from ..core.worker_state import WorkerState
from .execution import (FunctionCache, Lane, Lanes, Outcome, TaskRun, install_warning_capture,
                        pack_exception, run_task)  # fmt: skip
from .memory import MemoryFractions, WorkerMemory
from .process_usage import process_usage
from ..protocol.messages import (
    PROTOCOL_VERSION,
    ActorCall,
    ActorGetAttr,
    AcquireReplicas,
    CloseWorker,
    ComputeTask,
    Heartbeat,
    DataReply,
    FreeKeys,
    GetData,
    GetLogs,
    Hello,
    RefreshWhoHas,
    RegisterWorker,
    RestartWorker,
    Reply,
    RunFunction,
    SharedRef,
    UpdateData,
    WorkerDeath,
)
from ..protocol.serialize import Serialized, deserialize, serialize
from .spill import Lazy, Packed, SpillBuffer
from .shared import WorkerShm
from ..comm.shm import SharedValue
from ..comm.rpc import PeerPool, next_rid
from .context import TaskContext, running
from .task_client import TaskClients
from ..diagnostics.logs import apply_env_level, log_ring
from ..utils.loop_monitor import LoopMonitor, watch_loop

from ..security.policy import WORKER_FRAME_LIMITS, check_bind

if TYPE_CHECKING:
    from ..dashboard.server import WorkerDashboard
    from ..security.credentials import Security

logger = logging.getLogger("shoal.worker")

#: Threads the pool may run beyond ``nthreads``: tasks that seceded (they wait on other
#: tasks) keep their thread while the next tasks start. The state machine bounds the tasks
#: holding a slot; this only has to be more than will ever wait at once.
SECEDED_THREADS = 1024

#: Tasks handed ahead per thread slot, behind the running one, so that the thread that ends
#: one starts the next itself (see `WorkerState`). Small: a task that comes later with a
#: higher priority waits behind them.
LOOKAHEAD = 2

#: A fetch of values in memory at least this big (together) is answered from a thread
#: (pickling or copying them may take long); smaller ones inline, where a thread hop would
#: cost more than the work.
OFF_LOOP_BYTES = 256 * 1024

#: Threads that answer fetches off the event loop (`Worker._serve_get_data`): two, so that
#: one big read from disk does not hold up every other.
DATA_THREADS = 2

#: Seconds a closing worker waits for its store to close (its spill thread to finish a write).
CLOSE_STORE_TIMEOUT = 60.0

#: Over TLS, the certificate roles that may send each request to a worker's listener: the
#: scheduler forwards `run` and asks for logs, clients scatter and call actors; fetching
#: data is open to every peer. (Without certificates the token is all there is to check.)
PEER_REQUEST_ROLES: dict[type, frozenset[str]] = {
    RunFunction: frozenset({"scheduler"}),
    GetLogs: frozenset({"scheduler"}),
    UpdateData: frozenset({"client"}),
    ActorCall: frozenset({"client"}),
    ActorGetAttr: frozenset({"client"}),
}


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
        connect_timeout: float | None = None,
        in_process: bool = False,
        validate: bool = False,
        heartbeat_interval: float | None = None,
        reconnect_timeout: float | None = None,
        memory_fractions: MemoryFractions | None = None,
        spill_directory: str | None = None,
        previous_death: WorkerDeath | None = None,
        dashboard_address: str | int | None = None,
        executor: ThreadPoolExecutor | None = None,
        security: Security | None = None,
        insecure: bool = False,
        frame_limits: dict[str, int] | None = None,
    ) -> None:
        """``security``: TLS credentials (a worker certificate): the worker then listens at
        ``tls://`` and reaches the scheduler and its peers over TLS. Without TLS or a
        ``token`` it refuses to listen beyond loopback unless ``insecure``."""
        self.scheduler_address = scheduler_address
        if connect_timeout is None or heartbeat_interval is None or reconnect_timeout is None:
            from ..config import load_config  # keywords not given: shoal.config's values

            config = load_config()
            if connect_timeout is None:
                connect_timeout = config.comm.connect_timeout
            if heartbeat_interval is None:
                heartbeat_interval = config.comm.heartbeat_interval
            if reconnect_timeout is None:
                reconnect_timeout = config.worker.death_timeout
        #: TLS credentials (None: plain TCP); its metrics server serves HTTPS with them
        self.security = security
        self.insecure = insecure
        #: role -> the largest frame a peer of that role may send us (`WORKER_FRAME_LIMITS`)
        self.frame_limits = {**WORKER_FRAME_LIMITS, **(frame_limits or {})}
        #: where this worker's HTTP server (/metrics, /health) listens; None: it has none
        self.dashboard_address = dashboard_address
        self.dashboard: WorkerDashboard | None = None
        #: bytes of data fetched from peers, and sent to peers and clients, so far
        self.bytes_in = 0
        self.bytes_out = 0
        #: seconds between heartbeats; the scheduler drops a worker silent for its worker-ttl
        self.heartbeat_interval = heartbeat_interval
        #: how long to keep trying to get back to a lost scheduler before closing
        self.reconnect_timeout = reconnect_timeout
        self.nthreads = nthreads
        self.name = name or f"worker-{os.getpid()}"
        scheme = "tls" if security is not None else "tcp"
        self.listen_address = f"{scheme}://{host}:{port}" if "://" not in host else host
        self.token = token
        self.memory_limit = memory_limit
        self.resources = resources or {}
        self.connect_timeout = connect_timeout
        self.in_process = in_process
        #: the scheduler asked for a restart: the process should exit for its nanny
        self.restart_requested = False
        self.validate = validate
        #: the store (results spill to disk past the memory target) and the memory monitor
        self.memory = WorkerMemory(self.name, memory_limit, memory_fractions, spill_directory,
                                   in_process)  # fmt: skip
        self.data: SpillBuffer = self.memory.data
        #: same-host shared memory (docs/shared-memory.md); its broker starts with us
        self.shm = WorkerShm(self.data, enabled=not in_process)
        #: how the process this one replaces died (from its nanny), told on registering
        self.previous_death = previous_death
        self.functions = FunctionCache()
        self.address = ""
        self.state: WorkerState | None = None
        #: an executor given by the caller (shared by many workers in one process,
        #: `shoal.testing.many_workers`) is theirs to shut down, not ours
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(nthreads + SECEDED_THREADS,
                                                        thread_name_prefix=f"shoal-{self.name}")  # fmt: skip
        #: heartbeats sent so far (scale tests count them)
        self.heartbeats_sent = 0
        #: seceded tasks waiting in `rejoin_task` for a slot: key -> set when they have one
        self._rejoin_events: dict[str, threading.Event] = {}
        #: actors living here (see `shoal.actor`)
        self.actors = ActorRegistry(self)
        #: the client tasks get from `shoal.get_client()`, made on first use
        self.task_clients = TaskClients(scheduler_address, token, self.name, connect_timeout,
                                        security)  # fmt: skip
        #: answers fetches of big or spilled values, off the event loop (`_serve_get_data`)
        self._data_pool = ThreadPoolExecutor(DATA_THREADS,
                                             thread_name_prefix=f"shoal-{self.name}-data")  # fmt: skip
        #: the watchdog of this worker's event loop (shared with what else runs on it)
        self.loop_monitor: LoopMonitor | None = None
        #: what task threads tell the loop, in the order it happened: outcomes, secedes,
        #: rejoins, revoked tasks (one queue: a lane's next outcome never overtakes them)
        self._done: collections.deque[Outcome | WorkerEvent] = collections.deque()
        #: the thread slots' run queues
        self._lanes = Lanes(self._start_lane)
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Any = None
        self._scheduler: BatchedSend | None = None
        self._scheduler_comm: Comm | None = None
        self._peers: PeerPool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        #: the one run of `_close`: every `close` call waits on it, and cancelling a caller
        #: (a timed-out start, say) does not stop it half-way
        self._close_task: asyncio.Future[None] | None = None
        self._closing = False
        self.status = "created"

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> Worker:
        self._loop = asyncio.get_running_loop()
        install_warning_capture(always=not self.in_process)
        check_bind(self.listen_address, tls=self.security is not None, token=self.token,
                   insecure=self.insecure, what=f"worker {self.name}")  # fmt: skip
        self._listener = await listen(
            self.listen_address, self._serve_peer, name=self.name, token=self.token,
            roles={"client", "worker", "peer"}, security=self.security,
            frame_limits=self.frame_limits,
        )  # fmt: skip
        self.address = self._listener.address
        if self.shm.enabled:
            from ..config import load_config

            if load_config().comm.shared_memory:
                self.shm.start()
        apply_env_level()
        log_ring()
        if self.dashboard_address is not None:
            await self._start_dashboard(self.dashboard_address)
        self.state = self._new_state()
        self._peers = PeerPool(Hello(PROTOCOL_VERSION, "peer", self.name, self.token,
                                     os.getpid()), self.connect_timeout,
                               security=self.security)  # fmt: skip
        self.loop_monitor = watch_loop(f"worker {self.name}")  # released by `_close`
        try:
            await self._register(timeout=self.connect_timeout)
        except BaseException:
            await self.close("could not join the scheduler")
            raise
        self._spawn(self._heartbeat_loop())
        self._spawn(self.memory.run(self))
        self.status = "running"
        logger.info("worker %s at %s joined %s", self.name, self.address, self.scheduler_address)
        return self

    async def _register(self, timeout: float) -> None:
        """Connect to the scheduler and register, announcing the data we hold."""
        hello = Hello(PROTOCOL_VERSION, "worker", self.name, self.token, os.getpid())
        comm = await connect(self.scheduler_address, hello, timeout=timeout,
                             security=self.security, server_role="scheduler")
        assert self.state is not None
        held = [key for key, ts in self.state.tasks.items() if ts.state == "memory"]
        rid = next_rid()
        await comm.write([RegisterWorker(
            rid, self.address, self.nthreads, self.name, self.memory_limit, self.resources,
            os.getpid(), held, [self.state.tasks[k].nbytes for k in held],
            restarts_in_place=self.in_process, previous_death=self.previous_death,
            dashboard=self.dashboard.url if self.dashboard is not None else "")])  # fmt: skip
        try:
            answer = await asyncio.wait_for(comm.read(), timeout)
        except (asyncio.TimeoutError, CommClosedError):
            comm.abort()
            raise ConnectionError(f"scheduler {self.scheduler_address} did not answer the"
                                  f" registration within {timeout}s") from None  # fmt: skip
        if not answer or not isinstance(answer[0], Reply) or answer[0].error:
            await comm.close()
            raise ConnectionError(f"scheduler {self.scheduler_address} refused worker: {answer}")
        self.previous_death = None  # told once
        self._scheduler_comm = comm
        self._scheduler = BatchedSend(comm)
        # What the scheduler sent right behind its answer (work for us) came in the same batch.
        self._spawn(self._read_scheduler(comm, list(answer[1:])))

    async def _reconnect(self) -> None:
        """The scheduler connection broke: start over with what we hold, or close."""
        assert self.state is not None
        # Work in progress was rescheduled elsewhere when we were dropped: forget it and
        # keep only finished data, which we announce when we register again.
        held = {k: ts.nbytes for k, ts in self.state.tasks.items() if ts.state == "memory"}
        self.state = self._new_state()
        self._handle([DataPut("reconnect", held)])
        for key in list(self.data):
            if key not in held:
                self.data.discard(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        while not self._closing:
            try:
                await self._register(timeout=max(1.0, min(self.connect_timeout,
                                                          deadline - loop.time())))  # fmt: skip
                logger.info("worker %s re-registered with %s (%d keys)", self.address,
                            self.scheduler_address, len(held))  # fmt: skip
                return
            except (OSError, asyncio.TimeoutError) as exc:
                if loop.time() >= deadline:
                    logger.error("could not get back to the scheduler within %ss: %s",
                                 self.reconnect_timeout, exc)  # fmt: skip
                    self._spawn(self.close("lost the scheduler"))
                    return
                await asyncio.sleep(0.2)

    async def _heartbeat_loop(self) -> None:
        """Tell the scheduler we are alive, and how busy, every ``heartbeat_interval``."""
        usage = process_usage()  # shared by the workers of this process
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(self.heartbeat_interval)
            send = self._scheduler
            if send is None or send.closed or self.state is None:
                continue
            rss, cpu = usage.read()
            now, monitor = time.monotonic(), self.loop_monitor
            lag = monitor.max_lag_since(last) if monitor is not None else 0.0
            last = now
            send.send(Heartbeat(len(self.state.executing), len(self.state.ready), rss,
                                cpu, self.data.spilled_bytes,
                                self.data.memory_bytes, self.state.paused,
                                bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                                loop_lag=lag))  # fmt: skip
            self.heartbeats_sent += 1

    def scheduler_traffic(self) -> dict[str, int]:
        """Heartbeats sent, and messages and batches sent on the current connection to the
        scheduler: for scale tests and benchmarks."""
        send = self._scheduler
        return {"heartbeats": self.heartbeats_sent,
                "messages": send.messages_sent if send is not None else 0,
                "batches": send.batches_sent if send is not None else 0}  # fmt: skip

    def __await__(self) -> Any:
        return self.start().__await__()

    async def finished(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "closed") -> None:
        if self._close_task is None:
            self._closing = True  # at once, as before: loops and handlers stop now
            self._close_task = asyncio.ensure_future(self._close(reason))
        # Shielded: a caller cancelled half-way used to leave the worker half-closed (its
        # listener open) and every later close waiting forever for it to finish.
        await asyncio.shield(self._close_task)

    async def _close(self, reason: str) -> None:
        self._closing = True
        self.status = "closing"
        logger.info("worker %s closing: %s", self.address, reason)
        self.actors.close()
        for event in list(self._rejoin_events.values()):
            event.set()
        # Tasks waiting on their futures see them fail when the client closes, and end.
        await asyncio.to_thread(self.task_clients.close)
        if self._listener is not None:
            await self._listener.stop()
        if self.dashboard is not None:
            await self.dashboard.close()
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
        for run in self._lanes.clear():  # tasks handed ahead do not start
            self._let_go(run)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._data_pool.shutdown(wait=False, cancel_futures=True)
        # Drops the data and removes the spilled files, off the loop: it waits for the spill
        # thread, which may be writing a GB.
        try:
            await asyncio.wait_for(asyncio.to_thread(self.memory.close), CLOSE_STORE_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("worker %s: the store did not close within %ss", self.name,
                           CLOSE_STORE_TIMEOUT)  # fmt: skip
        await asyncio.to_thread(self.shm.stop)  # after the data: no segment left to export
        if self.loop_monitor is not None:
            self.loop_monitor.release(f"worker {self.name}")
        self.status = "closed"
        self._closed.set()

    def _new_state(self) -> WorkerState:
        for run in self._lanes.clear():  # what the old state handed ahead is not the new one's
            self._let_go(run)
        return WorkerState(self.address, self.nthreads, validate=self.validate,
                           transfer_limit=self.memory.transfer_limit,
                           lookahead=LOOKAHEAD)  # fmt: skip

    @property
    def thread_starts(self) -> int:
        """Threads started for lanes so far: tasks handed to a thread through the event loop
        (those handed ahead start on the thread that ends the one before, uncounted)."""
        return self._lanes.threads_started

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_dashboard(self, address: str | int) -> None:
        """Serve /metrics and /health (a worker without them still works: warn and go on)."""
        from ..dashboard.server import WorkerDashboard

        host = self.listen_address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
        try:
            # refused (DashboardRefused, a ValueError) when open beyond loopback: the worker
            # goes on without it
            dashboard = WorkerDashboard(self, address, default_host=host if
                                        self.listen_address.startswith(("tcp://", "tls://"))
                                        and host else "127.0.0.1")  # fmt: skip
            await dashboard.start()
        except (OSError, ValueError) as exc:
            logger.warning("worker %s: no metrics server at %s: %s", self.name, address, exc)
            return
        self.dashboard = dashboard
        logger.info("worker %s metrics at %smetrics", self.name, dashboard.url)

    # ------------------------------------------------------------ the scheduler

    async def _read_scheduler(self, comm: Comm, first: list[Any] | None = None) -> None:
        try:
            while True:
                events: list[WorkerEvent] = []
                batch = first or await comm.read()
                first = None
                for msg in batch:
                    if isinstance(msg, ComputeTask):
                        events.append(ComputeTaskEvent(msg.stimulus_id, msg))
                    elif isinstance(msg, FreeKeys):
                        events.append(FreeKeysEvent(msg.stimulus_id, msg.keys))
                    elif isinstance(msg, RefreshWhoHas):
                        events.append(RefreshWhoHasEvent(msg.stimulus_id, msg.who_has))
                    elif isinstance(msg, AcquireReplicas):
                        events.append(AcquireReplicasEvent(msg.stimulus_id, msg.who_has,
                                                           msg.nbytes))  # fmt: skip
                    elif isinstance(msg, RestartWorker):
                        if events:
                            self._handle(events)
                            events = []
                        self._restart(msg.reason)
                        if not self.in_process:
                            return
                    elif isinstance(msg, CloseWorker):
                        self._spawn(self.close(f"scheduler asked: {msg.reason}"))
                        return
                    else:
                        logger.warning("unexpected message from scheduler: %r", type(msg))
                if events:
                    self._handle(events)
        except CommClosedError:
            if not self._closing:
                logger.warning("lost connection to scheduler %s; reconnecting",
                               self.scheduler_address)  # fmt: skip
                self._spawn(self._reconnect())

    def _restart(self, reason: str) -> None:
        """Drop every task and all data. A worker process exits, for its nanny to start a
        fresh one (``restart_requested``); an in-process worker starts over in place."""
        logger.info("worker %s restarting: %s", self.address, reason)
        self.data.clear()
        self.state = self._new_state()
        if not self.in_process:
            self.restart_requested = True
            self._spawn(self.close(f"restart: {reason}"))

    def _handle(self, events: list[WorkerEvent]) -> None:
        assert self.state is not None
        for instruction in self.state.handle(events, time.time()):
            self._run_instruction(instruction)

    def _run_instruction(self, ins: WorkerInstruction) -> None:
        if isinstance(ins, Execute):
            self._execute(ins.key, ins.lane)
        elif isinstance(ins, Revoke):
            run = self._lanes.revoke(ins.key)
            if run is not None:
                self._let_go(run)
                self._tell_loop(ExecuteSkipped(f"revoke-{ins.key}", ins.key))
        elif isinstance(ins, ToScheduler):
            if self._scheduler is not None and not self._scheduler.closed:
                self._scheduler.send(ins.msg)
        elif isinstance(ins, ReleaseData):
            self.data.discard(ins.key)
            if ins.key in self.actors:
                self.actors.remove(ins.key)
        elif isinstance(ins, Rejoin):
            event = self._rejoin_events.pop(ins.key, None)
            if event is not None:
                event.set()
        elif isinstance(ins, GatherDep):
            self._spawn(self._gather(ins))

    # ---------------------------------------------------------------- execution

    def _execute(self, key: str, lane: int) -> None:
        assert self.state is not None
        ts = self.state.tasks[key]
        compute = ts.compute
        assert compute is not None
        # Spilled inputs come as handles, read back on the task's thread, not here.
        deps = self.data.hold(compute.who_has)
        # What it will allocate: the inputs it reads back or unpickles, and its result.
        need = sum(v.nbytes for v in deps.values() if isinstance(v, Lazy))
        need += self.memory.expected_result(key)
        self._lanes.hand(lane, TaskRun(key, compute.function, compute.args, deps, need))

    def _let_go(self, run: TaskRun) -> None:
        """A run handed ahead will not start: its spilled inputs' files may go."""
        for dep, value in run.deps.items():
            if isinstance(value, Lazy):
                self.data.loaded(dep, value, None)
        run.deps = {}

    def _start_lane(self, lane: Lane, generation: int) -> None:
        try:
            self._executor.submit(self._run_lane, lane, generation)
        except RuntimeError:  # the executor shut down: the worker is closing
            pass

    def _run_lane(self, lane: Lane, generation: int) -> None:
        """A task thread: run the lane's tasks back to back, until it has none left (or the
        task running seceded: the lane goes on without this thread)."""
        run = self._lanes.take(lane, generation)
        while run is not None:
            self._tell_loop(self._run_in_thread(run))
            run = self._lanes.take(lane, generation)

    def _run_in_thread(self, run: TaskRun) -> Outcome:
        key, deps = run.key, run.deps
        reserved = 0
        try:
            # Room first, under the spill line, for what the task will allocate (the store
            # spills meanwhile): acting on a poll after the allocation would be too late.
            reserved = self.memory.reserve(run.need)
            with running(TaskContext(self, key)):
                self.data.wait_to_load(deps)  # room first for inputs coming back from disk
                for dep, value in deps.items():
                    if isinstance(value, Lazy):  # received (`Packed`) or spilled
                        deps[dep] = value.load()
                        # Back into the store, so the next task that needs it need not load it.
                        self.data.loaded(dep, value, deps[dep])
                outcome = run_task(key, run.function, run.args, deps, self.functions, time.time)
        except BaseException as exc:  # noqa: BLE001 - an input that cannot be unpickled
            # (`run_task` itself never raises.) Whatever it is, the run must end with an
            # outcome: without one the task's future hangs and its thread slot is lost.
            outcome = Outcome(key)
            outcome.exception, outcome.traceback, outcome.text = pack_exception(exc)
        run.deps = {}  # the inputs it read back from disk can go now
        if outcome.ok:
            # Backpressure: a result waits (on this thread) for room, not in memory's way.
            try:
                self.data.wait_for_room(outcome.nbytes)
            except BaseException:  # noqa: BLE001 - the result goes in anyway
                logger.exception("waiting for room for %s", key)
        # The result is allocated (in the RSS) or the run failed: the reservation goes.
        self.memory.release(reserved)
        return outcome

    def _tell_loop(self, item: Outcome | WorkerEvent) -> None:
        """Queue what a thread (or a revoke) has to tell the state machine; wake the loop
        once for all that is queued meanwhile."""
        self._done.append(item)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._loop
            if loop is None:
                return
            try:
                loop.call_soon_threadsafe(self._drain_outcomes)
            except RuntimeError:  # the loop closed under us: the worker is going away
                pass

    def _drain_outcomes(self) -> None:
        self._drain_scheduled = False
        events: list[WorkerEvent] = []
        seceded: list[str] = []
        stored = 0
        while self._done:
            out = self._done.popleft()
            if not isinstance(out, Outcome):
                events.append(out)
                if isinstance(out, SecedeEvent):
                    seceded.append(out.key)
            elif out.ok:
                stored += out.nbytes
                self.data[out.key] = out.value
                self.memory.note_result(out.key, out.nbytes)
                events.append(ExecuteDone(f"execute-{out.key}", out.key, out.nbytes,
                                          out.typename, out.start, out.stop, out.warnings))  # fmt: skip
            else:
                assert out.exception is not None
                events.append(ExecuteFailed(f"execute-{out.key}", out.key, out.exception,
                                            out.traceback, out.text, out.start, out.stop,
                                            out.warnings))  # fmt: skip
        if events and not self._closing:
            self.memory.check_now(self, stored)  # results stored: spill or pause now if need be
            self._handle(events)
        # The state machine knows these seceded: their lanes go on with their next task.
        for key in seceded:
            self._lanes.resume(key)

    # ------------------------------------------------- seceding (from task threads)

    def secede_task(self, key: str) -> None:
        """Task ``key`` (calling from its thread) gives its thread slot back."""
        self._lanes.detach(key)  # this thread runs no more of its lane's tasks
        self._from_thread(SecedeEvent(f"secede-{key}", key))

    def rejoin_task(self, key: str) -> None:
        """Task ``key`` (calling from its thread) waits until it holds a thread slot again."""
        event = threading.Event()
        self._rejoin_events[key] = event
        self._from_thread(RejoinEvent(f"rejoin-{key}", key))
        while not event.wait(1.0):
            if self._closing:  # nobody will hand out slots any more
                self._rejoin_events.pop(key, None)
                return
            # Ask again: a no-op while it is queued, and an answer at once from a state
            # machine that was replaced meanwhile (after a reconnect) and does not know it.
            self._from_thread(RejoinEvent(f"rejoin-{key}", key))

    def _from_thread(self, event: WorkerEvent) -> None:
        if self._loop is None or self._closing:
            return
        # Through the outcomes' queue, in order with them: a lane's next outcome must not
        # reach the state machine before the secede of the task that ran before it.
        self._tell_loop(event)

    # ------------------------------------------------------------- data plane

    async def _gather(self, ins: GatherDep) -> None:
        assert self._peers is not None
        stimulus = f"gather-{ins.peer}"
        # Room first for what arrives (the store spills meanwhile), as for a task.
        reserved = await self.memory.reserve_async(ins.total_nbytes)
        try:
            try:
                reply = await self._peers.request(
                    ins.peer, GetData(next_rid(), ins.keys, host=self.shm.wants()),
                    timeout=max(30.0, ins.total_nbytes / 50e6))  # fmt: skip
                held: dict[str, SharedValue] = {}
                if isinstance(reply, DataReply) and reply.shared:
                    # A holder gone since its reply fails the pull, within its deadline.
                    held = await asyncio.get_running_loop().run_in_executor(
                        None, self.shm.receive, reply.endpoint, reply.shared)  # fmt: skip
            except (OSError, asyncio.TimeoutError) as exc:  # PullError is an OSError
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
            for key, value in held.items():
                self.shm.keep(key, value, replace=False)  # backed by the holder's segment
                nbytes[key] = value.nbytes
            self.bytes_in += sum(nbytes.values())
        finally:
            self.memory.release(reserved)
        self.memory.check_now(self, sum(nbytes.values()))  # landed: spill or pause now
        self._handle([GatherDone(stimulus, ins.peer, nbytes, reply.missing)])

    async def _serve_peer(self, comm: Comm) -> None:
        """Answer a client's or another worker's requests on one connection."""
        send = BatchedSend(comm)
        try:
            while True:
                for msg in await comm.read():
                    if send.closed:
                        return
                    allowed = PEER_REQUEST_ROLES.get(type(msg))
                    if comm.peer_roles is not None and allowed and not comm.peer_roles & allowed:
                        logger.warning("closing %s: a %s certificate may not send %s",
                                       comm.peer_address, "/".join(sorted(comm.peer_roles)),
                                       type(msg).__name__)  # fmt: skip
                        return
                    if isinstance(msg, GetData):
                        self._serve_get_data(msg, send)
                    elif isinstance(msg, UpdateData):
                        send.send(self._update_data(msg))
                    elif isinstance(msg, RunFunction):
                        self._spawn(self._run_function(msg, send))
                    elif isinstance(msg, (ActorCall, ActorGetAttr)):
                        self.actors.serve(msg, send)
                    elif isinstance(msg, GetLogs):
                        send.send(Reply(msg.rid, log_ring().rows(msg.n)))
                    else:
                        logger.warning("closing %s: unexpected %s", comm.peer_address,
                                       type(msg).__name__)  # fmt: skip
                        return
        except CommClosedError:
            pass
        finally:
            await send.close()

    def _serve_get_data(self, msg: GetData, send: BatchedSend) -> None:
        """Answer ``msg`` inline when that is quick (small values in memory), else from a
        thread: reading a spilled value back takes seconds per GB, and copying or pickling
        a big one takes long too; the loop meanwhile answers heartbeats and other fetches.
        Replies may then go out in another order than the requests: each carries its rid."""
        in_memory, on_disk = self.data.sizes(msg.keys)
        if on_disk and self.memory.monitor is not None:
            self._spawn(self._get_data_from_disk(msg, send, on_disk))
        elif on_disk or in_memory >= OFF_LOOP_BYTES:
            self._spawn(self._get_data_off_loop(msg, send))
        else:
            send.send(self._get_data(msg))

    async def _get_data_from_disk(self, msg: GetData, send: BatchedSend, nbytes: int) -> None:
        """`_get_data_off_loop` for keys read back from disk to be sent (``nbytes`` once
        read): room first for them, as for a task, but for a short while only (the peer
        waits; its reply holds no room of ours)."""
        reserved = await self.memory.reserve_async(nbytes, timeout=2.0)
        try:
            await self._get_data_off_loop(msg, send)
        finally:
            self.memory.release(reserved)

    async def _get_data_off_loop(self, msg: GetData, send: BatchedSend) -> None:
        """`_get_data` on the worker's data threads; the reply is sent from the loop."""
        if self._closing:
            return  # (its pool is shut down)
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(self._data_pool, self._get_data, msg)
        except Exception:  # noqa: BLE001 - the peer must hear back, not wait for its deadline
            logger.exception("worker %s: answering a fetch of %s", self.name, msg.keys[:5])
            reply = DataReply(msg.rid, {}, list(msg.keys))
        if not send.closed:
            send.send(reply)
        del reply  # not kept by this task's frame: it may hold a GB

    def _get_data(self, msg: GetData) -> DataReply:
        """Safe on any thread (the store is locked); a same-host requester gets big values
        as segments, which may copy them into one first (`WorkerShm.ref_for`)."""
        data: dict[str, Serialized] = {}
        missing: list[str] = []
        shared: dict[str, SharedRef] = {}
        same_host = self.shm.same_host(msg.host)
        for key in msg.keys:
            if key not in self.data:
                missing.append(key)
                continue
            try:
                if same_host:
                    ref, ser = self.shm.ref_for(key)
                    if ref is not None:
                        shared[key] = ref
                        continue
                    if ser is not None:
                        data[key] = ser
                        continue
                value = self.data.peek(key)  # a spilled value: its frames, from disk
                data[key] = value.ser if isinstance(value, Packed) else serialize(value, key)
            except KeyError:  # released meanwhile
                missing.append(key)
            except (TypeError, OSError) as exc:
                logger.error("cannot send %s: %s", key, exc)
                missing.append(key)
        self.bytes_out += sum(ser.nbytes for ser in data.values())
        self.bytes_out += sum(ref.nbytes for ref in shared.values())
        return DataReply(msg.rid, data, missing, shared,
                         self.shm.endpoint if same_host else "")  # fmt: skip

    def _update_data(self, msg: UpdateData) -> Reply:
        nbytes = {}
        if msg.shared:
            if self.shm.broker is None:
                return Reply(msg.rid, error="this worker takes no shared memory")
            try:
                nbytes.update(self.shm.claim(msg.shared))
            except (LookupError, OSError, ValueError) as exc:
                return Reply(msg.rid, error=f"scattered segments: {exc}")
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
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                # KeyboardInterrupt too: raised out of the executor it would reach the loop.
                packed, tb, text = pack_exception(exc)
                return Reply(msg.rid, {"ok": False, "result": packed, "traceback": tb},
                             error=text)  # fmt: skip

        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, call)
        if not send.closed:
            send.send(reply)
