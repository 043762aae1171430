"""`Security`: the cluster CA and one role's certificate, turned into TLS contexts.

Only the standard library is used here (``ssl``): loading PEM files needs no extra
package. Making certificates (`shoal.security.certs`) needs ``cryptography``.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The roles a certificate can hold; the role is in the certificate as a SAN URI
#: ``shoal-role:<role>`` (and in the subject's OU, for people reading it).
ROLES = ("scheduler", "worker", "client")
ROLE_URI_PREFIX = "shoal-role:"

#: Environment variables a client (and `Security.from_env`) reads its credentials from.
ENV_CA_FILE = "SHOAL_TLS_CA_FILE"
ENV_CERT = "SHOAL_TLS_CERT"
ENV_KEY = "SHOAL_TLS_KEY"


logger = logging.getLogger("shoal.security")

#: OpenSSL's reasons for a failed TLS handshake, as a listener's log line says them.
_REFUSAL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer showed no certificate",
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by our CA",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our CA",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (plaintext?)",
    "HTTP_REQUEST": "the peer sent plain HTTP",
    "UNSUPPORTED_PROTOCOL": "the peer offered a TLS version below 1.2",
}


class _ListenerSSLObject(ssl.SSLObject):
    """Logs why a TLS handshake failed on the listening side: the event loop only says so
    at debug level, and no shoal code sees such a connection."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake goes on
        except ssl.SSLError as exc:
            reason = str(getattr(exc, "reason", "") or "")
            logger.warning("refused a TLS connection: %s (%s)",
                           _REFUSAL_REASONS.get(reason, "TLS handshake failed"), exc)  # fmt: skip
            raise


class SecurityError(ValueError):
    """Credentials that cannot be used: a missing file, a key that does not match..."""


@dataclass(eq=False)
class Security:
    """TLS credentials: the cluster's CA, and a certificate with its private key.

    Every connection is mutual TLS (both sides show a certificate the CA signed, TLS 1.2 or
    newer), and each side checks the other's role. Give each process the certificate of its
    role: the scheduler ``scheduler.pem``, workers ``worker.pem``, clients ``client.pem``
    (see ``shoal certs init``).

    ``role_files`` optionally holds the files of other roles (role -> (cert, key)):
    `for_role` picks them. `temporary` and `from_directory` fill it, so one object can start
    a whole local cluster.
    """

    ca_file: str
    cert_file: str
    key_file: str
    #: role -> (cert_file, key_file) of the other roles this object can hand out
    role_files: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, repr=False)
    #: keeps a temporary directory alive (removed when the last user is collected)
    _owner: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for what, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                           ("key_file", self.key_file)):  # fmt: skip
            if not path:
                raise SecurityError(f"Security needs {what}")
            if not os.path.isfile(path):
                raise SecurityError(f"Security {what}: no such file {path!r}")
        self.ca_file, self.cert_file, self.key_file = (
            os.fspath(self.ca_file), os.fspath(self.cert_file), os.fspath(self.key_file))
        # Load once now: a bad file or a key that does not match fails here, named.
        self.client_context()

    # ------------------------------------------------------------- making one

    @classmethod
    def from_env(cls) -> Security | None:
        """From ``SHOAL_TLS_CA_FILE``, ``SHOAL_TLS_CERT`` and ``SHOAL_TLS_KEY``; None when
        none is set. Some but not all set is an error naming the missing ones."""
        values = {name: os.environ.get(name, "").strip() for name in
                  (ENV_CA_FILE, ENV_CERT, ENV_KEY)}  # fmt: skip
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise SecurityError(f"TLS settings are incomplete: {', '.join(missing)} not set")
        return cls(values[ENV_CA_FILE], values[ENV_CERT], values[ENV_KEY])

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], role: str = "client") -> Security:
        """The files ``shoal certs init DIRECTORY`` made; ``role``'s certificate first, the
        others ready for `for_role`."""
        d = Path(directory)
        files = {r: (str(d / f"{r}.pem"), str(d / f"{r}-key.pem")) for r in ROLES
                 if (d / f"{r}.pem").is_file() and (d / f"{r}-key.pem").is_file()}  # fmt: skip
        if role not in files:
            raise SecurityError(f"no {role}.pem and {role}-key.pem in {str(d)!r}")
        return cls(str(d / "ca.pem"), *files[role], role_files=files)

    @classmethod
    def temporary(cls, role: str = "client") -> Security:
        """A fresh CA and one certificate per role, in a private temporary directory that
        is removed once no `Security` made from it is left (or at exit).

        For a local cluster: `for_role` gives the scheduler and the workers their own
        certificates. The workers' certificate also holds the client role, so that tasks
        can launch tasks (`shoal.get_client()`) on a cluster on this one machine.
        """
        from .certs import make_cluster_certificates

        directory = tempfile.mkdtemp(prefix="shoal-tls-")
        owner = _TemporaryDirectory(directory)
        try:
            make_cluster_certificates(directory, worker_roles=("worker", "client"))
            sec = cls.from_directory(directory, role)
        except BaseException:
            owner.cleanup()
            raise
        sec._owner = owner
        return sec

    def for_role(self, role: str) -> Security:
        """This object's credentials for ``role`` (itself when it holds no other roles).
        The result holds that role's files only: a worker given its credentials this way
        cannot reach the client's certificate through them."""
        files = self.role_files.get(role)
        if files is None or files == (self.cert_file, self.key_file) and not self.role_files:
            return self
        return Security(self.ca_file, *files, _owner=self._owner)

    # --------------------------------------------------------------- contexts

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """A context for the listening side: our certificate, TLS >= 1.2, and (by default)
        a certificate from every peer, signed by our CA. ``require_client_cert=False`` is
        for HTTPS (a browser shows no certificate)."""
        key = "server" if require_client_cert else "server-open"
        context = self._contexts.get(key)
        if context is None:
            context = self._load(ssl.Purpose.CLIENT_AUTH)
            context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
            context.sslobject_class = _ListenerSSLObject
            self._contexts[key] = context
        return context

    def client_context(self) -> ssl.SSLContext:
        """A context for the connecting side: our certificate, and the server's checked
        against our CA. Host names are not checked (workers come and go on any host): the
        CA is the cluster's own, and the listener's role is checked instead."""
        context = self._contexts.get("client")
        if context is None:
            context = self._load(ssl.Purpose.SERVER_AUTH)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_REQUIRED
            self._contexts["client"] = context
        return context

    def _load(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(purpose, cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"cannot load the CA file {self.ca_file!r}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"cannot load the certificate {self.cert_file!r} with the key"
                                f" {self.key_file!r}: {exc}") from None  # fmt: skip
        return context

    def env(self) -> dict[str, str]:
        """These credentials as the environment variables `from_env` reads."""
        return {ENV_CA_FILE: self.ca_file, ENV_CERT: self.cert_file, ENV_KEY: self.key_file}

    def cli_args(self) -> list[str]:
        """These credentials as the ``--tls-*`` options of the server commands."""
        return ["--tls-ca-file", self.ca_file, "--tls-cert", self.cert_file,
                "--tls-key", self.key_file]  # fmt: skip


class _TemporaryDirectory:
    """Removes a directory when collected or at exit; never takes a lock (finalizers may
    run anywhere)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, True)

    def cleanup(self) -> None:
        self._finalizer()


def peer_roles(peercert: object) -> frozenset[str]:
    """The shoal roles in a certificate as ``ssl`` decodes it (``getpeercert()``)."""
    if not isinstance(peercert, dict):
        return frozenset()
    names = peercert.get("subjectAltName") or ()
    return frozenset(value[len(ROLE_URI_PREFIX):] for kind, value in names
                     if kind == "URI" and str(value).startswith(ROLE_URI_PREFIX))  # fmt: skip
