"""Where an attempt runs: in the slot's own thread, or in a child process it owns.

Thread mode is cheapest; its time limit is cooperative (see `policy.time_limit`). Process
mode runs each attempt in a long-lived child process per slot (``python -m
shoal.jobs.child``), killed and replaced when an attempt overruns its time limit, so hard
limits hold and a job that crashes its interpreter takes only its child down.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import cloudpickle

from .cancellation import CancelFlag
from .definition import JobFunction
from .errors import JobCancelled, TimeLimitExceeded
from .message import JobMessage
from .payload import dump_exception
from .policy.time_limit import overrun
from .runner import Outcome, failure, run_call

_HEADER = struct.Struct("!I")


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc_type))  # fmt: skip


def _absorb_raised() -> None:
    """Let an exception `_raise_in_thread` sent to this thread arrive (at the next bytecode
    boundary) and drop it. Withdrawing it with ``SetAsyncExc(NULL)`` instead leaves CPython's
    eval breaker set for good: every thread runs slower, and line tracing (debuggers,
    coverage) loops forever on one line."""
    try:
        for _ in range(1000):
            pass
    except (TimeLimitExceeded, JobCancelled):
        pass


class InlineExecutor:
    """Runs attempts in the calling thread."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._armed = False  #: an attempt runs: an exception may be raised in its thread
        self._fired: type[BaseException] | None = None  #: what was raised in it, if any
        self._thread_id = 0
        self._flag: CancelFlag | None = None

    def _stop_locked(self, exc_type: type[BaseException]) -> None:
        """Raise ``exc_type`` in the attempt's thread, once (hold ``_guard``)."""
        if self._armed and self._fired is None:
            self._fired = exc_type
            _raise_in_thread(self._thread_id, exc_type)

    def _expire(self) -> None:
        with self._guard:
            self._stop_locked(TimeLimitExceeded)

    def run(self, job: JobFunction[Any, Any], message: JobMessage, parents: list[bytes]) -> Outcome:
        limit = message.time_limit
        flag = CancelFlag(message.id)
        with self._guard:
            self._armed, self._fired = True, None
            self._thread_id, self._flag = threading.get_ident(), flag
        timer = None
        if limit is not None:
            timer = threading.Timer(limit, self._expire)
            timer.daemon = True
        try:
            try:
                if timer is not None:
                    timer.start()
                outcome = run_call(job.fn, job.options.retry_on, message.payload, parents,
                                   message.pass_results, flag)
            finally:
                if timer is not None:
                    timer.cancel()
                with self._guard:
                    self._armed, self._flag = False, None
                    raised = self._fired
                if raised is not None:
                    _absorb_raised()
        except TimeLimitExceeded:
            assert limit is not None
            return failure(overrun(limit), isinstance(overrun(limit), job.options.retry_on))
        except JobCancelled as exc:
            return failure(exc, False)
        if limit is not None and not outcome.ok and outcome.error.startswith("TimeLimitExceeded"):
            stopped = overrun(limit)
            outcome.error = f"TimeLimitExceeded: {stopped}"
            outcome.exception = dump_exception(stopped)
            outcome.retryable = isinstance(stopped, job.options.retry_on)
        return outcome

    def cancel(self, job_id: str, hard: bool) -> None:
        """Tell the attempt of ``job_id`` (if it is the one running) it is cancelled; with
        ``hard``, also raise `JobCancelled` in its thread."""
        with self._guard:
            flag = self._flag
            if flag is None or flag.job_id != job_id:
                return
            flag.set = True
            if hard:
                self._stop_locked(JobCancelled)

    def prepare(self) -> None:
        pass

    def kill(self) -> None:
        """Threads cannot be killed: an attempt left running is abandoned (its result is
        then ignored if the job was handed to someone else)."""

    def close(self) -> None:
        pass


def callable_ref(job: JobFunction[Any, Any]) -> bytes:
    """How a child process finds the job's function: by module and name when the job is
    importable there, else the function pickled by value (cloudpickle)."""
    fn = job.fn
    try:
        module = importlib.import_module(fn.__module__)
        found: Any = module
        for part in fn.__qualname__.split("."):
            found = getattr(found, part)
        if found is job and fn.__module__ != "__main__":
            return pickle.dumps(("ref", fn.__module__, fn.__qualname__, job.options.retry_on))
    except Exception:
        pass
    return bytes(cloudpickle.dumps(("value", fn, job.options.retry_on)))


def read_frame(fd: int) -> bytes | None:
    """One length-prefixed frame, or None at end of file."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    return _read_exact(fd, _HEADER.unpack(head)[0])


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


#: one child replaced at a time across a worker's slots, so the others keep running
_recycling = threading.Lock()


def child_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return int(psutil.Process(pid).memory_info().rss)
        except Exception:
            return 0


class ChildExecutor:
    """Runs attempts in one child process, started on first use and after each kill.

    Recycling: with ``max_jobs``, the child is replaced after that many attempts; with
    ``max_memory`` (bytes), after an attempt that leaves it above that resident size. The
    worker calls `recycle_if_due` between jobs, in the slot's own thread: the slot's next
    job waits for the new child, the other slots keep running (and replacements happen one
    at a time)."""

    def __init__(self, max_jobs: int | None = None, max_memory: int | None = None) -> None:
        self.max_jobs = max_jobs
        self.max_memory = max_memory
        self.recycled = 0  #: children replaced by recycling
        self._runs = 0  #: attempts the current child has run
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_child = -1
        self._from_child = -1
        self._control = -1  #: ids of cancelled jobs go to the child here (then SIGUSR1)
        self._known: set[str] = set()  #: jobs whose function the child has
        self._lock = threading.Lock()
        self._current: str | None = None  #: the job whose attempt the child runs
        self._doomed = False  #: killed by a hard cancel: replace it after this attempt

    def _start(self) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        os.set_blocking(ctl_w, False)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "shoal.jobs.child", str(to_r), str(from_w), str(ctl_r)],
                pass_fds=(to_r, from_w, ctl_r), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(ctl_w)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
            os.close(ctl_r)
        self._to_child, self._from_child, self._control = to_w, from_r, ctl_w
        self._known.clear()
        self._runs = 0
        # The child says it is ready once imported, so start-up never eats a time limit.
        ready, _, _ = select.select([from_r], [], [], 120.0)
        if not ready or read_frame(from_r) != b"ready":
            raise RuntimeError("the job worker's child process did not start")

    def prepare(self) -> None:
        """Start the child now rather than at the first job."""
        with self._lock:
            if self._proc is None:
                self._start()

    def run(self, job: JobFunction[Any, Any], message: JobMessage, parents: list[bytes]) -> Outcome:
        with self._lock:
            if self._proc is None:
                self._start()
            ref = None if job.name in self._known else callable_ref(job)
            request = pickle.dumps((job.name, ref, message.payload, parents, message.pass_results,
                                    message.id))
            self._current = message.id
            self._runs += 1
        try:
            try:
                write_frame(self._to_child, request)
            except OSError as exc:
                self.kill()
                return Outcome(ok=False, error=f"WorkerLost: the job's child process is gone: {exc}")
            self._known.add(job.name)
            try:
                return self._await(job, message)
            except (OSError, ValueError) as exc:  # the worker killed the child while we waited
                return Outcome(ok=False,
                               error=f"WorkerLost: the job's child process was stopped: {exc}")
        finally:
            with self._lock:
                self._current = None
                doomed, self._doomed = self._doomed, False
            if doomed:
                self.kill()  # reap it; the next attempt starts a new child

    def recycle_if_due(self) -> str | None:
        """Between jobs: replace the child if it ran ``max_jobs`` attempts or holds more than
        ``max_memory`` bytes; returns why, or None."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            why = None
            if self.max_jobs is not None and self._runs >= self.max_jobs:
                why = f"it ran {self._runs} jobs (--max-jobs-per-child {self.max_jobs})"
            elif self.max_memory is not None:
                rss = child_rss(proc.pid)
                if rss > self.max_memory:
                    why = (f"it holds {rss / 2**20:.0f} MiB (--max-memory-per-child "
                           f"{self.max_memory / 2**20:.0f} MiB)")
        if why is None:
            return None
        with _recycling:
            self.close()
            self.recycled += 1
            self.prepare()
        return why

    def cancel(self, job_id: str, hard: bool) -> None:
        """Tell the child that the attempt of ``job_id`` (if it is the one running) is
        cancelled: its flag is set (the id on the control pipe, then SIGUSR1); with ``hard``,
        kill the child instead (the slot replaces it)."""
        with self._lock:
            proc = self._proc
            if proc is None or self._current != job_id or proc.poll() is not None:
                return
            if hard:
                self._doomed = True
                proc.send_signal(signal.SIGKILL)
                return
            try:
                os.write(self._control, job_id.encode() + b"\n")
            except (BlockingIOError, OSError):
                pass  # the hard stop follows after the grace period
            proc.send_signal(signal.SIGUSR1)

    def _await(self, job: JobFunction[Any, Any], message: JobMessage) -> Outcome:
        limit = message.time_limit
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._from_child], [], [], wait)
            if ready:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.kill()
                assert limit is not None
                stopped = overrun(limit)
                return Outcome(ok=False, error=f"TimeLimitExceeded: {stopped}",
                               exception=dump_exception(stopped),
                               retryable=isinstance(stopped, job.options.retry_on))
        frame = read_frame(self._from_child)
        if frame is None:
            code = self.kill()
            return Outcome(ok=False, error=f"WorkerLost: the child process running the job died "
                                           f"(exit code {code})")
        return pickle.loads(frame)  # type: ignore[no-any-return]

    def kill(self) -> int | None:
        """Kill the child (if any); the next `run` starts a new one. Returns its exit code.
        The child dies first, so a slot waiting on it sees end of file, not a closed fd."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return None
            fds = (self._to_child, self._from_child, self._control)
            self._to_child = self._from_child = self._control = -1
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        return code

    def close(self) -> None:
        """Stop the child: closing its pipe ends it once its current attempt is done."""
        with self._lock:
            proc, self._proc = self._proc, None
            for fd in (self._to_child, self._from_child, self._control):
                if fd >= 0:
                    os.close(fd)
            self._to_child = self._from_child = self._control = -1
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
