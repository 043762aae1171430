"""The rules a server starts under: who may reach it unauthenticated, generated tokens,
and how big a frame each authenticated role may send."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

#: Per-role frame caps a scheduler applies after the handshake (bytes). A client's graph
#: submissions are the biggest thing it sends; workers send results' metadata, tracebacks
#: and heartbeats. Scatter and results go worker to worker, never through the scheduler.
SCHEDULER_FRAME_LIMITS: dict[str, int] = {"client": 1024**3, "worker": 256 * 1024**2}
#: A worker's listener: clients scatter data to it (large), peers only ask for data.
WORKER_FRAME_LIMITS: dict[str, int] = {"peer": 256 * 1024**2}

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}  # fmt: skip


class InsecureBindError(RuntimeError):
    """A server would listen beyond loopback with neither TLS nor a token."""


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address; "" means every interface) is reachable only
    from this machine."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:  # a name: loopback only if every address it has is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)  # fmt: skip


def check_bind(address: str, *, tls: bool, token: str | None, insecure: bool,
               what: str) -> None:  # fmt: skip
    """Refuse to listen at ``address`` beyond loopback with neither TLS nor a token, unless
    ``insecure``: anyone who can reach the port could run code on the cluster."""
    if tls or token or insecure:
        return
    scheme, _, location = address.partition("://")
    if not _:
        location = scheme
    if scheme == "inproc":
        return
    host = location.rsplit(":", 1)[0] if location.count(":") == 1 or "]" in location else location
    if is_loopback_host(host.strip("[]")):
        return
    raise InsecureBindError(
        f"{what} would listen at {address}, beyond this machine, with neither TLS nor a token:"
        " anyone who can reach it could run code on the cluster. Give TLS certificates"
        " (--tls-ca-file, --tls-cert, --tls-key; see `shoal certs init`), a token (--token"
        " SECRET, or --token auto to generate one), or --insecure if this network is trusted."
    )  # fmt: skip


def default_token_file() -> Path:
    return Path.home() / ".shoal" / "token"


def generate_token_file(path: str | os.PathLike[str] | None = None) -> tuple[str, Path, bool]:
    """The token in ``path`` (default ``~/.shoal/token``) if it holds one, so that a
    restarted scheduler keeps the token its workers have; else a new random token written
    there, readable by its owner only. Returns the token, the path and whether it is new.
    A token file that others can read is refused: that token is no secret any more."""
    target = Path(path) if path else default_token_file()
    if target.is_file() and target.stat().st_size:
        if target.stat().st_mode & 0o077:
            raise ValueError(f"the token file {str(target)!r} is readable by other users:"
                             " remove it (a new token is then made) or chmod 600 it")  # fmt: skip
        return read_token_file(target), target, False
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token, target, True


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path``; an unreadable or empty file is an error naming it."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {str(path)!r}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"the token file {str(path)!r} is empty")
    return token


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456; ``"1e6"`` and plain integers too."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size (e.g. 64MiB, 1GB, 1000000)")
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 64MiB, 1GB, 1000000)") from None
    if size <= 0:
        raise ValueError(f"a frame limit must be positive, not {text!r}")
    return size


def parse_frame_limits(text: str, roles: Mapping[str, int]) -> dict[str, int]:
    """``"client=64MiB,worker=1GiB"`` over the defaults ``roles``; a role not among them is
    an error naming the known ones."""
    limits = dict(roles)
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, size = item.partition("=")
        role = role.strip()
        if not sep:
            raise ValueError(f"{item!r} is not ROLE=SIZE")
        if role not in ("client", "worker", "peer"):
            raise ValueError(f"{item!r}: unknown role {role!r} (client, worker, peer)")
        limits[role] = parse_size(size)
    return limits
