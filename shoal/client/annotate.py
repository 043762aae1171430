"""Options for everything submitted inside a block: ``with shoal.annotate(priority=1): ...``.

Explicit arguments to ``submit``/``map`` win over an annotation; inner annotations win over
outer ones. The stack is a context variable, so threads and asyncio tasks each see their own.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The options `submit` understands, and what each must be.
TASK_OPTIONS: dict[str, tuple[type, ...]] = {
    "priority": (int,),
    "retries": (int,),
    "retry_delay": (int, float),
    "resources": (dict,),
    "workers": (list, tuple, str),
    "allow_other_workers": (bool,),
}

_current: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "shoal_annotations", default={}
)


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate task options; raise a TypeError/ValueError naming the bad one."""
    for name, value in options.items():
        if name not in TASK_OPTIONS:
            raise TypeError(f"unknown task option {name!r}; known: {sorted(TASK_OPTIONS)}")
        if value is None:
            continue
        if not isinstance(value, TASK_OPTIONS[name]) or (
            isinstance(value, bool) and name not in ("allow_other_workers",)
        ):
            raise TypeError(f"task option {name}={value!r} must be "
                            + " or ".join(t.__name__ for t in TASK_OPTIONS[name]))  # fmt: skip
    if (options.get("retries") or 0) < 0:
        raise ValueError(f"retries must be >= 0, got {options['retries']}")
    resources = options.get("resources") or {}
    for rname, amount in resources.items():
        if not isinstance(rname, str) or not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"resources must map names to amounts >= 0, got {rname!r}: {amount!r}")
    return options


@contextmanager
def annotate(**options: Any) -> Iterator[None]:
    """Apply task options (priority, resources, retries, workers...) inside the block."""
    check_options(options)
    merged = {**_current.get(), **{k: v for k, v in options.items() if v is not None}}
    token = _current.set(merged)
    try:
        yield
    finally:
        _current.reset(token)


def current_annotations() -> dict[str, Any]:
    return _current.get()


def resolve_options(explicit: dict[str, Any]) -> dict[str, Any]:
    """Annotations overlaid with the explicit (non-None) arguments of one call."""
    check_options({k: v for k, v in explicit.items() if v is not None})
    merged = dict(_current.get())
    merged.update({k: v for k, v in explicit.items() if v is not None})
    return merged
