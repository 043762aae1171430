"""Running one attempt of a job: arguments in, an `Outcome` out. Used in the worker's
threads and in its child processes alike; never raises."""

from __future__ import annotations

import traceback as tb_module
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ..protocol.serialize import SerializationError
from .cancellation import CancelFlag, install
from .payload import dump_exception, dump_result, load, load_arguments


class Outcome(msgspec.Struct, kw_only=True):
    """How an attempt ended."""

    ok: bool
    result: bytes | None = None  #: pickled return value (ok)
    error: str = ""  #: ``"Type: message"``
    traceback: str | None = None
    exception: bytes | None = None  #: the pickled exception, when it can be
    retryable: bool = True  #: False: fail for good now (not in retry_on, or undecodable)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failure(exc: BaseException, retryable: bool, error: str | None = None) -> Outcome:
    return Outcome(ok=False, error=error or describe(exc),
                   traceback="".join(tb_module.format_exception(exc)),
                   exception=dump_exception(exc), retryable=retryable)


def run_call(fn: Callable[..., Any], retry_on: tuple[type[BaseException], ...], payload: bytes,
             parent_results: Sequence[bytes], pass_results: bool,
             flag: CancelFlag | None = None) -> Outcome:
    """Unpickle the arguments, call ``fn``, pickle what it returns. ``flag``: the job's
    cancel flag, which `shoal.jobs.check_cancelled` reads in this thread while ``fn`` runs."""
    try:
        args, kwargs = load_arguments(payload)
        parents = [load(r) for r in parent_results] if pass_results else []
    except Exception as exc:
        return Outcome(ok=False, retryable=False,
                       error=f"UndecodableArguments: cannot unpickle the job's arguments: {describe(exc)}",
                       traceback="".join(tb_module.format_exception(exc)))
    install(flag)
    try:
        value = fn(*parents, *args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - a job's SystemExit is its failure too
        return failure(exc, isinstance(exc, retry_on))
    finally:
        install(None)
    try:
        return Outcome(ok=True, result=dump_result(value))
    except SerializationError as exc:
        return failure(exc, False)
