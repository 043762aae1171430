"""The wire spec: every control message shoal sends, as typed msgspec structs.

Rules (see DESIGN.md):
- Messages are small structs encoded as MessagePack arrays (``array_like``), tagged by a
  short name so one decoder reads a batch of mixed messages.
- User objects travel as `Serialized` (cloudpickled frames) and are never unpickled by the
  scheduler; big buffers ride out-of-band after the MessagePack body (see `codec`).
- New optional fields go at the end with a default, so older peers still decode.
- A request that wants an answer carries ``rid``; the answer is a `Reply` with that ``rid``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from .serialize import Serialized

#: Bumped when a change breaks older peers.
PROTOCOL_VERSION = 1

Role = Literal["client", "worker", "peer", "nanny"]


class Msg(msgspec.Struct, array_like=True, tag_field="op", omit_defaults=False):
    """Base of every message."""


# --------------------------------------------------------------------- handshake


class Hello(Msg, tag="hello"):
    """First message on every connection, from the side that connected."""

    version: int
    role: Role
    name: str
    token: str | None = None
    pid: int = 0


class Welcome(Msg, tag="welcome"):
    """The server's answer to a `Hello` it accepts."""

    version: int
    name: str


class Reject(Msg, tag="reject"):
    """The server's answer to a `Hello` it refuses; the connection is closed after it."""

    reason: str


# --------------------------------------------------------------- generic answers


class Reply(Msg, tag="reply"):
    """Answer to any request carrying ``rid``; ``error`` is set when the request failed."""

    rid: int
    value: Any = None
    error: str | None = None


# ------------------------------------------------------------ client -> scheduler


class TaskSpec(msgspec.Struct, array_like=True, gc=False):
    """One task as the client describes it; ``function``/``args`` are opaque to the scheduler."""

    key: str
    #: cloudpickled callable; the same bytes object is shared by every task of a `map`.
    function: bytes
    #: pickled ``(args, kwargs)`` with futures replaced by placeholders naming their keys.
    args: Serialized
    #: a tuple: most tasks have none, and every empty tuple is the same object
    dependencies: tuple[str, ...]
    priority: int = 0
    retries: int = 0
    resources: dict[str, float] | None = None
    workers: list[str] | None = None
    allow_other_workers: bool = False
    #: seconds before the first retry; doubles with each further retry
    retry_delay: float = 0.1


class SubmitTasks(Msg, tag="submit"):
    """Create tasks (if new) and make the sending client want each of ``wanted``."""

    tasks: list[TaskSpec]
    wanted: list[str]
    stimulus_id: str = ""
    #: the client's generation of its hold on each wanted key (parallel to ``wanted``);
    #: the scheduler echoes it in its reports, so a late report about an earlier hold on a
    #: reused key is recognised as stale (None: generation 0 for each)
    generations: list[int] | None = None


class WantKeys(Msg, tag="want"):
    """The client holds futures for these existing keys (e.g. a future passed between clients)."""

    keys: list[str]
    #: the client's generation of its hold on each key (see `SubmitTasks.generations`)
    generations: list[int] | None = None


class FireAndForgetKeys(Msg, tag="fire-and-forget"):
    """Compute these keys to the end even if every client lets go of them."""

    keys: list[str]


class TaskWarning(Msg, tag="task-warning"):
    """Scheduler -> client: something about a task the user should know (e.g. no worker
    can ever run it); the client re-emits it as a `RuntimeWarning`."""

    key: str
    text: str


class ReleaseKeys(Msg, tag="release"):
    """The client no longer holds futures for these keys."""

    keys: list[str]
    stimulus_id: str = ""
    #: the generation of each hold let go: a hold taken again since (a newer generation)
    #: stays (None: release whatever hold there is)
    generations: list[int] | None = None


class CancelKeys(Msg, tag="cancel"):
    """Cancel these keys for this client (and what depends on them)."""

    keys: list[str]
    stimulus_id: str = ""
    #: the generation of each hold cancelled (as for `ReleaseKeys.generations`)
    generations: list[int] | None = None


class ScatterTargets(Msg, tag="scatter-targets"):
    """Ask which workers to put ``count`` scattered objects on; answered with a `Reply`."""

    rid: int
    count: int
    broadcast: bool = False
    workers: list[str] | None = None


class Scattered(Msg, tag="scattered"):
    """The client put these keys on these workers (directly) and wants them."""

    keys: list[str]
    workers: list[list[str]]
    nbytes: list[int]
    stimulus_id: str = ""
    #: the client's generation of its hold on each key (see `SubmitTasks.generations`)
    generations: list[int] | None = None


class WhoHas(Msg, tag="who-has"):
    """Which workers hold each key (all keys when ``keys`` is None)."""

    rid: int
    keys: list[str] | None = None


class Nthreads(Msg, tag="nthreads"):
    rid: int


class Identity(Msg, tag="identity"):
    """Scheduler address, workers and counts; answered with a `Reply`."""

    rid: int


class RunOnWorkers(Msg, tag="run"):
    """Run ``function`` on every worker (or ``workers``); `Reply` value: address -> Serialized."""

    rid: int
    function: Serialized
    workers: list[str] | None = None


class Story(Msg, tag="story"):
    """The transitions a key went through; `Reply` value is a list of log rows."""

    rid: int
    key: str


class WorkerDeaths(Msg, tag="worker-deaths"):
    """The worker processes that died lately, as their nannies saw it; `Reply` value is a
    list of ``{"address", "name", "reason", "time"}``, oldest first."""

    rid: int


# ----------------------------------------------- observability (client -> scheduler)
# Answered by the scheduler's diagnostics extension (`shoal.diagnostics.service`).


class SchedulerLogs(Msg, tag="scheduler-logs"):
    """The scheduler process's newest ``n`` log records; `Reply` value is a list of
    ``[time, level, logger, message]``, oldest first."""

    rid: int
    n: int = 1000


class WorkerLogs(Msg, tag="worker-logs"):
    """Each worker's (or those of ``workers``) newest ``n`` log records, fetched from them by
    the scheduler; `Reply` value: address -> rows as for `SchedulerLogs`, or
    ``{"error": text}`` for a worker that did not answer."""

    rid: int
    n: int = 1000
    workers: list[str] | None = None


class ProgressWatch(Msg, tag="progress-watch"):
    """Follow ``keys`` and every task they need; `Reply` value ``{"id": watch id, "groups":
    {group: {"total", "done", "erred"}}, "done": bool}``."""

    rid: int
    keys: list[str]


class ProgressUpdate(Msg, tag="progress-update"):
    """The watch's counts now; `Reply` value as for `ProgressWatch`."""

    rid: int
    id: int


class ProgressUnwatch(Msg, tag="progress-unwatch"):
    """Stop following watch ``id`` (also dropped when the client leaves)."""

    id: int


# ------------------------------------------------------------ scheduler -> client


class KeyInMemory(Msg, tag="key-in-memory"):
    key: str
    workers: list[str]
    nbytes: int = 0
    typename: str = ""
    #: warnings the task raised, as a pickled list of (category, message, filename, lineno)
    warnings: Serialized | None = None
    #: the generation of the client's hold this answers (a client drops other generations)
    generation: int = 0


class KeyErred(Msg, tag="key-erred"):
    """The key failed. ``kind`` is "exception" when the task raised (``exception`` is then the
    pickled exception); otherwise the scheduler failed it: "lost", "killed-worker",
    "unknown-dependency", "cancelled", and ``text`` says why."""

    key: str
    kind: str
    text: str
    exception: Serialized | None = None
    traceback: Serialized | None = None
    warnings: Serialized | None = None
    generation: int = 0


class KeyCancelled(Msg, tag="key-cancelled"):
    key: str
    reason: str = ""
    generation: int = 0


class KeyLost(Msg, tag="key-lost"):
    """A key the client holds left memory (its holders died) and is being computed again:
    its futures are pending until a new `KeyInMemory` or `KeyErred`."""

    key: str
    reason: str = ""
    generation: int = 0


class WorkerRemoved(Msg, tag="worker-removed"):
    """Scheduler -> clients: this worker left the cluster. Requests still waiting on it (a
    fetch from a stopped or cut-off worker) fail now and go to another holder."""

    address: str
    reason: str = ""


class SchedulerClosing(Msg, tag="scheduler-closing"):
    reason: str = ""


# --------------------------------------------------------- worker <-> scheduler


class WorkerDeath(msgspec.Struct, array_like=True):
    """How a worker process ended, as its nanny saw it."""

    #: where it listened (empty if it died before it started)
    address: str
    name: str
    #: "signal SIGKILL", "exit code 3", "memory: RSS 190.2 MiB of limit 200.0 MiB"...
    reason: str
    #: when (seconds since the epoch)
    time: float


class RegisterWorker(Msg, tag="register-worker"):
    """Sent by a worker right after the handshake; answered by a `Reply`."""

    rid: int
    address: str
    nthreads: int
    name: str
    memory_limit: int = 0
    resources: dict[str, float] | None = None
    pid: int = 0
    #: keys the worker already holds (re-registration after a broken connection)
    keys: list[str] = []
    nbytes: list[int] = []
    #: an in-process worker resets itself on `RestartWorker` instead of exiting
    restarts_in_place: bool = False
    #: the death of the process this one replaces (sent by its nanny's new worker)
    previous_death: WorkerDeath | None = None
    #: URL of the worker's HTTP server (``/metrics``, ``/health``), empty when it has none
    dashboard: str = ""


class ComputeTask(Msg, tag="compute"):
    key: str
    function: bytes
    args: Serialized
    #: dependency key -> addresses of workers that hold it
    who_has: dict[str, list[str]]
    nbytes: dict[str, int]
    priority: tuple[int, int] = (0, 0)
    resources: dict[str, float] | None = None
    stimulus_id: str = ""


class FreeKeys(Msg, tag="free-keys"):
    """The scheduler no longer needs these keys on this worker."""

    keys: list[str]
    stimulus_id: str = ""


class CloseWorker(Msg, tag="close-worker"):
    reason: str = ""


class TaskFinished(Msg, tag="task-finished"):
    key: str
    nbytes: int
    typename: str
    start: float
    stop: float
    warnings: Serialized | None = None
    stimulus_id: str = ""


class TaskErred(Msg, tag="task-erred"):
    key: str
    exception: Serialized
    traceback: Serialized | None
    text: str
    start: float = 0.0
    stop: float = 0.0
    warnings: Serialized | None = None
    stimulus_id: str = ""


class AddKeys(Msg, tag="add-keys"):
    """The worker now also holds these keys (fetched replicas)."""

    keys: list[str]
    nbytes: list[int]
    stimulus_id: str = ""


class MissingData(Msg, tag="missing-data"):
    """The worker could not get ``key`` from ``holder``: the scheduler should not trust that copy."""

    key: str
    holder: str
    stimulus_id: str = ""


class LongRunning(Msg, tag="long-running"):
    """Worker -> scheduler: task ``key`` seceded (it waits on other tasks) and holds no
    thread slot now; it still reports its result as usual."""

    key: str
    stimulus_id: str = ""


class AcquireReplicas(Msg, tag="acquire-replicas"):
    """Scheduler -> worker: fetch copies of these keys and keep them (a worker retires)."""

    who_has: dict[str, list[str]]
    nbytes: dict[str, int]
    stimulus_id: str = ""


class RestartWorker(Msg, tag="restart-worker"):
    """Scheduler -> worker: drop everything; a worker process exits for its nanny to restart."""

    reason: str = ""


class RetireWorkersRequest(Msg, tag="retire-workers"):
    """Client -> scheduler: move data off these workers, then close them; `Reply` value is
    the list of retired addresses."""

    rid: int
    workers: list[str]
    timeout: float = 60.0


class RestartRequest(Msg, tag="restart"):
    """Client -> scheduler: restart every worker and forget every task."""

    rid: int
    timeout: float = 60.0


class RefreshWhoHas(Msg, tag="refresh-who-has"):
    """Scheduler -> worker: where dependencies can be fetched from now."""

    who_has: dict[str, list[str]]
    stimulus_id: str = ""


class Heartbeat(Msg, tag="heartbeat"):
    executing: int = 0
    ready: int = 0
    #: the process's RSS, bytes
    memory: int = 0
    cpu: float = 0.0
    #: bytes of results spilled to disk, and of results in memory (`shoal.spill`)
    spilled_bytes: int = 0
    managed_bytes: int = 0
    #: memory is above the pause fraction: no new task starts (`shoal.memory`)
    paused: bool = False
    #: bytes of data this worker fetched from peers, and sent to peers and clients, so far
    bytes_in: int = 0
    bytes_out: int = 0
    #: the longest its event loop was blocked since the previous heartbeat, seconds
    #: (`shoal.utils.loop_monitor`; 0.0 under 20 ms)
    loop_lag: float = 0.0


# ------------------------------------------------- anyone <-> worker (data plane)


class SharedRef(msgspec.Struct, array_like=True, gc=False):
    """A value whose out-of-band buffers sit in a shared-memory segment on the sender's host
    (`shoal.comm.shm`): its pickle stream, and where each buffer lies in the segment."""

    #: frame 0 of the value's `Serialized` (the pickle stream, small)
    header: bytes
    #: the segment's id at the holder's endpoint, and the secret that gets its fd
    segment: int
    token: bytes
    #: (offset, length) of each out-of-band buffer, in frame order
    offsets: list[int]
    lengths: list[int]
    #: bytes of the value as sent (header and buffers)
    nbytes: int


class GetData(Msg, tag="get-data"):
    """Ask a worker for data; answered with a `DataReply`."""

    rid: int
    keys: list[str]
    #: the requester's `shoal.comm.shm.host_id` when it takes shared memory ("" if not)
    host: str = ""


class DataReply(Msg, tag="data"):
    rid: int
    data: dict[str, Serialized]
    missing: list[str] = []
    #: values handed through shared memory (same host only), to pull from ``endpoint``
    shared: dict[str, SharedRef] = {}
    #: the answering worker's shared-memory endpoint when it shares the requester's host
    endpoint: str = ""


class UpdateData(Msg, tag="update-data"):
    """Put data on a worker (scatter); answered with a `Reply` whose value is nbytes per key."""

    rid: int
    data: dict[str, Serialized]
    #: values whose segments the client pushed to the worker's endpoint (by token)
    shared: dict[str, SharedRef] = {}


class RunFunction(Msg, tag="run-function"):
    """Run a function on this worker; answered by a `Reply` whose value is a `Serialized`."""

    rid: int
    function: Serialized


class GetLogs(Msg, tag="get-logs"):
    """The worker process's newest ``n`` log records; `Reply` value as for `SchedulerLogs`."""

    rid: int
    n: int = 1000


#: Prefix of an `ActorCall` reply's error that means "no such actor on this worker".
ACTOR_LOST_PREFIX = "ActorLostError: "


class ActorCall(Msg, tag="actor-call"):
    """Call ``method`` of the actor made by task ``key`` on this worker, with the pickled
    ``(args, kwargs)``. Calls run one at a time on the actor's own thread, in the order they
    arrive. `Reply` value ``[True, result]`` or ``[False, exception, traceback]`` (each a
    `Serialized`); ``error`` "ActorLostError: ..." when this worker holds no such actor."""

    rid: int
    key: str
    method: str
    args: Serialized


class ActorGetAttr(Msg, tag="actor-getattr"):
    """Read attribute ``name`` of the actor ``key``, in order with its calls; answered like
    `ActorCall`."""

    rid: int
    key: str
    name: str


# ------------------------------------- coordination and datasets (client <-> scheduler)
# Served by the scheduler's extensions in `shoal.coordination.service`. A blocking request
# carries ``timeout`` (None: wait until answered or the client leaves); the scheduler enforces
# it and then answers with ``error`` "TimeoutError: ..." (leases and events answer False).
# An error names its exception type first ("ValueError: ...", "KeyError: ...").
# A user value travels as an opaque `Serialized` (``value``); a future as its ``key``.


class LeaseAcquire(Msg, tag="lease-acquire"):
    """Take lease ``lease`` (an id the client makes up) on the semaphore ``kind``/``name``
    (a Lock is a semaphore of one lease); `Reply` value True when granted, False on timeout.
    Leases are held by the client connection and given back when it closes."""

    rid: int
    kind: str
    name: str
    lease: str
    max_leases: int = 1
    timeout: float | None = None


class LeaseRelease(Msg, tag="lease-release"):
    """Give ``lease`` back, or stop waiting for it; `Reply` value: whether it was held."""

    rid: int
    kind: str
    name: str
    lease: str


class LeaseCount(Msg, tag="lease-count"):
    """`Reply` value: how many leases on ``kind``/``name`` are held."""

    rid: int
    kind: str
    name: str


class EventSet(Msg, tag="event-set"):
    """Set the event ``name`` (waking every waiter), or clear it when ``value`` is False."""

    rid: int
    name: str
    value: bool = True


class EventWait(Msg, tag="event-wait"):
    """`Reply` value True once the event is set, False when ``timeout`` passes first
    (``timeout`` 0 asks whether it is set now)."""

    rid: int
    name: str
    timeout: float | None = None


class QueuePut(Msg, tag="queue-put"):
    """Append ``value`` or the future ``key`` to queue ``name`` (created with ``maxsize``, 0
    for unbounded); waits for room up to ``timeout``. A key is held until it is taken."""

    rid: int
    name: str
    value: Serialized | None = None
    key: str | None = None
    maxsize: int = 0
    timeout: float | None = None


class QueueGet(Msg, tag="queue-get"):
    """Take from queue ``name``. ``batch`` 0: one item, `Reply` value ``[value, key]``;
    n > 0: n items (waits for all n); -1: every item there now (maybe none). Batches are
    lists of ``[value, key]``."""

    rid: int
    name: str
    batch: int = 0
    timeout: float | None = None


class QueueSize(Msg, tag="queue-size"):
    rid: int
    name: str


class VariableSet(Msg, tag="variable-set"):
    """Set variable ``name`` to ``value`` or to the future ``key`` (held while it is set)."""

    rid: int
    name: str
    value: Serialized | None = None
    key: str | None = None


class VariableGet(Msg, tag="variable-get"):
    """`Reply` value ``[value, key]`` once the variable is set (now or within ``timeout``)."""

    rid: int
    name: str
    timeout: float | None = None


class VariableDelete(Msg, tag="variable-delete"):
    rid: int
    name: str


class StopWaiting(Msg, tag="stop-waiting"):
    """The client no longer waits for its blocking request ``rid``: drop it, answer nothing."""

    rid: int


class Subscribe(Msg, tag="subscribe"):
    """Send this client the messages published on ``topic`` from now on; `Reply` None once
    the subscription is in place. Counted: each Subscribe needs its own Unsubscribe."""

    rid: int
    topic: str


class Unsubscribe(Msg, tag="unsubscribe"):
    topic: str


class Publish(Msg, tag="publish"):
    """Fan ``payload`` out to the clients subscribed to ``topic`` now (as `TopicMessage`)."""

    topic: str
    payload: Serialized


class TopicMessage(Msg, tag="topic-message"):
    """Scheduler -> client: ``payload`` was published on ``topic``."""

    topic: str
    payload: Serialized


class DatasetPublish(Msg, tag="dataset-publish"):
    """Name keys as datasets (name -> key), held by the scheduler until unpublished.
    ``scattered`` names the ones the client scattered from plain objects. All or nothing:
    a name already taken fails the lot unless ``override``."""

    rid: int
    datasets: dict[str, str]
    scattered: list[str] = []
    override: bool = False
    #: name -> keys of the futures inside a scattered object, held as long as the dataset
    inner: dict[str, list[str]] = {}


class DatasetGet(Msg, tag="dataset-get"):
    """`Reply` value ``[key, scattered]``, or None when there is no such dataset."""

    rid: int
    name: str


class DatasetList(Msg, tag="dataset-list"):
    rid: int


class DatasetUnpublish(Msg, tag="dataset-unpublish"):
    rid: int
    name: str


Message = Union[
    Hello,
    Welcome,
    Reject,
    Reply,
    SubmitTasks,
    WantKeys,
    FireAndForgetKeys,
    TaskWarning,
    ReleaseKeys,
    CancelKeys,
    ScatterTargets,
    Scattered,
    WhoHas,
    Nthreads,
    Identity,
    RunOnWorkers,
    Story,
    WorkerDeaths,
    SchedulerLogs,
    WorkerLogs,
    ProgressWatch,
    ProgressUpdate,
    ProgressUnwatch,
    KeyInMemory,
    KeyErred,
    KeyCancelled,
    KeyLost,
    WorkerRemoved,
    SchedulerClosing,
    RegisterWorker,
    ComputeTask,
    FreeKeys,
    CloseWorker,
    TaskFinished,
    TaskErred,
    AddKeys,
    MissingData,
    LongRunning,
    RefreshWhoHas,
    AcquireReplicas,
    RestartWorker,
    RetireWorkersRequest,
    RestartRequest,
    Heartbeat,
    GetData,
    DataReply,
    UpdateData,
    RunFunction,
    GetLogs,
    ActorCall,
    ActorGetAttr,
    # coordination and datasets
    LeaseAcquire,
    LeaseRelease,
    LeaseCount,
    EventSet,
    EventWait,
    QueuePut,
    QueueGet,
    QueueSize,
    VariableSet,
    VariableGet,
    VariableDelete,
    StopWaiting,
    Subscribe,
    Unsubscribe,
    Publish,
    TopicMessage,
    DatasetPublish,
    DatasetGet,
    DatasetList,
    DatasetUnpublish,
]

#: Messages a client may send to a scheduler.
CLIENT_TO_SCHEDULER: tuple[type[Msg], ...] = (
    SubmitTasks,
    RetireWorkersRequest,
    RestartRequest,
    WantKeys,
    FireAndForgetKeys,
    ReleaseKeys,
    CancelKeys,
    ScatterTargets,
    Scattered,
    WhoHas,
    Nthreads,
    Identity,
    RunOnWorkers,
    Story,
    WorkerDeaths,
    # observability (answered by the scheduler's diagnostics extension)
    SchedulerLogs,
    WorkerLogs,
    ProgressWatch,
    ProgressUpdate,
    ProgressUnwatch,
    # coordination and datasets (answered by the scheduler's extensions)
    LeaseAcquire,
    LeaseRelease,
    LeaseCount,
    EventSet,
    EventWait,
    QueuePut,
    QueueGet,
    QueueSize,
    VariableSet,
    VariableGet,
    VariableDelete,
    StopWaiting,
    Subscribe,
    Unsubscribe,
    Publish,
    DatasetPublish,
    DatasetGet,
    DatasetList,
    DatasetUnpublish,
)

#: Messages a scheduler may send to a client (besides `Reply`).
SCHEDULER_TO_CLIENT: tuple[type[Msg], ...] = (
    KeyInMemory,
    KeyErred,
    KeyCancelled,
    KeyLost,
    WorkerRemoved,
    SchedulerClosing,
    TopicMessage,
)

#: Messages a worker may send to a scheduler.
WORKER_TO_SCHEDULER: tuple[type[Msg], ...] = (
    RegisterWorker,
    TaskFinished,
    TaskErred,
    AddKeys,
    MissingData,
    LongRunning,
    Heartbeat,
    Reply,
)

#: Messages anyone who passed the handshake may send to a worker's data listener.
PEER_TO_WORKER: tuple[type[Msg], ...] = (GetData, UpdateData, RunFunction, ActorCall,
                                          ActorGetAttr, GetLogs)
