"""Events the scheduler's state machine consumes and instructions it emits.

Events are facts that already happened (a client submitted, a worker left); instructions are
messages to send. The server turns wire messages into events and instructions into sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.messages import Msg, TaskErred, TaskFinished, TaskSpec

ClientId = str


@dataclass(slots=True)
class SchedulerEvent:
    stimulus_id: str


@dataclass(slots=True)
class ClientConnected(SchedulerEvent):
    client: ClientId


@dataclass(slots=True)
class ClientDisconnected(SchedulerEvent):
    client: ClientId


@dataclass(slots=True)
class TasksSubmitted(SchedulerEvent):
    client: ClientId
    tasks: list[TaskSpec]
    wanted: list[str]
    #: the client's generation of its hold on each key (None: 0 for each)
    generations: list[int] | None = None


@dataclass(slots=True)
class KeysWanted(SchedulerEvent):
    client: ClientId
    keys: list[str]
    #: the client's generation of its hold on each key (None: 0 for each)
    generations: list[int] | None = None


@dataclass(slots=True)
class KeysReleased(SchedulerEvent):
    client: ClientId
    keys: list[str]
    #: the generation of each hold let go; a newer hold stays (None: any hold)
    generations: list[int] | None = None


@dataclass(slots=True)
class KeysCancelled(SchedulerEvent):
    client: ClientId
    keys: list[str]
    #: the generation of each hold let go; a newer hold stays (None: any hold)
    generations: list[int] | None = None


@dataclass(slots=True)
class DataScattered(SchedulerEvent):
    client: ClientId
    keys: list[str]
    workers: list[list[str]]
    nbytes: list[int]
    #: the client's generation of its hold on each key (None: 0 for each)
    generations: list[int] | None = None


@dataclass(slots=True)
class WorkerJoined(SchedulerEvent):
    address: str
    nthreads: int
    name: str = ""
    memory_limit: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    #: keys the worker already holds, with their sizes
    keys: list[str] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class WorkerLeft(SchedulerEvent):
    address: str
    reason: str = ""
    #: True when the worker shut down cleanly (its tasks did not kill it)
    graceful: bool = False


@dataclass(slots=True)
class TaskFinishedEvent(SchedulerEvent):
    worker: str
    msg: TaskFinished


@dataclass(slots=True)
class TaskErredEvent(SchedulerEvent):
    worker: str
    msg: TaskErred


@dataclass(slots=True)
class ReplicasAdded(SchedulerEvent):
    worker: str
    keys: list[str]
    nbytes: list[int]


@dataclass(slots=True)
class DataMissing(SchedulerEvent):
    """``worker`` could not fetch ``key`` from ``holder``."""

    worker: str
    key: str
    holder: str


@dataclass(slots=True)
class TaskSeceded(SchedulerEvent):
    """``worker``'s task ``key`` gave its thread back (it waits on other tasks): it no longer
    counts against the worker's threads, so queued work may go there."""

    worker: str
    key: str


@dataclass(slots=True)
class Tick(SchedulerEvent):
    """Time passed (answers a `WakeAt`): delayed retries may be due."""


@dataclass(slots=True)
class FireAndForget(SchedulerEvent):
    """Keep computing these keys until they finish, even when no client holds them."""

    keys: list[str]


@dataclass(slots=True)
class RetireWorkers(SchedulerEvent):
    """Move the data only these workers hold to others, then close them."""

    workers: list[str]


@dataclass(slots=True)
class ClusterRestarted(SchedulerEvent):
    """Every worker restarts: every task is lost and forgotten."""

    reason: str = "the cluster was restarted"


# ---------------------------------------------------------------- instructions


@dataclass(slots=True)
class ToWorker:
    address: str
    msg: Msg


@dataclass(slots=True)
class ToClient:
    client: ClientId
    msg: Msg


@dataclass(slots=True)
class WakeAt:
    """Feed a `Tick` back at time ``when`` (the core reads no clock)."""

    when: float


Instruction = ToWorker | ToClient | WakeAt
