"""Making the cluster's certificates with ``cryptography`` (``pip install 'shoal[tls]'``).

``shoal certs init DIR`` makes a CA and one certificate per role; ``shoal certs issue``
adds more. Each certificate names its roles as SAN URIs ``shoal-role:<role>`` (and the
first in the subject's OU). Private keys are written readable by their owner only (0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .credentials import ROLE_URI_PREFIX, ROLES, SecurityError

#: How long certificates are valid, by default.
DEFAULT_DAYS = 365
CA_DAYS = 3650


def _crypto() -> Any:
    try:
        from cryptography import x509
    except ImportError:
        raise SecurityError("making certificates needs the cryptography package:"
                            " pip install 'shoal[tls]'") from None  # fmt: skip
    return x509


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, before a byte of the key is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))  # fmt: skip


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: str | os.PathLike[str], name: str = "shoal cluster CA",
            days: int = CA_DAYS) -> tuple[Path, Path]:  # fmt: skip
    """Write ``ca.pem`` and ``ca-key.pem`` (0600) in ``directory``; return their paths.
    An existing CA is never overwritten."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = d / "ca.pem", d / "ca-key.pem"
    if cert_path.exists() or key_path.exists():
        raise SecurityError(f"{d} already has a CA (ca.pem): refusing to replace it")
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal")])  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))
    return cert_path, key_path


def issue(directory: str | os.PathLike[str], roles: Sequence[str], name: str | None = None,
          hosts: Sequence[str] = (), days: int = DEFAULT_DAYS) -> tuple[Path, Path]:  # fmt: skip
    """Sign a certificate for ``roles`` with the CA in ``directory``; write ``NAME.pem`` and
    ``NAME-key.pem`` (0600) there (NAME defaults to the first role) and return their paths.

    ``hosts`` (names or IP addresses) go in the SAN, for tools that check host names (a
    browser on the HTTPS dashboard); shoal itself checks the CA and the role.
    """
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not roles:
        raise SecurityError(f"a certificate needs a role (one of {', '.join(ROLES)})")
    for role in roles:
        if role not in ROLES:
            raise SecurityError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    name = name or roles[0]
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SecurityError(f"certificate name {name!r}: use letters, digits, '-', '_', '.'")
    d = Path(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None)
    except FileNotFoundError as exc:
        raise SecurityError(f"no CA in {d}: {exc.filename} is missing"
                            f" (make one with: shoal certs init {d})") from None  # fmt: skip
    key = _new_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, roles[0]),
    ])  # fmt: skip
    alt_names: list[Any] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + r) for r in roles]
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # Every role both listens and connects (workers serve data and fetch it).
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = d / f"{name}.pem", d / f"{name}-key.pem"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))
    return cert_path, key_path


def make_cluster_certificates(directory: str | os.PathLike[str], *,
                              hosts: Sequence[str] = (), days: int = DEFAULT_DAYS,
                              worker_roles: Sequence[str] = ("worker",)) -> list[Path]:  # fmt: skip
    """``shoal certs init``: a CA, then ``scheduler``, ``worker`` and ``client``
    certificates; returns the files written."""
    written = list(make_ca(directory))
    scheduler_hosts = list(hosts) or _default_hosts()
    written += issue(directory, ["scheduler"], hosts=scheduler_hosts, days=days)
    written += issue(directory, list(worker_roles), name="worker", hosts=hosts, days=days)
    written += issue(directory, ["client"], days=days)
    return written


def _default_hosts() -> list[str]:
    """Names a browser may use for this machine's dashboard: localhost and the host name."""
    hosts = ["localhost", "127.0.0.1"]
    fqdn = socket.getfqdn()
    if fqdn and fqdn not in hosts:
        hosts.append(fqdn)
    return hosts
