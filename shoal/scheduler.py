"""The scheduler server: binds client and worker connections to a pure `SchedulerState`.

Wire messages become events, the state machine decides, and its instructions go out on each
peer's batched connection. Requests that only read state (who_has, nthreads, story) are
answered here directly. User data never passes through: `Serialized` payloads are carried
as opaque bytes, and `run` is forwarded to workers without being unpickled.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .comm.batched import BatchedSend
from .comm.core import Comm, CommClosedError
from .comm.registry import listen
from .core.scheduler_events import (
    ClientConnected,
    ClientDisconnected,
    DataMissing,
    ClusterRestarted,
    DataScattered,
    FireAndForget,
    Instruction,
    KeysCancelled,
    KeysReleased,
    KeysWanted,
    ReplicasAdded,
    RetireWorkers,
    SchedulerEvent,
    TaskErredEvent,
    TaskFinishedEvent,
    TaskSeceded,
    TasksSubmitted,
    Tick,
    ToClient,
    WakeAt,
    WorkerJoined,
    WorkerLeft,
)
from .core.placement import UNKNOWN_DURATION_S
from .core.scheduler_records import key_group
from .core.scheduler_state import SchedulerState
from .dashboard.http import parse_address
from .diagnostics.logs import apply_env_level, log_ring
from .diagnostics.task_stream import TaskStream
from .protocol.messages import (
    PROTOCOL_VERSION,
    AddKeys,
    CancelKeys,
    CloseWorker,
    FireAndForgetKeys,
    Heartbeat,
    Hello,
    Identity,
    LongRunning,
    MissingData,
    Msg,
    Nthreads,
    RegisterWorker,
    ReleaseKeys,
    RestartRequest,
    RetireWorkersRequest,
    Reply,
    RunFunction,
    RunOnWorkers,
    Scattered,
    ScatterTargets,
    SchedulerClosing,
    Story,
    SubmitTasks,
    TaskErred,
    TaskFinished,
    WantKeys,
    WhoHas,
    WorkerRemoved,
    WorkerDeath,
    WorkerDeaths,
)
from .comm.rpc import PeerPool, next_rid

from .security.policy import SCHEDULER_FRAME_LIMITS, check_bind
from .utils.loop_monitor import LoopMonitor, watch_loop

if TYPE_CHECKING:
    from .dashboard.server import SchedulerDashboard
    from .security.credentials import Security

logger = logging.getLogger("shoal.scheduler")

#: Worker deaths the scheduler remembers (`Scheduler.deaths`), the latest ones.
MAX_DEATHS = 1000
#: After a restart, the longest the first workers back wait (seconds) for the others to come
#: back before they get work (each brings back results the others would recompute).
RESTART_SETTLE_S = 2.0
#: Most values one scatter may ask targets for: the answer holds one list per value, so a
#: count of 2**40 would make the scheduler build it until it runs out of memory.
MAX_SCATTER_VALUES = 1_000_000


class Extension:
    """A service the scheduler hosts beside task scheduling (coordination, datasets...).

    It answers the client messages whose types are in ``handles``, on the scheduler's loop,
    and hears when a client leaves (to release what that client held).
    """

    handles: tuple[type[Msg], ...] = ()

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        raise NotImplementedError

    def client_left(self, client: str) -> None:
        """``client`` disconnected."""

    async def close(self) -> None:
        """The scheduler is closing."""


class Scheduler:
    """The scheduler's server. ``await start()``; ``address`` is where clients and workers go."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8786,
        *,
        token: str | None = None,
        name: str = "scheduler",
        validate: bool = False,
        handshake_timeout: float = 10.0,
        worker_ttl: float | None = None,
        dashboard_address: str | int | None = None,
        jobs: Any = None,
        security: Security | None = None,
        insecure: bool = False,
        frame_limits: dict[str, int] | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_fsync_interval: float = 0.05,
        restart_grace: float = 30.0,
    ) -> None:
        """``security``: TLS credentials (the scheduler's certificate); the scheduler then
        listens at ``tls://``. Without TLS or a ``token`` it refuses to listen beyond
        loopback unless ``insecure``. ``frame_limits`` (role -> bytes) caps what each
        authenticated client or worker may send in one frame (`SCHEDULER_FRAME_LIMITS`).
        ``journal``: a file recording every event that changes the state (`shoal.journal`),
        fsynced every ``journal_fsync_interval`` s; started on an existing one, the scheduler
        replays it, then gives clients ``restart_grace`` s to come back and hold their keys
        again (workers come back with their results whenever they reconnect)."""
        scheme = "tls" if security is not None else "tcp"
        self.listen_address = f"{scheme}://{host}:{port}" if "://" not in host else host
        #: TLS credentials (None: plain TCP); the dashboard serves HTTPS with them
        self.security = security
        self.insecure = insecure
        self.frame_limits = {**SCHEDULER_FRAME_LIMITS, **(frame_limits or {})}
        self.token = token
        self.name = name
        self.handshake_timeout = handshake_timeout
        #: a worker silent (no message, no heartbeat) this long is removed, its work moved
        #: seconds of silence before a worker is removed (default: scheduler.worker_ttl)
        self.worker_ttl = worker_ttl if worker_ttl is not None else _config().scheduler.worker_ttl
        self._last_seen: dict[str, float] = {}
        #: address -> futures resolved when that worker's connection ends (retirement)
        self._gone_waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: set whenever a worker joins (restart waits for the workers to come back)
        self._workers_changed = asyncio.Event()
        #: workers that restart in place (in-process ones) rather than exit for a nanny
        self._in_place: set[str] = set()
        self.state = SchedulerState(validate=validate)
        self.address = ""
        self.started = 0.0
        self._listener: Any = None
        self._clients: dict[str, BatchedSend] = {}
        self._workers: dict[str, BatchedSend] = {}
        self._worker_comms: dict[str, Comm] = {}
        self._client_ids = itertools.count(1)
        self._peers: PeerPool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        self._closing = False
        #: address -> the latest heartbeat (for metrics and the dashboard)
        self.heartbeats: dict[str, Heartbeat] = {}
        #: the watchdog of the scheduler's event loop (shared with what else runs on it)
        self.loop_monitor: LoopMonitor | None = None
        #: worker processes that died, as their nannies told (the latest `MAX_DEATHS`)
        self.deaths: collections.deque[WorkerDeath] = collections.deque(maxlen=MAX_DEATHS)
        #: services beside task scheduling (locks, queues, datasets...), see `Extension`
        self.extensions: list[Extension] = []
        from .coordination.service import coordination_extensions  # it imports this module

        self.extensions.extend(coordination_extensions(self))
        from .diagnostics.service import DiagnosticsExtension  # it imports this module

        self.extensions.append(DiagnosticsExtension(self))
        #: finished and erred task runs as workers reported them (the dashboard's task stream)
        self.task_stream = TaskStream()
        #: worker address -> URL of its HTTP server (/metrics), for those that have one
        self.worker_dashboards: dict[str, str] = {}
        #: where the dashboard listens ("[HOST]:PORT"; None: no dashboard); see `dashboard`
        self.dashboard_address = dashboard_address
        if dashboard_address is not None:
            parse_address(dashboard_address)  # a bad address fails here, not at start
        self._jobs = jobs
        self.dashboard: SchedulerDashboard | None = None
        from .journal.server import ServerJournal  # the journal imports the core only

        if not restart_grace >= 0:
            raise ValueError(f"restart_grace must be >= 0 seconds, not {restart_grace!r}")
        self.journal = (ServerJournal(journal, journal_fsync_interval)
                        if journal is not None else None)  # fmt: skip
        self.restart_grace = restart_grace
        self._journal_stopping = asyncio.Event()
        self._journal_task: asyncio.Task[None] | None = None
        #: clients the replayed journal knew: gone unless they come back within the grace
        self.replayed_clients: set[str] = set()
        #: after a replay, workers of the previous run not back yet, and the joins of those
        #: back, held (up to `RESTART_SETTLE_S`) so that one worker back first does not
        #: recompute what the others bring back
        self._returning: set[str] = set()
        self._deferred_joins: dict[str, WorkerJoined] = {}
        #: after a replay, how many of the previous run's clients have not re-attached yet
        #: (their resubmissions name tasks the journal's lost last interval may not know:
        #: results of those that workers bring back are kept only if the task is known)
        self._clients_expected = 0

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> Scheduler:
        check_bind(self.listen_address, tls=self.security is not None, token=self.token,
                   insecure=self.insecure, what="the scheduler")  # fmt: skip
        if self.journal is not None:
            self._restore()
        self._listener = await listen(
            self.listen_address, self._serve, name=self.name, token=self.token,
            handshake_timeout=self.handshake_timeout, roles={"client", "worker"},
            security=self.security, frame_limits=self.frame_limits,
        )  # fmt: skip
        self.address = self._listener.address
        self.loop_monitor = watch_loop(self._loop_owner)  # released by `close`
        # Workers answer `run` on these connections: they get the same cap as on theirs.
        self._peers = PeerPool(Hello(PROTOCOL_VERSION, "peer", self.name, self.token,
                                     os.getpid()), security=self.security,
                               max_frame_bytes=self.frame_limits.get("worker"))  # fmt: skip
        self.started = time.time()
        self._spawn(self._watch_workers())
        if self.journal is not None:
            self._journal_task = asyncio.ensure_future(
                self.journal.run(self.state, self._journal_stopping))
            if self.replayed_clients:
                asyncio.get_running_loop().call_later(self.restart_grace, self._end_grace)
            if self._returning or self._clients_expected:
                asyncio.get_running_loop().call_later(min(RESTART_SETTLE_S, self.restart_grace),
                                                      self._flush_joins)  # fmt: skip
        apply_env_level()
        log_ring()
        logger.info("scheduler at %s", self.address)
        if self.dashboard_address is not None:
            await self._start_dashboard(self.dashboard_address)
        return self

    def _restore(self) -> None:
        """Rebuild the state from the journal; the workers it knew are gone until they
        register again (with the results they hold, which are kept)."""
        from .core.scheduler_records import FIRE_AND_FORGET
        from .journal.replay import restart_events

        assert self.journal is not None
        stats = self.journal.open(self.state)
        if stats is None:
            return
        self.replayed_clients = set(self.state.clients) - {FIRE_AND_FORGET}
        # New clients get names the replayed ones do not have.
        suffixes = [int(c.rpartition("-")[2]) for c in self.replayed_clients
                    if c.rpartition("-")[2].isdigit()]  # fmt: skip
        self._client_ids = itertools.count(max(suffixes, default=0) + 1)
        self._returning = set(self.state.workers)
        self._clients_expected = len(suffixes)
        self.journal.mark_restart(time.time())
        self.state.restored = True
        self._handle(restart_events(self.state, "the scheduler restarted"))
        logger.info("restored %d tasks from journal %s; waiting %ss for %d clients to come"
                    " back", len(self.state.tasks), self.journal.path, self.restart_grace,
                    len(self.replayed_clients))  # fmt: skip

    def _join_worker(self, event: WorkerJoined) -> None:
        self._deferred_joins[event.address] = event
        self._returning.discard(event.address)
        if not self._returning and not self._clients_expected:
            self._flush_joins()  # else at the latest when the settling time is over

    def _client_back(self) -> None:
        self._clients_expected = max(0, self._clients_expected - 1)
        if not self._clients_expected and not self._returning:
            self._flush_joins()

    def _flush_joins(self) -> None:
        if self._returning or self._clients_expected:
            logger.warning("restart: %d workers and %d clients of the previous run not back"
                           " after %ss; going on without them", len(self._returning),
                           self._clients_expected, RESTART_SETTLE_S)  # fmt: skip
        self._returning.clear()
        self._clients_expected = 0
        joins = list(self._deferred_joins.values())
        self._deferred_joins.clear()
        if joins and not self._closing:
            self._handle([*joins])

    def _end_grace(self) -> None:
        """Clients of the previous run that did not come back are gone: their holds end.
        (A client that comes back holds its keys under a new name.)"""
        if self._closing:
            return
        gone = sorted(c for c in self.replayed_clients if c not in self._clients)
        self.replayed_clients.clear()
        if gone:
            logger.info("restart grace over: releasing the holds of %d clients of the previous"
                        " run", len(gone))  # fmt: skip
            self._handle([ClientDisconnected(f"restart-grace-{c}", c) for c in gone])

    async def _start_dashboard(self, address: str | int) -> None:
        from .dashboard.auth import DashboardRefused
        from .dashboard.server import SchedulerDashboard

        host = self.listen_address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
        try:
            dashboard = SchedulerDashboard(self, address, self._jobs, default_host=host if
                                           self.listen_address.startswith(("tcp://", "tls://"))
                                           and host else "127.0.0.1")  # fmt: skip
        except DashboardRefused:
            await self.close()  # an open dashboard beyond loopback: refuse to start at all
            raise
        try:
            await dashboard.start()
        except OSError as exc:
            logger.warning("no dashboard: cannot listen at %s: %s", address, exc)
            return
        self.dashboard = dashboard
        logger.info("dashboard at %s", dashboard.url)

    @property
    def dashboard_link(self) -> str:
        """The dashboard's URL ("" when it has none)."""
        return self.dashboard.url if self.dashboard is not None else ""

    def attach_jobs(self, jobs: Any) -> None:
        """Show this `shoal.jobs` queue on the dashboard and in ``/metrics``: a broker URL,
        ``"module:app"``, a `JobQueue` or a `Broker`."""
        self._jobs = jobs
        if self.dashboard is not None:
            self.dashboard.jobs.attach(jobs)

    async def _watch_workers(self) -> None:
        """Drop workers that stopped answering (stopped process, cut network)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(min(1.0, self.worker_ttl / 5))
            now = loop.time()
            for address, seen in list(self._last_seen.items()):
                if now - seen > self.worker_ttl:
                    logger.warning("worker %s silent for %.1fs (worker-ttl %ss): removing it",
                                   address, now - seen, self.worker_ttl)  # fmt: skip
                    self._last_seen.pop(address, None)
                    comm = self._worker_comms.get(address)
                    if comm is not None:
                        comm.abort()  # its reader ends and reports the worker gone

    def __await__(self) -> Any:
        return self.start().__await__()

    async def finished(self) -> None:
        await self._closed.wait()

    async def close(self, close_workers: bool | None = None) -> None:
        """``close_workers`` (default: unless there is a journal, i.e. it will come back)
        tells the workers to close too."""
        if self._closing:
            await self._closed.wait()
            return
        if close_workers is None:
            close_workers = self.journal is None
        self._closing = True
        # The journal ends here: what closing does to the state (clients and workers leave)
        # is not recorded, so that a restart finds them as they were.
        if self._journal_task is not None:
            self._journal_stopping.set()
            await asyncio.gather(self._journal_task, return_exceptions=True)
        if self.journal is not None:
            self.journal.close()
        logger.info("scheduler %s closing", self.address)
        # Say goodbye before the listener aborts the connections it still serves.
        for send in list(self._workers.values()):
            if close_workers and not send.closed:
                send.send(CloseWorker("scheduler is closing"))
            await send.close()
        for send in list(self._clients.values()):
            if not send.closed:
                send.send(SchedulerClosing("scheduler is closing"))
            await send.close()
        if self._listener is not None:
            await self._listener.stop()
        if self.dashboard is not None:
            await self.dashboard.close()
        for ext in self.extensions:
            await ext.close()
        if self._peers is not None:
            await self._peers.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current),
                             return_exceptions=True)  # fmt: skip
        if self.loop_monitor is not None:
            self.loop_monitor.release(self._loop_owner)
        self._closed.set()

    @property
    def _loop_owner(self) -> str:
        return f"scheduler {self.name}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ state driving

    def _handle(self, events: list[SchedulerEvent]) -> None:
        now = time.time()
        if self.journal is not None and not self._closing:
            self.journal.record(now, events, self.state.restored)  # before: handle may edit specs
        self._dispatch(self.state.handle(events, now))

    def _dispatch(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, WakeAt):
                self._wake_at(ins.when)
                continue
            if isinstance(ins, ToClient):
                send = self._clients.get(ins.client)
            else:
                send = self._workers.get(ins.address)
            # A peer that is going away is handled when its connection's reader ends.
            if send is not None and not send.closed:
                send.send(ins.msg)

    def _wake_at(self, when: float) -> None:
        """Feed the state a `Tick` at ``when`` (it reads no clock itself)."""
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        loop.call_later(delay, lambda: None if self._closing else self._handle([Tick("tick")]))

    # ---------------------------------------------------------------- serving

    async def _serve(self, comm: Comm) -> None:
        hello = comm.peer
        assert hello is not None
        if hello.role == "worker":
            self._current_task_track()
            await self._serve_worker(comm)
        else:
            self._current_task_track()
            await self._serve_client(comm, hello)

    def _current_task_track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_client(self, comm: Comm, hello: Hello) -> None:
        client = f"{hello.name}-{next(self._client_ids)}"
        send = BatchedSend(comm)
        self._clients[client] = send
        self._handle([ClientConnected(f"connect-{client}", client)])
        logger.info("client %s connected from %s", client, comm.peer_address)
        returning = self._clients_expected > 0  # its first batch re-attaches its keys
        try:
            while True:
                events: list[SchedulerEvent] = []
                for msg in await comm.read():
                    if events and any(isinstance(msg, ext.handles) for ext in self.extensions):
                        # An extension may hold keys submitted earlier in this batch.
                        self._handle(events)
                        events = []
                    event = self._client_event(client, msg, send)
                    if event is not None:
                        events.append(event)
                if events:
                    self._handle(events)
                if returning:
                    returning = False
                    self._client_back()
        except CommClosedError:
            pass
        except Exception:
            logger.exception("closing connection to client %s", client)
        finally:
            self._clients.pop(client, None)
            for ext in self.extensions:
                ext.client_left(client)
            self._handle([ClientDisconnected(f"disconnect-{client}", client)])
            await send.close()
            logger.info("client %s disconnected", client)

    def _client_event(self, client: str, msg: Msg, send: BatchedSend) -> SchedulerEvent | None:
        if isinstance(msg, SubmitTasks):
            return TasksSubmitted(msg.stimulus_id or "submit", client, msg.tasks, msg.wanted,
                                  msg.generations)  # fmt: skip
        if isinstance(msg, ReleaseKeys):
            return KeysReleased(msg.stimulus_id or "release", client, msg.keys, msg.generations)
        if isinstance(msg, WantKeys):
            return KeysWanted("want", client, msg.keys, msg.generations)
        if isinstance(msg, FireAndForgetKeys):
            return FireAndForget("fire-and-forget", msg.keys)
        if isinstance(msg, CancelKeys):
            return KeysCancelled(msg.stimulus_id or "cancel", client, msg.keys, msg.generations)
        if isinstance(msg, Scattered):
            return DataScattered(msg.stimulus_id or "scatter", client, msg.keys, msg.workers,
                                 msg.nbytes, msg.generations)  # fmt: skip
        if isinstance(msg, WhoHas):
            send.send(Reply(msg.rid, self.who_has(msg.keys)))
        elif isinstance(msg, Nthreads):
            send.send(Reply(msg.rid, {a: w.nthreads for a, w in self.state.workers.items()}))
        elif isinstance(msg, Identity):
            send.send(Reply(msg.rid, self.identity()))
        elif isinstance(msg, Story):
            send.send(Reply(msg.rid, [list(row) for row in self.state.story(msg.key)]))
        elif isinstance(msg, WorkerDeaths):
            send.send(Reply(msg.rid, self.worker_deaths()))
        elif isinstance(msg, ScatterTargets):
            if not 0 <= msg.count <= MAX_SCATTER_VALUES:  # the answer is a list of that length
                send.send(Reply(msg.rid, error=f"ValueError: cannot scatter {msg.count} values"
                                f" at once (the limit is {MAX_SCATTER_VALUES})"))
            else:
                send.send(Reply(msg.rid, self._scatter_targets(msg)))
        elif isinstance(msg, RunOnWorkers):
            self._spawn(self._run_on_workers(msg, send))
        elif isinstance(msg, RetireWorkersRequest):
            self._spawn(self._retire_workers(msg, send))
        elif isinstance(msg, RestartRequest):
            self._spawn(self._restart(msg, send))
        else:
            for ext in self.extensions:
                if isinstance(msg, ext.handles):
                    ext.handle(client, msg, send)
                    return None
            raise ValueError(f"a client may not send {type(msg).__name__}")
        return None

    async def _serve_worker(self, comm: Comm) -> None:
        try:
            first = await asyncio.wait_for(comm.read(), self.handshake_timeout)
        except (CommClosedError, asyncio.TimeoutError):
            comm.abort()
            return
        if len(first) != 1 or not isinstance(first[0], RegisterWorker):
            logger.warning("worker at %s did not register; closing", comm.peer_address)
            comm.abort()
            return
        reg = first[0]
        address = reg.address
        if address in self._workers:
            await comm.write([Reply(reg.rid, error=f"a worker at {address} is already here")])
            comm.abort()
            return
        send = BatchedSend(comm)
        self._workers[address] = send
        self._worker_comms[address] = comm
        send.send(Reply(reg.rid, {"address": self.address}))
        self._workers_changed.set()
        if reg.restarts_in_place:
            self._in_place.add(address)
        self._join_worker(WorkerJoined(f"worker-join-{address}", address, reg.nthreads,
                                       reg.name, reg.memory_limit, dict(reg.resources or {}),
                                       list(reg.keys), list(reg.nbytes)))  # fmt: skip
        logger.info("worker %s (%s, %d threads) joined", address, reg.name, reg.nthreads)
        if reg.dashboard:
            self.worker_dashboards[address] = reg.dashboard
        if reg.previous_death is not None:
            death = reg.previous_death
            self.deaths.append(death)
            logger.warning("worker %s (%s) had died: %s; %s replaces it", death.address,
                           death.name, death.reason, address)  # fmt: skip
        reason, graceful = "connection closed", False
        loop = asyncio.get_running_loop()
        self._last_seen[address] = loop.time()
        try:
            while True:
                events: list[SchedulerEvent] = []
                batch = await comm.read()
                if address not in self._last_seen:
                    break  # declared dead by the watchdog while this batch was in flight
                self._last_seen[address] = loop.time()
                for msg in batch:
                    if isinstance(msg, TaskFinished):
                        events.append(TaskFinishedEvent(msg.stimulus_id, address, msg))
                        self.task_stream.record(msg.key, key_group(msg.key), address,
                                                msg.start, msg.stop)  # fmt: skip
                    elif isinstance(msg, TaskErred):
                        events.append(TaskErredEvent(msg.stimulus_id, address, msg))
                        self.task_stream.record(msg.key, key_group(msg.key), address,
                                                msg.start, msg.stop, "error")  # fmt: skip
                    elif isinstance(msg, AddKeys):
                        events.append(ReplicasAdded(msg.stimulus_id, address, msg.keys,
                                                    msg.nbytes))  # fmt: skip
                    elif isinstance(msg, LongRunning):
                        events.append(TaskSeceded(msg.stimulus_id, address, msg.key))
                    elif isinstance(msg, MissingData):
                        events.append(DataMissing(msg.stimulus_id, address, msg.key,
                                                  msg.holder))  # fmt: skip
                    elif isinstance(msg, Heartbeat):
                        self.heartbeats[address] = msg
                    else:
                        raise ValueError(f"a worker may not send {type(msg).__name__}")
                if events:
                    self._handle(events)
        except CommClosedError as exc:
            reason = str(exc) or reason
            record = self.state.workers.get(address)
            graceful = self._closing or (record is not None and record.retiring)
        except Exception as exc:
            logger.exception("closing connection to worker %s", address)
            reason = f"protocol error: {exc}"
        finally:
            for waiter in self._gone_waiters.pop(address, []):
                if not waiter.done():
                    waiter.set_result(None)
            self._workers.pop(address, None)
            self._in_place.discard(address)
            self._workers_changed.set()
            self._worker_comms.pop(address, None)
            self._last_seen.pop(address, None)
            self.heartbeats.pop(address, None)
            self.worker_dashboards.pop(address, None)
            if self._peers is not None:
                self._peers.forget(address)
            deferred = self._deferred_joins.pop(address, None)
            if not self._closing and deferred is None:
                self._handle([WorkerLeft(f"worker-left-{address}", address, reason, graceful)])
                # Clients fetching from it (it may be stopped, not closed) go elsewhere now.
                for client_send in self._clients.values():
                    if not client_send.closed:
                        client_send.send(WorkerRemoved(address, reason))
            await send.close()
            logger.info("worker %s left: %s", address, reason)

    def hold_keys(self, holder: str, keys: list[str]) -> None:
        """Keep ``keys`` alive for ``holder`` (a name, e.g. ``dataset:x``) like a client would."""
        self._handle([KeysWanted(f"hold-{holder}", holder, keys)])

    def release_keys(self, holder: str, keys: list[str]) -> None:
        self._handle([KeysReleased(f"release-{holder}", holder, keys)])

    # ------------------------------------------------------------------ queries

    def who_has(self, keys: list[str] | None) -> dict[str, list[str]]:
        tasks = self.state.tasks
        if keys is None:
            keys = [k for k, ts in tasks.items() if ts.who_has]
        return {k: sorted(w.address for w in tasks[k].who_has) if k in tasks else []
                for k in keys}  # fmt: skip

    def identity(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "name": self.name,
            "started": self.started,
            "workers": {
                a: {"name": w.name, "nthreads": w.nthreads, "memory_limit": w.memory_limit,
                    "processing": len(w.processing), "nbytes": w.nbytes,
                    "dashboard": self.worker_dashboards.get(a, ""),
                    **self._memory_of(a)}
                for a, w in self.state.workers.items()
            },
            "tasks": len(self.state.tasks),
            "clients": len(self.state.clients),
            "dashboard": self.dashboard_link,
            "workload": self._workload(),
        }  # fmt: skip

    def _workload(self) -> dict[str, float]:
        """Work not done yet, for adaptive scaling (`shoal.deploy.adaptive`): tasks waiting,
        queued or running, and their expected seconds (their group's mean duration)."""
        durations = self.state.group_duration
        count = seconds = 0.0
        for ts in self.state.tasks.values():
            if ts.state in ("waiting", "queued", "processing", "no-worker"):
                count += 1
                seconds += durations.get(ts.group, UNKNOWN_DURATION_S)
        return {"tasks": count, "seconds": seconds}

    def _memory_of(self, address: str) -> dict[str, Any]:
        """What the worker's latest heartbeat said of its memory."""
        beat = self.heartbeats.get(address) or Heartbeat()
        return {"memory": beat.memory, "managed_bytes": beat.managed_bytes,
                "spilled_bytes": beat.spilled_bytes, "paused": beat.paused}  # fmt: skip

    def worker_deaths(self) -> list[dict[str, Any]]:
        """The worker deaths nannies reported, oldest first."""
        return [{"address": d.address, "name": d.name, "reason": d.reason, "time": d.time}
                for d in self.deaths]  # fmt: skip

    def _scatter_targets(self, msg: ScatterTargets) -> list[list[str]]:
        workers = [w for a, w in self.state.workers.items()
                   if msg.workers is None or a in msg.workers or w.name in msg.workers]  # fmt: skip
        if not workers:
            return []
        if msg.broadcast:
            return [[w.address for w in workers] for _ in range(msg.count)]
        # Spread over the workers, the emptiest first.
        ordered = sorted(workers, key=lambda w: (w.nbytes, len(w.has_what)))
        return [[ordered[i % len(ordered)].address] for i in range(msg.count)]

    async def _run_on_workers(self, msg: RunOnWorkers, send: BatchedSend) -> None:
        assert self._peers is not None
        targets = [a for a in self.state.workers if msg.workers is None or a in msg.workers]

        async def one(address: str) -> tuple[str, Any]:
            assert self._peers is not None
            try:
                reply = await self._peers.request(address, RunFunction(next_rid(), msg.function))
                return address, reply.value
            except OSError as exc:
                return address, {"ok": False, "result": None, "error": str(exc)}

        results = dict(await asyncio.gather(*(one(a) for a in targets)))
        if not send.closed:  # the client may have left meanwhile
            send.send(Reply(msg.rid, results))

    async def _retire_workers(self, msg: RetireWorkersRequest, send: BatchedSend) -> None:
        """Move data off the workers, close them, answer with those that left in time."""
        known = [a for a in msg.workers if a in self.state.workers]
        loop = asyncio.get_running_loop()
        waiters = {a: loop.create_future() for a in known}
        for address, waiter in waiters.items():
            self._gone_waiters.setdefault(address, []).append(waiter)
        self._handle([RetireWorkers(f"retire-{msg.rid}", known)])
        if waiters:
            await asyncio.wait(list(waiters.values()), timeout=msg.timeout)
        gone = [a for a, w in waiters.items() if w.done()]
        if not send.closed:
            send.send(Reply(msg.rid, gone))

    async def _restart(self, msg: RestartRequest, send: BatchedSend) -> None:
        """Restart every worker (their nannies start fresh ones); wait for as many to return."""
        before = len(self.state.workers)
        old = set(self.state.workers)
        self._handle([ClusterRestarted(f"restart-{msg.rid}")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + msg.timeout
        # In-process workers restart in place; processes leave and new ones register.
        leaving = old - self._in_place
        while leaving & set(self.state.workers) or len(self.state.workers) < before:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._workers_changed.clear()
            try:
                await asyncio.wait_for(self._workers_changed.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass
        if not send.closed:
            send.send(Reply(msg.rid, len(self.state.workers)))


def _config() -> Any:
    """shoal.config's effective values, read only for keywords not given."""
    from .config import load_config

    return load_config()
