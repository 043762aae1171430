"""A job worker's child process: ``python -m shoal.jobs.child IN_FD OUT_FD CONTROL_FD``.

Reads requests ``(name, function ref or None, payload, parent results, pass_results,
job id)`` as length-prefixed pickles from IN_FD, runs each, writes the pickled `Outcome` to
OUT_FD. On SIGUSR1 it reads cancelled job ids (one a line) from CONTROL_FD and sets the
running job's cancel flag if its id is among them (a late signal meant for an earlier job
finds another id and changes nothing). Exits at end of input, and (on Linux) when its
parent dies.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any

from .cancellation import CancelFlag
from .executors import read_frame, write_frame
from .runner import Outcome, describe, run_call

#: the flag of the job running now (read by the SIGUSR1 handler)
_running: CancelFlag | None = None
#: ids cancelled so far (a signal may come just before its job's flag is made)
_cancelled: set[str] = set()


def _on_cancel(control_fd: int) -> None:
    data = b""
    while True:
        try:
            chunk = os.read(control_fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    if len(_cancelled) > 1000:
        _cancelled.clear()
    _cancelled.update(i.decode() for i in data.split(b"\n") if i)
    flag = _running
    if flag is not None and flag.job_id in _cancelled:
        flag.set = True


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _resolve(ref: bytes) -> tuple[Callable[..., Any], tuple[type[BaseException], ...]]:
    kind, *rest = pickle.loads(ref)
    if kind == "value":
        fn, retry_on = rest
        return fn, retry_on
    module, qualname, retry_on = rest
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return getattr(found, "fn", found), retry_on


def main(argv: list[str]) -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    global _running
    in_fd, out_fd = int(argv[0]), int(argv[1])
    if len(argv) > 2:
        control_fd = int(argv[2])
        os.set_blocking(control_fd, False)
        signal.signal(signal.SIGUSR1, lambda *_: _on_cancel(control_fd))
    jobs: dict[str, tuple[Callable[..., Any], tuple[type[BaseException], ...]]] = {}
    write_frame(out_fd, b"ready")
    while True:
        frame = read_frame(in_fd)
        if frame is None:
            return 0
        name, ref, payload, parents, pass_results, job_id = pickle.loads(frame)
        try:
            if ref is not None:
                jobs[name] = _resolve(ref)
            fn, retry_on = jobs[name]
        except Exception as exc:
            outcome = Outcome(ok=False, retryable=False,
                              error=f"UnknownJob: the child process cannot load job {name!r}: "
                                    f"{describe(exc)}")
        else:
            _running = CancelFlag(job_id)
            _running.set = job_id in _cancelled
            try:
                outcome = run_call(fn, retry_on, payload, parents, pass_results, _running)
            finally:
                _running = None
        write_frame(out_fd, pickle.dumps(outcome))


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
