"""HTTPS for the dashboards: a server-side context from the cluster's `shoal.Security`.

The dashboard serves with the server's own certificate (the scheduler's for its dashboard,
a worker's for its), so a browser must trust the cluster's CA (``ca.pem``) or be told to
accept it. It asks for a client certificate but does not demand one (CERT_OPTIONAL): a
browser without one gets the login page, while a peer that shows a certificate signed by
the cluster's CA with the client role (a Prometheus with ``tls_config``, ``curl --cert``)
is let in without the token.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from ..security import peer_roles
from .auth import CertificateCheck

if TYPE_CHECKING:
    from ..security import Security

__all__ = ["certificate_check", "dashboard_ssl_context"]

#: the certificate role that may read a dashboard without the token
READER_ROLE = "client"


def dashboard_ssl_context(security: Security | None) -> ssl.SSLContext | None:
    """The context to serve HTTPS with the server's CA, certificate and key files (None
    without TLS)."""
    if security is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=security.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(security.cert_file, security.key_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def certificate_check(security: Security | None) -> CertificateCheck | None:
    """What lets a verified client certificate read the dashboard (None without TLS)."""
    if security is None:
        return None

    def check(cert: dict[str, Any]) -> bool:
        return READER_ROLE in peer_roles(cert)

    return check
