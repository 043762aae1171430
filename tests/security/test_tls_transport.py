"""The tls:// transport passes the same conformance checks as tcp:// (`shoal.testing.comm`:
round trips, a 100 MB payload, ordering, close semantics, handshake rejections, connecting
after stop), on the default event loop and on uvloop, with a certificate holding the roles
the checks use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import shoal
import shoal.testing.comm as conformance
from shoal.comm import registry


@pytest.fixture
def tls_everywhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[shoal.Security]:
    """The conformance checks' `connect` and `listen`, given TLS credentials."""
    security = shoal.Security.temporary("worker")  # its certificate: worker and client

    async def connect(address: str, hello: Any, *args: Any, **kwargs: Any) -> Any:
        return await registry.connect(address, hello, *args, security=security, **kwargs)

    async def listen(address: str, handler: Any, **kwargs: Any) -> Any:
        return await registry.listen(address, handler, security=security, **kwargs)

    monkeypatch.setattr(conformance, "connect", connect)
    monkeypatch.setattr(conformance, "listen", listen)
    yield security


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_backend_conforms(tls_everywhere: shoal.Security, loop: str) -> None:
    async def check() -> None:
        await asyncio.wait_for(conformance.check_comm_backend("tls://127.0.0.1:0"), 60)

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        event_loop = uvloop.new_event_loop()
        try:
            event_loop.run_until_complete(check())
        finally:
            event_loop.close()
    else:
        asyncio.run(check())
