"""Addresses: ``scheme://location``; tcp's location is ``host:port``, inproc's a name.

An address with no scheme means tcp. IPv6 hosts are bracketed: ``tcp://[::1]:8786``.
"""

from __future__ import annotations

DEFAULT_SCHEME = "tcp"


def split_address(address: str) -> tuple[str, str]:
    """``"tcp://h:1"`` -> ``("tcp", "h:1")``; no scheme means tcp."""
    scheme, sep, location = address.partition("://")
    if not sep:
        return DEFAULT_SCHEME, address
    if not (scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)):
        raise ValueError(f"invalid address {address!r}: bad scheme {scheme!r}")
    return scheme.lower(), location


def parse_host_port(location: str) -> tuple[str, int | None]:
    """``"h:1"`` -> ``("h", 1)``, ``"[::1]:1"`` -> ``("::1", 1)``, ``"h"`` -> ``("h", None)``."""
    if location.startswith("["):
        host, sep, rest = location[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid address {location!r}: unbalanced brackets")
        port_text = rest[1:] if rest else None
    elif location.count(":") > 1:
        raise ValueError(f"invalid address {location!r}: IPv6 hosts must be in brackets")
    else:
        host, sep, port_text = location.partition(":")
        port_text = port_text if sep else None
    if port_text is None or port_text == "":
        return host, None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"invalid address {location!r}: port {port_text!r} is not a number"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {location!r}: port {port} is out of range")
    return host, port


def parse_address(address: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)``; for inproc the host is the listener's name and port None."""
    scheme, location = split_address(address)
    if scheme == "inproc":
        return scheme, location, None
    host, port = parse_host_port(location)
    return scheme, host, port


def format_address(scheme: str, host: str, port: int | None = None) -> str:
    if scheme != "inproc" and ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def normalize_address(address: str) -> str:
    """The canonical spelling: scheme added and lowercased, IPv6 bracketed."""
    return format_address(*parse_address(address))
