"""Addresses: scheme://location, tcp by default, IPv6 in brackets."""

from __future__ import annotations

import pytest

from shoal.comm import format_address, normalize_address, parse_address


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("127.0.0.1:8786", ("tcp", "127.0.0.1", 8786)),
        ("TCP://host:1", ("tcp", "host", 1)),
        ("tcp://[::1]:8786", ("tcp", "::1", 8786)),
        ("[::1]:0", ("tcp", "::1", 0)),
        ("tcp://host", ("tcp", "host", None)),
        ("tcp://", ("tcp", "", None)),
        ("tcp://:0", ("tcp", "", 0)),
        ("inproc://scheduler", ("inproc", "scheduler", None)),
        ("inproc://", ("inproc", "", None)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, str, int | None]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    "address",
    ["tcp://::1:80", "tcp://[::1:80", "tcp://[::1]x", "tcp://h:port", "tcp://h:70000", "1cp://h:1"],
)
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(address)


def test_normalize_and_format() -> None:
    assert normalize_address("localhost:8786") == "tcp://localhost:8786"
    assert normalize_address("TCP://[::1]:1") == "tcp://[::1]:1"
    assert normalize_address("inproc://x") == "inproc://x"
    assert format_address("tcp", "::1", 5) == "tcp://[::1]:5"
    assert format_address("tcp", "h") == "tcp://h"
