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
    dependencies: list[str]
    priority: int = 0
    retries: int = 0
    resources: dict[str, float] | None = None
    workers: list[str] | None = None
    allow_other_workers: bool = False


class SubmitTasks(Msg, tag="submit"):
    """Create tasks (if new) and make the sending client want each of ``wanted``."""

    tasks: list[TaskSpec]
    wanted: list[str]
    stimulus_id: str = ""


class WantKeys(Msg, tag="want"):
    """The client holds futures for these existing keys (e.g. a future passed between clients)."""

    keys: list[str]


class ReleaseKeys(Msg, tag="release"):
    """The client no longer holds futures for these keys."""

    keys: list[str]
    stimulus_id: str = ""


class CancelKeys(Msg, tag="cancel"):
    """Cancel these keys for this client (and what depends on them)."""

    keys: list[str]
    stimulus_id: str = ""


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


# ------------------------------------------------------------ scheduler -> client


class KeyInMemory(Msg, tag="key-in-memory"):
    key: str
    workers: list[str]
    nbytes: int = 0
    typename: str = ""
    #: warnings the task raised, as a pickled list of (category, message, filename, lineno)
    warnings: Serialized | None = None


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


class KeyCancelled(Msg, tag="key-cancelled"):
    key: str
    reason: str = ""


class SchedulerClosing(Msg, tag="scheduler-closing"):
    reason: str = ""


# --------------------------------------------------------- worker <-> scheduler


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


class RefreshWhoHas(Msg, tag="refresh-who-has"):
    """Scheduler -> worker: where dependencies can be fetched from now."""

    who_has: dict[str, list[str]]
    stimulus_id: str = ""


class Heartbeat(Msg, tag="heartbeat"):
    executing: int = 0
    ready: int = 0
    memory: int = 0
    cpu: float = 0.0


# ------------------------------------------------- anyone <-> worker (data plane)


class GetData(Msg, tag="get-data"):
    """Ask a worker for data; answered with a `DataReply`."""

    rid: int
    keys: list[str]


class DataReply(Msg, tag="data"):
    rid: int
    data: dict[str, Serialized]
    missing: list[str] = []


class UpdateData(Msg, tag="update-data"):
    """Put data on a worker (scatter); answered with a `Reply` whose value is nbytes per key."""

    rid: int
    data: dict[str, Serialized]


class RunFunction(Msg, tag="run-function"):
    """Run a function on this worker; answered by a `Reply` whose value is a `Serialized`."""

    rid: int
    function: Serialized


Message = Union[
    Hello,
    Welcome,
    Reject,
    Reply,
    SubmitTasks,
    WantKeys,
    ReleaseKeys,
    CancelKeys,
    ScatterTargets,
    Scattered,
    WhoHas,
    Nthreads,
    Identity,
    RunOnWorkers,
    Story,
    KeyInMemory,
    KeyErred,
    KeyCancelled,
    SchedulerClosing,
    RegisterWorker,
    ComputeTask,
    FreeKeys,
    CloseWorker,
    TaskFinished,
    TaskErred,
    AddKeys,
    MissingData,
    RefreshWhoHas,
    Heartbeat,
    GetData,
    DataReply,
    UpdateData,
    RunFunction,
]

#: Messages a client may send to a scheduler.
CLIENT_TO_SCHEDULER: tuple[type[Msg], ...] = (
    SubmitTasks,
    WantKeys,
    ReleaseKeys,
    CancelKeys,
    ScatterTargets,
    Scattered,
    WhoHas,
    Nthreads,
    Identity,
    RunOnWorkers,
    Story,
)

#: Messages a worker may send to a scheduler.
WORKER_TO_SCHEDULER: tuple[type[Msg], ...] = (
    RegisterWorker,
    TaskFinished,
    TaskErred,
    AddKeys,
    MissingData,
    Heartbeat,
    Reply,
)

#: Messages anyone who passed the handshake may send to a worker's data listener.
PEER_TO_WORKER: tuple[type[Msg], ...] = (GetData, UpdateData, RunFunction)
