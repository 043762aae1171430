"""Signed job payloads: HMAC-SHA256 over every pickle a job worker or a reader unpickles.

Whoever can write to the broker (the Redis server, the SQLite file) could otherwise store a
pickle that runs code wherever it is unpickled. With a secret (``JobQueue(secret=...)`` or
``$SHOAL_JOBS_SECRET``), every pickle stored is a *signed blob*::

    MAGIC (12 bytes) | HMAC-SHA256(secret, context | pickle) (32 bytes) | pickle

and nothing is unpickled until its MAC matches. The context binds a blob to its place, so
a signed blob copied elsewhere does not verify either:

- arguments: ``("args", job id, job name, parents, pass_results)``: another job's arguments,
  or this job's under another name or other parents, are refused;
- a result: ``("result", job id)``; a failed job's pickled exception: ``("error", job id)``.

Rotation: several secrets are accepted; the first signs, any of them verifies.

Without a secret nothing is checked (as before signing existed): a signed blob is read by
dropping its header, an unsigned one is unpickled as it is. Function references never pass
through the broker (a job names its function; a worker imports its own code), so there is
nothing of the function to sign.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence

import msgspec

from .errors import BadSignature

#: Environment variable read by `JobQueue` when no ``secret=`` is given: one secret, or
#: several separated by commas (the first signs, any verifies).
ENV_VAR = "SHOAL_JOBS_SECRET"
#: Starts every signed blob. Not a pickle's start (cloudpickle writes b"\x80\x05").
MAGIC = b"shoal-hs256\x00"
MAC_SIZE = 32
#: A shorter secret could be found by trying guesses against any signed payload read from
#: the store, offline.
MIN_SECRET_BYTES = 16

#: What ``secret=`` takes: one secret, or several (the first signs; all verify).
SecretSetting = str | bytes | Sequence[str | bytes]

_context = msgspec.msgpack.Encoder()


def args_context(job_id: str, name: str, parents: Sequence[str], pass_results: bool) -> bytes:
    return _context.encode(("args", job_id, name, list(parents), pass_results))


def result_context(job_id: str) -> bytes:
    return _context.encode(("result", job_id))


def error_context(job_id: str) -> bytes:
    return _context.encode(("error", job_id))


def _as_bytes(secret: str | bytes, source: str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"{source}: a secret is str or bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{source}: a jobs secret must be at least {MIN_SECRET_BYTES} bytes, not "
            f"{len(secret)} (a short one can be guessed from any signed payload in the store); "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return secret


class Signer:
    """Signs with the first secret, verifies with any of them. Thread-safe (immutable)."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str | bytes], source: str = "secret") -> None:
        if not secrets:
            raise ValueError(f"{source}: give at least one secret")
        keys = [_as_bytes(s, source) for s in secrets]
        #: HMAC objects keyed once; each use copies one (cheaper than keying again)
        self._keys = tuple(hmac.new(k, digestmod=hashlib.sha256) for k in keys)

    def __repr__(self) -> str:
        return f"<Signer {len(self._keys)} secret(s)>"  # never the secrets themselves

    @classmethod
    def from_setting(cls, secret: SecretSetting | None,
                     environ: Mapping[str, str] | None = None) -> Signer | None:
        """The signer for ``secret=``, else for ``$SHOAL_JOBS_SECRET``; None when neither
        is set (payloads are then neither signed nor checked)."""
        if secret is None:
            env = (os.environ if environ is None else environ).get(ENV_VAR, "")
            parts = [p.strip() for p in env.split(",") if p.strip()]
            return cls(parts, f"${ENV_VAR}") if parts else None
        if isinstance(secret, (str, bytes)):
            return cls([secret])
        return cls(list(secret))

    def _mac(self, key: hmac.HMAC, context: bytes, data: bytes) -> bytes:
        h = key.copy()
        h.update(context)
        h.update(data)
        return h.digest()

    def sign(self, context: bytes, data: bytes) -> bytes:
        """``data`` as a signed blob bound to ``context``."""
        return b"".join((MAGIC, self._mac(self._keys[0], context, data), data))

    def verify(self, context: bytes, blob: bytes, what: str) -> bytes:
        """The pickle inside ``blob`` if its MAC matches ``context`` under one of the
        secrets; else `BadSignature` naming the problem first (``shoal jobs dead`` shows
        the start of a reason), then ``what``."""
        blob = bytes(blob)
        if not blob.startswith(MAGIC):
            raise BadSignature(f"no signature on {what}: this JobQueue has a secret, so it "
                               "reads only signed payloads (this one was written by a producer "
                               "or job worker without the secret, or straight into the store)")
        mac, data = blob[len(MAGIC):len(MAGIC) + MAC_SIZE], blob[len(MAGIC) + MAC_SIZE:]
        if len(mac) == MAC_SIZE:
            for key in self._keys:
                if hmac.compare_digest(mac, self._mac(key, context, data)):
                    return data
        raise BadSignature(f"wrong signature on {what}: it matches none of this JobQueue's "
                           f"{len(self._keys)} secret(s) (changed in the store, moved from "
                           "another job, or signed with another secret)")


def sign(signer: Signer | None, context: bytes, data: bytes) -> bytes:
    """``data`` signed, or as it is without a signer."""
    return data if signer is None else signer.sign(context, data)


def sign_optional(signer: Signer | None, context: bytes, data: bytes | None) -> bytes | None:
    return None if data is None else sign(signer, context, data)


def unwrap(signer: Signer | None, context: bytes, blob: bytes, what: str) -> bytes:
    """The pickle to load from a stored ``blob``: verified with a signer (`BadSignature`
    if it fails); without one, unchecked (a signed blob's header is dropped)."""
    if signer is not None:
        return signer.verify(context, blob, what)
    if bytes(blob[:len(MAGIC)]) == MAGIC:
        return bytes(blob[len(MAGIC) + MAC_SIZE:])
    return blob


def is_signed(blob: bytes) -> bool:
    return bytes(blob[:len(MAGIC)]) == MAGIC
