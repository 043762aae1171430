"""Builders and filters for testing the pure cores (`shoal.core`) with no sockets.

A test builds events with these helpers, feeds them to ``SchedulerState.handle`` or
``WorkerState.handle`` and picks the instructions it cares about out of the result::

    state = make_scheduler({"w1": 1})
    out = state.handle([submit("c1", make_spec("x"))], now=0.0)
    [compute] = messages(out, ComputeTask)

Every builder fills in a dummy function, dummy arguments and a stimulus id, so a test states
only what matters to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from ..core.scheduler_events import (
    Instruction,
    TaskErredEvent,
    TaskFinishedEvent,
    TasksSubmitted,
    ToClient,
    ToWorker,
    WorkerJoined,
)
from ..core.scheduler_state import SchedulerState
from ..core.worker_events import (
    ComputeTaskEvent,
    ExecuteDone,
    ExecuteFailed,
    ToScheduler,
    WorkerInstruction,
)
from ..core.worker_state import WorkerState
from ..protocol.messages import ComputeTask, FreeKeys, TaskErred, TaskFinished, TaskSpec
from ..protocol.serialize import Serialized

#: Stand-in for a cloudpickled function: the cores never look inside.
DUMMY_FUNCTION = b"shoal-testing-function"
#: Stand-in for a pickled exception.
DUMMY_EXCEPTION = Serialized([b"shoal-testing-exception"])

T = TypeVar("T")
AnyInstruction = Instruction | WorkerInstruction

_ids = itertools.count(1)


def stimulus(name: str = "test") -> str:
    """A fresh stimulus id, ``name-N``."""
    return f"{name}-{next(_ids)}"


# ----------------------------------------------------------------- scheduler side


def make_spec(
    key: str,
    deps: Sequence[str] = (),
    priority: int = 0,
    retries: int = 0,
    *,
    workers: list[str] | None = None,
    allow_other_workers: bool = False,
    resources: dict[str, float] | None = None,
    retry_delay: float = 0.0,
) -> TaskSpec:
    """A `TaskSpec` with dummy function bytes and empty arguments."""
    return TaskSpec(
        key=key,
        function=DUMMY_FUNCTION,
        args=Serialized([b""]),
        dependencies=tuple(deps),
        priority=priority,
        retries=retries,
        resources=resources,
        workers=workers,
        allow_other_workers=allow_other_workers,
        retry_delay=retry_delay,
    )


def make_scheduler(
    workers: Mapping[str, int] = {}, allowed_failures: int = 3
) -> SchedulerState:
    """A validating `SchedulerState` with ``workers`` (address -> nthreads) already joined."""
    state = SchedulerState(allowed_failures=allowed_failures, validate=True)
    if workers:
        state.handle([worker_joined(a, n) for a, n in workers.items()], now=0.0)
    return state


def worker_joined(address: str, nthreads: int = 1) -> WorkerJoined:
    return WorkerJoined(stimulus("worker-joined"), address, nthreads, name=address)


def submit(
    client: str, *specs: TaskSpec, wanted: Sequence[str] | None = None, stimulus_id: str = ""
) -> TasksSubmitted:
    """``client`` submits ``specs`` and wants ``wanted`` (by default: every submitted key)."""
    keys = [s.key for s in specs] if wanted is None else list(wanted)
    return TasksSubmitted(stimulus_id or stimulus("submit"), client, list(specs), keys)


def task_finished(
    worker: str, key: str, nbytes: int = 8, typename: str = "int", stimulus_id: str = ""
) -> TaskFinishedEvent:
    msg = TaskFinished(key, nbytes, typename, start=0.0, stop=0.0)
    return TaskFinishedEvent(stimulus_id or stimulus("task-finished"), worker, msg)


def task_erred(worker: str, key: str, text: str = "ZeroDivisionError: division by zero",
               stimulus_id: str = "") -> TaskErredEvent:  # fmt: skip
    msg = TaskErred(key, DUMMY_EXCEPTION, None, text)
    return TaskErredEvent(stimulus_id or stimulus("task-erred"), worker, msg)


# -------------------------------------------------------------------- worker side


def make_worker(address: str = "w1", nthreads: int = 1) -> WorkerState:
    """A validating `WorkerState`."""
    return WorkerState(address, nthreads, validate=True)


def compute_task(
    key: str,
    who_has: Mapping[str, Sequence[str]] | None = None,
    nbytes: Mapping[str, int] | None = None,
    priority: tuple[int, int] = (0, 0),
    stimulus_id: str = "",
) -> ComputeTaskEvent:
    """The scheduler asks to run ``key``; ``who_has`` maps its dependencies to holders."""
    deps = dict(who_has or {})
    sizes = dict(nbytes) if nbytes is not None else {k: 8 for k in deps}
    msg = ComputeTask(
        key, DUMMY_FUNCTION, Serialized([b""]), {k: list(v) for k, v in deps.items()},
        sizes, priority,
    )  # fmt: skip
    return ComputeTaskEvent(stimulus_id or stimulus("compute"), msg)


def execute_done(key: str, nbytes: int = 8, stimulus_id: str = "") -> ExecuteDone:
    return ExecuteDone(stimulus_id or stimulus("execute-done"), key, nbytes, "int", 0.0, 1.0)


def execute_failed(key: str, text: str = "ValueError: boom", stimulus_id: str = "") -> ExecuteFailed:
    return ExecuteFailed(
        stimulus_id or stimulus("execute-failed"), key, DUMMY_EXCEPTION, None, text, 0.0, 1.0
    )


# ------------------------------------------------------------------------ filters


def messages(out: Iterable[AnyInstruction], kind: type[T]) -> list[T]:
    """The instructions of type ``kind``, or the messages of type ``kind`` inside
    `ToWorker` / `ToClient` / `ToScheduler`, in order."""
    found: list[T] = []
    for inst in out:
        if isinstance(inst, kind):
            found.append(inst)
        elif isinstance(inst, (ToWorker, ToClient, ToScheduler)) and isinstance(inst.msg, kind):
            found.append(inst.msg)
    return found


def sent_to(out: Iterable[AnyInstruction], address: str, kind: type[T]) -> list[T]:
    """Messages of type ``kind`` the scheduler sends to worker ``address``."""
    return [i.msg for i in out if isinstance(i, ToWorker) and i.address == address
            and isinstance(i.msg, kind)]  # fmt: skip


def sent_to_client(out: Iterable[AnyInstruction], client: str, kind: type[T]) -> list[T]:
    """Messages of type ``kind`` the scheduler sends to ``client``."""
    return [i.msg for i in out if isinstance(i, ToClient) and i.client == client
            and isinstance(i.msg, kind)]  # fmt: skip


def freed_keys(out: Iterable[AnyInstruction], address: str) -> list[str]:
    """Every key of every `FreeKeys` sent to worker ``address``, in order."""
    return [k for m in sent_to(out, address, FreeKeys) for k in m.keys]
