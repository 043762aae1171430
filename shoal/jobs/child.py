"""A job worker's child process: ``python -m shoal.jobs.child IN_FD OUT_FD``.

Reads requests ``(name, function ref or None, payload, parent results, pass_results)``
as length-prefixed pickles from IN_FD, runs each, writes the pickled `Outcome` to OUT_FD.
Exits at end of input, and (on Linux) when its parent dies.
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

from .executors import read_frame, write_frame
from .runner import Outcome, describe, run_call


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
    in_fd, out_fd = int(argv[0]), int(argv[1])
    jobs: dict[str, tuple[Callable[..., Any], tuple[type[BaseException], ...]]] = {}
    write_frame(out_fd, b"ready")
    while True:
        frame = read_frame(in_fd)
        if frame is None:
            return 0
        name, ref, payload, parents, pass_results = pickle.loads(frame)
        try:
            if ref is not None:
                jobs[name] = _resolve(ref)
            fn, retry_on = jobs[name]
        except Exception as exc:
            outcome = Outcome(ok=False, retryable=False,
                              error=f"UnknownJob: the child process cannot load job {name!r}: "
                                    f"{describe(exc)}")
        else:
            outcome = run_call(fn, retry_on, payload, parents, pass_results)
        write_frame(out_fd, pickle.dumps(outcome))


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
