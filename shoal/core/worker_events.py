"""Events the worker's state machine consumes and instructions it emits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.messages import ComputeTask, Msg
from ..protocol.serialize import Serialized


@dataclass(slots=True)
class WorkerEvent:
    stimulus_id: str


@dataclass(slots=True)
class ComputeTaskEvent(WorkerEvent):
    msg: ComputeTask


@dataclass(slots=True)
class FreeKeysEvent(WorkerEvent):
    keys: list[str]


@dataclass(slots=True)
class AcquireReplicasEvent(WorkerEvent):
    """Fetch and keep copies of these keys (the scheduler empties a retiring worker)."""

    who_has: dict[str, list[str]]
    nbytes: dict[str, int]


@dataclass(slots=True)
class RefreshWhoHasEvent(WorkerEvent):
    who_has: dict[str, list[str]]


@dataclass(slots=True)
class GatherDone(WorkerEvent):
    """A `GatherDep` came back: the server stored ``nbytes``' keys; ``missing`` the peer lacked."""

    peer: str
    nbytes: dict[str, int]
    missing: list[str] = field(default_factory=list)


@dataclass(slots=True)
class GatherFailed(WorkerEvent):
    """A `GatherDep` could not reach ``peer``."""

    peer: str
    keys: list[str]
    reason: str = ""


@dataclass(slots=True)
class ExecuteDone(WorkerEvent):
    key: str
    nbytes: int
    typename: str
    start: float
    stop: float
    warnings: Serialized | None = None


@dataclass(slots=True)
class ExecuteFailed(WorkerEvent):
    key: str
    exception: Serialized
    traceback: Serialized | None
    text: str
    start: float
    stop: float
    warnings: Serialized | None = None


@dataclass(slots=True)
class ExecuteSkipped(WorkerEvent):
    """A task handed ahead (`Execute` behind a running one) was taken back before any thread
    started it (`Revoke`): its run ended without running."""

    key: str


@dataclass(slots=True)
class DataPut(WorkerEvent):
    """Data was put on this worker directly (scatter)."""

    nbytes: dict[str, int]


@dataclass(slots=True)
class SecedeEvent(WorkerEvent):
    """Running task ``key`` gave its thread slot back (it waits on other tasks, or said
    `shoal.secede`): it keeps running, "long-running", and the next ready task may start."""

    key: str


@dataclass(slots=True)
class RejoinEvent(WorkerEvent):
    """Long-running task ``key`` wants a thread slot again; its thread waits for `Rejoin`."""

    key: str


@dataclass(slots=True)
class PauseEvent(WorkerEvent):
    """The worker's memory went above (``paused``) or back below its pause fraction: while
    paused it starts no new task and fetches no new input (running ones go on)."""

    paused: bool


# ---------------------------------------------------------------- instructions


@dataclass(slots=True)
class GatherDep:
    """Fetch ``keys`` from ``peer`` and report `GatherDone` or `GatherFailed`."""

    peer: str
    keys: list[str]
    total_nbytes: int


@dataclass(slots=True)
class Execute:
    """Run task ``key`` on a thread and report `ExecuteDone` or `ExecuteFailed`.

    ``lane`` is the thread slot's run queue: a new lane starts a thread; a lane already
    running gets ``key`` queued behind its tasks (handed ahead), and the thread that finishes
    one starts the next itself, without a round trip through the event loop."""

    key: str
    #: not part of what is asked (which thread runs it is the server's business): not compared
    lane: int = field(default=0, compare=False)


@dataclass(slots=True)
class Revoke:
    """Take task ``key``, handed ahead, out of its lane if no thread took it yet, and report
    `ExecuteSkipped`; if a thread took it, its run reports as usual."""

    key: str


@dataclass(slots=True)
class Rejoin:
    """Let task ``key``'s thread, waiting in `shoal.rejoin`, go on: it holds a slot again."""

    key: str


@dataclass(slots=True)
class ReleaseData:
    """Drop ``key``'s data from the store."""

    key: str


@dataclass(slots=True)
class ToScheduler:
    msg: Msg


WorkerInstruction = GatherDep | Execute | Revoke | Rejoin | ReleaseData | ToScheduler
