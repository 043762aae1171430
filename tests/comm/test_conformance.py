"""Every transport passes the public conformance checks (`shoal.testing.comm`)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from shoal.testing.comm import check_comm_backend

Run = Callable[..., Any]  # the `run` fixture (conftest.py)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "tcp://", "inproc://"])
def test_backend_conforms(run: Run, loop_name: str, address: str) -> None:
    run(check_comm_backend(address), loop=loop_name, timeout=30)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_tcp_ipv6_conforms(run: Run, loop_name: str) -> None:
    run(check_comm_backend("tcp://[::1]:0"), loop=loop_name, timeout=30)
