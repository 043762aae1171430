"""Who may read a dashboard: the policy, the credentials and the session cookies.

Pure logic, no aiohttp (the middleware and login page are in `shoal.dashboard.login`):

- **When a login is required**: the server has a token, or the dashboard is reachable
  beyond loopback. A dashboard bound beyond loopback with neither a token nor TLS is refused
  (`DashboardRefused`), as the servers refuse such a bind; with TLS but no token, a client
  certificate is the only way in. On loopback without a token it stays open, TLS or not
  (like a local cluster's: whoever is on this machine can read it either way).
- **Credentials**: the cluster token as ``Authorization: Bearer <token>``; a session cookie
  set by the login page; or, over HTTPS, a client certificate signed by the cluster's CA.
  Tokens are compared in constant time (`hmac.compare_digest`).
- **Sessions** are stateless: ``<expires>.<nonce>.<mac>``, the MAC an HMAC-SHA256 under a key
  derived from the token and a secret drawn when the dashboard starts. So the cookie never
  holds the token, is only good on the server that issued it and dies with that process;
  logging out revokes its nonce (a bounded set, pruned as sessions expire).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

from ..security.policy import InsecureBindError, is_loopback_host

__all__ = [
    "SESSION_TTL",
    "CertificateCheck",
    "Credential",
    "DashboardAuth",
    "DashboardRefused",
    "check_exposure",
    "is_loopback",
]

#: how long a login lasts (seconds)
SESSION_TTL = 12 * 3600.0
#: logged-out sessions remembered at most (the oldest are forgotten first; they expire anyway)
MAX_REVOKED = 10_000

#: how a request was let in
Credential = Literal["none", "bearer", "cookie", "certificate"]
#: decides whether a TLS peer's verified certificate (as `ssl.SSLSocket.getpeercert` gives
#: it) may stand in for the token
CertificateCheck = Callable[[dict[str, Any]], bool]


class DashboardRefused(InsecureBindError, ValueError):
    """A dashboard would be reachable beyond loopback with no way to authenticate (an
    `InsecureBindError`, as the servers' own refusal; a ValueError for its callers)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name; "" is every interface) reaches only this
    machine (a name only if every address it resolves to does)."""
    return is_loopback_host(host)


def check_exposure(host: str, port: int, token: str | None, tls: bool,
                   insecure: bool = False, what: str = "dashboard") -> bool:  # fmt: skip
    """Whether a login is required for a dashboard bound at ``host``: the server has a
    token, or the dashboard is reachable beyond loopback (unless ``insecure``: the server
    was told to run open). Raises `DashboardRefused` when it would be reachable beyond
    loopback with neither a token nor TLS, and not ``insecure``."""
    beyond = not is_loopback(host)
    if beyond and not token and not tls and not insecure:
        raise DashboardRefused(
            f"refusing to serve the {what} at {host or '0.0.0.0'}:{port}: it would be reachable"
            " beyond this machine with no login. Give the server a token (--token or"
            " SHOAL_TOKEN), or TLS certificates (--tls-ca-file --tls-cert --tls-key), or bind"
            " the dashboard to 127.0.0.1, or --insecure if this network is trusted")  # fmt: skip
    return bool(token) or (beyond and not insecure)


class DashboardAuth:
    """The credentials one dashboard accepts, and the sessions it has issued."""

    def __init__(self, token: str | None, required: bool, *, secure: bool = False,
                 port: int = 0, session_ttl: float = SESSION_TTL) -> None:  # fmt: skip
        #: whether requests must authenticate at all (see `check_exposure`)
        self.required = required
        #: whether the cookie is marked Secure (the dashboard serves HTTPS)
        self.secure = secure
        self.session_ttl = session_ttl
        self._token = token.encode() if token else None
        # Per port: a browser sends a host's cookies to every port of it, and the scheduler
        # and its workers' dashboards on one machine must not overwrite each other's.
        self.cookie_name = f"shoal_session_{port}" if port else "shoal_session"
        secret = secrets.token_bytes(32)
        self._key = hmac.new(secret, b"shoal dashboard session|" + (self._token or b""),
                             hashlib.sha256).digest()  # fmt: skip
        #: nonces of sessions logged out, and the same as (expires, nonce) in a heap
        self._revoked: set[str] = set()
        self._revoked_by_expiry: list[tuple[float, str]] = []

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def check_token(self, offered: str) -> bool:
        """Whether ``offered`` is the token (in constant time; False when there is none)."""
        if self._token is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), self._token)

    def check_bearer(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token as a bearer credential."""
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        return scheme.lower() == "bearer" and self.check_token(value.strip())

    def new_session(self, now: float | None = None) -> str:
        """A session value for the cookie, good for ``session_ttl`` seconds from ``now``."""
        expires = int((time.time() if now is None else now) + self.session_ttl)
        body = f"{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac(body)}"

    def check_session(self, value: str | None, now: float | None = None) -> bool:
        """Whether ``value`` is a session this dashboard issued, not expired nor revoked."""
        parts = self._parse(value)
        if parts is None:
            return False
        expires, nonce = parts
        now = time.time() if now is None else now
        return now < expires and nonce not in self._revoked

    def revoke(self, value: str | None, now: float | None = None) -> None:
        """Log a session out (a value that is not a valid session is ignored). O(log n):
        expired entries leave from the heap's top; when full, the soonest to expire goes."""
        parts = self._parse(value)
        if parts is None:
            return
        now = time.time() if now is None else now
        expires, nonce = parts
        heap = self._revoked_by_expiry
        while heap and (heap[0][0] <= now or len(heap) >= MAX_REVOKED):
            self._revoked.discard(heapq.heappop(heap)[1])
        if nonce not in self._revoked:
            self._revoked.add(nonce)
            heapq.heappush(heap, (expires, nonce))

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def _parse(self, value: str | None) -> tuple[float, str] | None:
        """(expires, nonce) of a value whose MAC is right; None otherwise."""
        if not value or len(value) > 200:
            return None
        body, _, mac = value.rpartition(".")
        expires, _, nonce = body.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        try:
            return float(int(expires)), nonce
        except ValueError:
            return None
