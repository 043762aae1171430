"""Broker backends, chosen by URL scheme: ``memory://``, ``sqlite:///path``, ``redis://host``."""

from __future__ import annotations

from ..broker import Broker, Clock

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")


def open_broker(url: str, **options: object) -> Broker:
    """The broker for ``url``; its backend module is imported only when used."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(url=url, **options)  # type: ignore[arg-type]
    if scheme == "sqlite":
        from .sqlite import SQLiteBroker

        return SQLiteBroker(url, **options)  # type: ignore[arg-type]
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisBroker

        return RedisBroker(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown job broker URL {url!r}: use memory://, sqlite:///PATH or redis://HOST")


__all__ = ["Clock", "open_broker"]
