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

from .definition import JobFunction
from .errors import TimeLimitExceeded
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
    except TimeLimitExceeded:
        pass


class InlineExecutor:
    """Runs attempts in the calling thread."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._armed = False

    def run(self, job: JobFunction[Any, Any], message: JobMessage, parents: list[bytes]) -> Outcome:
        limit = message.time_limit
        if limit is None:
            return run_call(job.fn, job.options.retry_on, message.payload, parents, message.pass_results)
        thread_id = threading.get_ident()
        fired = False

        def expire() -> None:
            nonlocal fired
            with self._guard:
                if self._armed:
                    self._armed = False
                    fired = True
                    _raise_in_thread(thread_id, TimeLimitExceeded)

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        try:
            try:
                with self._guard:
                    self._armed = True
                timer.start()
                outcome = run_call(job.fn, job.options.retry_on, message.payload, parents,
                                   message.pass_results)
            finally:
                timer.cancel()
                with self._guard:
                    self._armed = False
                    raised = fired
                if raised:
                    _absorb_raised()
        except TimeLimitExceeded:
            return failure(overrun(limit), isinstance(overrun(limit), job.options.retry_on))
        if not outcome.ok and outcome.error.startswith("TimeLimitExceeded"):
            stopped = overrun(limit)
            outcome.error = f"TimeLimitExceeded: {stopped}"
            outcome.exception = dump_exception(stopped)
            outcome.retryable = isinstance(stopped, job.options.retry_on)
        return outcome

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


class ChildExecutor:
    """Runs attempts in one child process, started on first use and after each kill."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_child = -1
        self._from_child = -1
        self._known: set[str] = set()  #: jobs whose function the child has
        self._lock = threading.Lock()

    def _start(self) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "shoal.jobs.child", str(to_r), str(from_w)],
                pass_fds=(to_r, from_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(to_r)
            os.close(from_w)
        self._to_child, self._from_child = to_w, from_r
        self._known.clear()
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
            request = pickle.dumps((job.name, ref, message.payload, parents, message.pass_results))
        try:
            write_frame(self._to_child, request)
        except OSError as exc:
            self.kill()
            return Outcome(ok=False, error=f"WorkerLost: the job's child process is gone: {exc}")
        self._known.add(job.name)
        try:
            return self._await(job, message)
        except (OSError, ValueError) as exc:  # the worker killed the child while we waited
            return Outcome(ok=False, error=f"WorkerLost: the job's child process was stopped: {exc}")

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
            fds = (self._to_child, self._from_child)
            self._to_child = self._from_child = -1
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
            for fd in (self._to_child, self._from_child):
                if fd >= 0:
                    os.close(fd)
            self._to_child = self._from_child = -1
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
