"""Running one task on a worker thread: load the function, build the arguments, call it.

Everything user-facing about a task's outcome is shaped here: the result's size, the
exception as the client will see it (pickled, with the remote traceback as text) and the
warnings the task raised (captured per thread and sent back with the outcome).
"""

from __future__ import annotations

import pickle
import sys
import threading
import traceback
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

from ..protocol.refs import providing
from ..protocol.serialize import Serialized, deserialize, serialize

_capture = threading.local()
_hook_lock = threading.Lock()
_installed = False


def install_warning_capture(always: bool) -> None:
    """Route warnings raised inside tasks to the running task (idempotent).

    ``always`` (worker processes only) shows every warning, not just the first per place,
    so each task run reports its own; an in-process worker leaves the user's filters alone.
    """
    global _installed
    with _hook_lock:
        if _installed:
            return
        original = warnings.showwarning

        def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                        file: Any = None, line: str | None = None) -> None:  # fmt: skip
            records: list[tuple[Any, ...]] | None = getattr(_capture, "records", None)
            if records is None:
                original(message, category, filename, lineno, file, line)
            else:
                records.append((category, str(message), filename, lineno))

        warnings.showwarning = showwarning
        if always:
            warnings.simplefilter("always")
        _installed = True


#: Held while a task's function or arguments are unpickled (not while it runs): unpickling
#: may import modules for the first time, and two threads importing a package with circular
#: imports (dask.array) at once can see it half-initialised ("No dispatch for ndarray").
_UNPICKLING = threading.Lock()


class FunctionCache:
    """Unpickled task functions by their pickled bytes (a `map` shares one function)."""

    def __init__(self, size: int = 512) -> None:
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def load(self, payload: bytes) -> Any:
        with self._lock:
            fn = self._cache.get(payload)
            if fn is not None:
                self._cache.move_to_end(payload)
                return fn
        with _UNPICKLING:
            fn = pickle.loads(payload)
        with self._lock:
            self._cache[payload] = fn
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return fn


class Outcome:
    """What running a task produced, ready for the worker's state machine."""

    __slots__ = ("key", "ok", "value", "nbytes", "typename", "exception", "traceback", "text",
                 "start", "stop", "warnings")  # fmt: skip

    def __init__(self, key: str) -> None:
        self.key = key
        self.ok = False
        self.value: Any = None
        self.nbytes = 0
        self.typename = ""
        self.exception: Serialized | None = None
        self.traceback: Serialized | None = None
        self.text = ""
        self.start = 0.0
        self.stop = 0.0
        self.warnings: Serialized | None = None


def run_task(key: str, function: bytes, args: Serialized, data: Mapping[str, Any],
             functions: FunctionCache, clock: Any) -> Outcome:  # fmt: skip
    """Run a task; never raises (a failure is reported in the `Outcome`)."""
    out = Outcome(key)
    records: list[tuple[Any, ...]] = []
    _capture.records = records
    out.start = clock()
    try:
        fn = functions.load(function)
        with providing(data), _UNPICKLING:
            call_args, call_kwargs = deserialize(args)
        value = fn(*call_args, **call_kwargs)
        out.ok = True
        out.value = value
        out.nbytes = sizeof(value)
        out.typename = type(value).__qualname__
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the client
        # KeyboardInterrupt, SystemExit and other BaseExceptions too: like dask, the client
        # re-raises the task's own exception type. Letting them through would kill the task's
        # thread without an outcome: its future would hang and its thread slot be lost.
        out.ok = False
        out.exception, out.traceback, out.text = pack_exception(exc)
    finally:
        out.stop = clock()
        _capture.records = None
    if records:
        try:
            out.warnings = serialize(records, "warnings")
        except TypeError:
            out.warnings = serialize([(UserWarning, str(r[1]), r[2], r[3]) for r in records])
    return out


def pack_exception(exc: BaseException) -> tuple[Serialized, Serialized, str]:
    """The exception pickled (or a stand-in naming it), its traceback as text, its repr."""
    text = f"{type(exc).__name__}: {exc}"
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc.__traceback__ = None
        packed = serialize(exc, "exception")
        pickle.loads(packed.frames[0], buffers=packed.frames[1:])  # must round-trip
    except Exception:  # noqa: BLE001 - fall back to a plain error that keeps the text
        packed = serialize(RuntimeError(f"{text} (the original exception could not be pickled)"))
    return packed, serialize(tb_text), text


def sizeof(obj: object) -> int:
    """Bytes an object holds, roughly: exact for buffers and arrays, shallow for the rest."""
    # Looked up on the type first: a proxy (an actor handle) answers any attribute remotely.
    nbytes = getattr(obj, "nbytes", None) if hasattr(type(obj), "nbytes") else None
    if isinstance(nbytes, int):
        return nbytes
    if type(obj).__name__ == "DataFrame" and type(obj).__module__.split(".")[0] == "pandas":
        frame = _frame_nbytes(obj)
        if frame is not None:
            return frame
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, (list, tuple, set, frozenset)) and len(obj) < 10_000:
        return sys.getsizeof(obj) + sum(sizeof(x) for x in list(obj)[:1000])
    if isinstance(obj, dict) and len(obj) < 10_000:
        return sys.getsizeof(obj) + sum(sizeof(k) + sizeof(v) for k, v in obj.items())
    try:
        return sys.getsizeof(obj)
    except TypeError:
        return 64


#: Elements of an object array whose sizes are measured to estimate the whole array's.
OBJECT_SAMPLE = 16


def _frame_nbytes(frame: Any) -> int | None:
    """A pandas DataFrame's bytes: its blocks' and its index's buffers, object columns
    estimated from a sample. Not `DataFrame.__sizeof__` (``memory_usage(deep=True)``): that
    builds Series and concatenates indexes, ~0.2 ms a call whatever the size, and every
    result is weighed twice, once on the event loop. None if pandas' internals differ."""
    try:
        arrays = list(frame._mgr.arrays)  # one (2-D) array per block of columns
        arrays.append(frame.index)
        return sum(_array_nbytes(a) for a in arrays) + 128
    except Exception:  # noqa: BLE001 - another pandas: its own (slower) answer then
        return None


def _array_nbytes(array: Any) -> int:
    nbytes = int(array.nbytes)
    if getattr(array, "dtype", None) != object or not len(array):
        return nbytes
    flat = array.ravel() if hasattr(array, "ravel") else array
    n = len(flat)
    step = max(1, n // OBJECT_SAMPLE)
    sample = [sys.getsizeof(x) for x in flat[::step][:OBJECT_SAMPLE]]
    return nbytes + int(sum(sample) / len(sample) * n)


class TaskRun:
    """One task handed to a lane: what its thread needs to run it."""

    __slots__ = ("key", "function", "args", "deps", "need")

    def __init__(self, key: str, function: bytes, args: Serialized, deps: dict[str, Any],
                 need: int) -> None:  # fmt: skip
        self.key = key
        self.function = function
        self.args = args
        #: its inputs (spilled ones as handles, read back on the thread)
        self.deps = deps
        #: bytes it will allocate: room is reserved for them before it starts
        self.need = need


class Lane:
    """A thread slot's run queue (see `WorkerState`): one thread at a time works through it."""

    __slots__ = ("id", "runs", "generation", "current")

    def __init__(self, lane_id: int) -> None:
        self.id = lane_id
        self.runs: deque[TaskRun] = deque()
        #: bumped when its thread's task secedes: that thread lets the lane go
        self.generation = 0
        #: the key its thread runs now
        self.current: str | None = None


class Lanes:
    """The worker's lanes, shared by the event loop (which hands tasks and takes them back)
    and the task threads (which take the next task of their lane when they finish one).

    A lane has a thread while it has tasks; `hand` starts one for a lane that has none
    (``start``, e.g. an executor's submit), counted in ``threads_started``: tasks handed
    behind a running one start without it. All under one lock, held briefly, never while
    a task runs."""

    def __init__(self, start: Callable[[Lane, int], None]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._lanes: dict[int, Lane] = {}
        #: lanes whose thread's task seceded, by that key: their thread starts again once
        #: the state machine has heard of it (`resume`)
        self._detached: dict[str, Lane] = {}
        #: threads started for lanes (loop -> thread hand-offs), for tests and benchmarks
        self.threads_started = 0

    def hand(self, lane_id: int, run: TaskRun) -> None:
        """Queue ``run`` in its lane (from the loop); start a thread if the lane has none."""
        with self._lock:
            lane = self._lanes.get(lane_id)
            if lane is not None:
                lane.runs.append(run)
                return
            lane = self._lanes[lane_id] = Lane(lane_id)
            lane.runs.append(run)
            self.threads_started += 1
        self._start(lane, lane.generation)

    def take(self, lane: Lane, generation: int) -> TaskRun | None:
        """The lane's next task, for its thread; None when the thread should end (the lane
        is empty, and gone, or its last task seceded and the lane went on without it)."""
        with self._lock:
            if lane.generation != generation:
                return None
            if not lane.runs:
                lane.current = None
                if self._lanes.get(lane.id) is lane:
                    del self._lanes[lane.id]
                return None
            run = lane.runs.popleft()
            lane.current = run.key
            return run

    def revoke(self, key: str) -> TaskRun | None:
        """Take ``key`` out of its lane, if no thread took it yet: its run, or None."""
        with self._lock:
            for lane in self._lanes.values():
                for run in lane.runs:
                    if run.key == key:
                        lane.runs.remove(run)
                        return run
        return None

    def detach(self, key: str) -> None:
        """Task ``key`` secedes (called from its thread): its thread lets its lane go."""
        with self._lock:
            for lane in self._lanes.values():
                if lane.current == key:
                    lane.generation += 1
                    lane.current = None
                    self._detached[key] = lane
                    return

    def resume(self, key: str) -> None:
        """The state machine heard that ``key`` seceded: its lane goes on, on a new thread
        (not before: the next task would run while ``key`` still holds the slot)."""
        with self._lock:
            lane = self._detached.pop(key, None)
            if lane is None or self._lanes.get(lane.id) is not lane:
                return
            if not lane.runs:
                del self._lanes[lane.id]
                return
            self.threads_started += 1
        self._start(lane, lane.generation)

    def clear(self) -> list[TaskRun]:
        """Drop every task not started (the state machine that handed them is gone), and
        return them; the threads finish what they run and end."""
        dropped: list[TaskRun] = []
        with self._lock:
            for lane in self._lanes.values():
                dropped += lane.runs
                lane.runs.clear()
                lane.generation += 1
            self._lanes.clear()  # a new state machine numbers its lanes from scratch
            self._detached.clear()
        return dropped

    def __len__(self) -> int:
        """Tasks handed and not started."""
        with self._lock:
            return sum(len(lane.runs) for lane in self._lanes.values())
