"""The scheduler's records: one `TaskState` per key, one `WorkerRecord` per worker."""

from __future__ import annotations

import sys
from typing import Any, Literal

from ..protocol.messages import TaskSpec
from ..protocol.serialize import Serialized
from .scheduler_events import ClientId

TaskStateName = Literal[
    "released", "waiting", "queued", "no-worker", "processing", "memory", "erred"
]

#: The pseudo-client holding keys passed to `fire_and_forget`.
FIRE_AND_FORGET = "fire-and-forget"
#: States in which a task still needs its inputs.
_NEEDS_INPUTS = ("waiting", "queued", "no-worker", "processing")

#: How many transitions one story log keeps (a bounded ring).
STORY_LOG_SIZE = 100_000

#: The one empty set all tasks start with (an empty CPython set is 216 bytes, and most tasks
#: never fill most of theirs): a task gets its own set when something is first added. It is
#: a frozenset, so a site that mutates it in place fails loudly instead of sharing state.
EMPTY: set[Any] = frozenset()  # type: ignore[assignment]


class Failure:
    """Why a task erred: the task's own exception, or the scheduler's verdict."""

    __slots__ = ("kind", "text", "exception", "traceback", "blame")

    def __init__(
        self,
        kind: str,
        text: str,
        exception: Serialized | None = None,
        traceback: Serialized | None = None,
        blame: str = "",
    ) -> None:
        self.kind = kind  #: "exception", "killed-worker", "lost", "unknown-dependency"
        self.text = text
        self.exception = exception
        self.traceback = traceback
        self.blame = blame  #: key of the task that failed first


class TaskState:
    """The scheduler's record of one key."""

    __slots__ = (
        "key", "state", "spec", "priority", "dependencies", "dependents", "waiting_on",
        "who_wants", "who_has", "processing_on", "nbytes", "typename", "failure",
        "retries_left", "suspicious", "warnings", "group", "est", "not_before", "attempts",
    )  # fmt: skip

    def __init__(self, key: str, spec: TaskSpec | None, priority: tuple[int, int]) -> None:
        self.key = key
        self.state: TaskStateName = "released"
        #: None for data that was scattered, not computed: it cannot be recomputed.
        self.spec = spec
        self.priority = priority
        # Sets start as the shared EMPTY; see `EMPTY` for the rule.
        self.dependencies: set[TaskState] = EMPTY
        self.dependents: set[TaskState] = EMPTY
        #: dependencies not yet in memory (only while waiting)
        self.waiting_on: set[TaskState] = EMPTY
        #: client -> the generation of its hold on this key (echoed in reports to it)
        self.who_wants: dict[ClientId, int] = {}
        #: workers holding it, in the order they got it: a tuple, as it is nearly always one
        #: or two (a one-member set is 216 bytes, a tuple 48)
        self.who_has: tuple[WorkerRecord, ...] = ()
        self.processing_on: WorkerRecord | None = None
        self.nbytes = 0
        self.typename = ""
        self.failure: Failure | None = None
        self.retries_left = spec.retries if spec is not None else 0
        #: how many workers died while this task was on them
        self.suspicious = 0
        self.warnings: Serialized | None = None
        self.group = sys.intern(key_group(key))  # one string per group, not per task
        #: expected duration, fixed while the task is processing (so sums stay exact)
        self.est = 0.0
        #: a retry waits in the queue until this time
        self.not_before = 0.0
        self.attempts = 0

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state}>"


class WorkerRecord:
    """The scheduler's record of one worker."""

    __slots__ = ("address", "name", "nthreads", "memory_limit", "resources", "processing",
                 "has_what", "nbytes", "occupancy", "used_resources", "long_running",
                 "retiring", "replicating")  # fmt: skip

    def __init__(self, address: str, nthreads: int, name: str, memory_limit: int,
                 resources: dict[str, float]) -> None:  # fmt: skip
        self.address = address
        self.name = name
        self.nthreads = max(1, nthreads)
        self.memory_limit = memory_limit
        self.resources = resources
        self.processing: set[TaskState] = set()
        self.has_what: set[TaskState] = set()
        self.nbytes = 0
        #: expected seconds of work in ``processing``
        self.occupancy = 0.0
        self.used_resources: dict[str, float] = {}
        #: tasks of ``processing`` that seceded: they hold no thread (and count no time)
        self.long_running: set[TaskState] = set()
        #: being retired: takes no new work; closed once its data has other holders
        self.retiring = False
        #: keys asked to be copied off this retiring worker, not yet copied
        self.replicating: set[TaskState] = set()

    @property
    def load(self) -> float:
        """Tasks assigned per thread: the measure of "least loaded"."""
        return len(self.processing) / self.nthreads

    def __repr__(self) -> str:
        return f"<WorkerRecord {self.address} processing={len(self.processing)}>"


def key_group(key: str) -> str:
    """The key's group (its prefix): ``inc-1f3a...`` -> ``inc``; ``('x', 1)`` style -> ``x``
    (dask's tuple keys, e.g. ``"('add-8a3f...', 0, 1)"`` -> ``add``)."""
    if key[:2] in ("('", '("'):
        end = key.find(key[1], 2)
        if end > 2:
            key = key[2:end]
    head, sep, tail = key.rpartition("-")
    if sep and head and (len(tail) >= 8 or tail.isdigit()):
        return head
    return key
