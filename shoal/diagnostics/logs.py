"""Logging: one level flag for every shoal server, and the last records kept in memory.

shoal logs through the standard library, under the ``shoal`` logger (``shoal.scheduler``,
``shoal.worker``, ``shoal.comm``...). Its level comes from one place:

- the ``--log-level`` option of ``shoal scheduler`` / ``shoal worker`` (which also reads
  ``SHOAL_LOG_LEVEL``), or
- the ``SHOAL_LOG_LEVEL`` environment variable in any process that starts a server
  (an embedded `LocalCluster`, its worker processes). Without it, shoal leaves the logger
  as the application configured it (Python's default shows warnings and errors).

Every process that runs a scheduler or worker keeps the newest `LOG_RING_SIZE` records that
pass the ``shoal`` logger's level in a `LogRing`; ``client.get_scheduler_logs()`` and
``client.get_worker_logs()`` read them over the protocol. Servers that share a process (an
in-process `LocalCluster`) share its ring.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from typing import Any

__all__ = ["LOG_RING_SIZE", "LogRing", "apply_env_level", "log_ring", "setup_cli_logging"]

#: records each process keeps
LOG_RING_SIZE = 10_000
ENV_VAR = "SHOAL_LOG_LEVEL"
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_LEVELS = ("debug", "info", "warning", "error", "critical")

_lock = threading.Lock()
_ring: LogRing | None = None


class LogRing(logging.Handler):
    """Keeps the newest ``maxlen`` records as ``(time, level, logger, message)`` rows."""

    def __init__(self, maxlen: int = LOG_RING_SIZE) -> None:
        super().__init__()
        self.records: deque[tuple[float, str, str, str]] = deque(maxlen=maxlen)
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message = f"{message}\n{self._formatter.formatException(record.exc_info)}"
            self.records.append((record.created, record.levelname, record.name, message))
        except Exception:  # noqa: BLE001 - a log call must never raise
            self.handleError(record)

    def rows(self, n: int | None = None) -> list[list[Any]]:
        """The newest ``n`` records (all if None), oldest first, as JSON-able lists."""
        records = list(self.records)
        if n is not None:
            records = records[-n:] if n > 0 else []
        return [list(r) for r in records]


def log_ring() -> LogRing:
    """This process's ring, attached to the ``shoal`` logger on first use."""
    global _ring
    with _lock:
        if _ring is None:
            _ring = LogRing()
            logging.getLogger("shoal").addHandler(_ring)
        return _ring


def parse_level(text: str) -> int:
    """``"info"`` / ``"INFO"`` / ``"20"`` -> 20; ValueError for anything else."""
    name = text.strip().lower()
    if name.isdigit():
        return int(name)
    if name not in _LEVELS:
        raise ValueError(f"unknown log level {text!r} (use one of {', '.join(_LEVELS)})")
    level: int = getattr(logging, name.upper())
    return level


def apply_env_level() -> None:
    """Set the ``shoal`` logger's level from ``logging.level`` (``SHOAL_LOG_LEVEL``) if set. When nothing
    would print the records (no handler on the way to the root logger), add one on stderr."""
    from ..config import ConfigError, load_config

    try:  # logging.level of shoal.config: SHOAL_LOGGING__LEVEL, SHOAL_LOG_LEVEL, shoal.toml
        text = load_config().logging.level
    except ConfigError as exc:  # the server fails on it where it matters; logging goes on
        logging.getLogger("shoal").warning("ignoring the configuration's log level: %s", exc)
        return
    if not text:
        return
    level = parse_level(text)
    logger = logging.getLogger("shoal")
    logger.setLevel(level)
    with _lock:
        printing = [h for h in (*logger.handlers, *logging.getLogger().handlers)
                    if not isinstance(h, LogRing)]  # fmt: skip
        if not printing:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            logger.addHandler(handler)


def setup_cli_logging(level: str) -> None:
    """For the ``shoal`` commands: records at ``level`` and above go to stderr."""
    number = parse_level(level)
    logging.basicConfig(level=number, format=FORMAT)
    logging.getLogger("shoal").setLevel(number)
