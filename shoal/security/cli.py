"""The security side of the `shoal` command: ``shoal certs init|issue``, and the
``--tls-*``, ``--token auto``, ``--insecure`` and ``--max-frame-bytes`` options of the
server commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .credentials import ENV_CA_FILE, ENV_CERT, ENV_KEY, ROLES, Security, SecurityError
from .policy import generate_token_file, parse_frame_limits, read_token_file

F = TypeVar("F", bound=Callable[..., Any])


def server_options(func: F) -> F:
    """``--tls-ca-file --tls-cert --tls-key --insecure --token-file --max-frame-bytes``."""
    options = [
        click.option("--tls-ca-file", default=None,
                     help=f"The cluster CA's certificate (PEM): TLS on, every peer must show a"
                          f" certificate it signed [env: {ENV_CA_FILE}]."),
        click.option("--tls-cert", default=None,
                     help=f"This server's certificate (PEM, of its role) [env: {ENV_CERT}]."),
        click.option("--tls-key", default=None,
                     help=f"The private key of --tls-cert [env: {ENV_KEY}]."),
        click.option("--insecure", is_flag=True, default=False,
                     help="Allow listening beyond loopback with neither TLS nor a token"
                          " (anyone who reaches the port can run code: trusted networks only)."),
        click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                     help="Read the token from this file (with --token auto: write the"
                          " generated token there, default ~/.shoal/token)."),
        click.option("--max-frame-bytes", default="",
                     help="Largest message each authenticated role may send, e.g."
                          " client=64MiB,worker=256MiB (a bigger one closes that connection)."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def security_from_options(ca_file: str | None, cert: str | None,
                          key: str | None) -> Security | None:  # fmt: skip
    """The `Security` the three ``--tls-*`` options make (None when none is given); some
    but not all, or a file that does not load, is a usage error naming it."""
    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise click.UsageError(f"TLS needs all of --tls-ca-file, --tls-cert and --tls-key:"
                               f" {', '.join(missing)} missing")  # fmt: skip
    try:
        return Security(str(ca_file), str(cert), str(key))
    except SecurityError as exc:
        raise click.UsageError(str(exc)) from None


def resolve_token(token: str | None, token_file: str | None, *, may_generate: bool) -> str | None:
    """``--token`` as given; ``auto`` generates one into ``--token-file`` (0600) and says
    where; ``--token-file`` alone reads it."""
    if token == "auto":
        if not may_generate:
            raise click.UsageError("--token auto is for the scheduler: give workers the"
                                   " scheduler's token (--token-file PATH)")  # fmt: skip
        try:
            value, path, new = generate_token_file(token_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--token-file") from None
        said = "generated a token into" if new else "using the token in"
        click.echo(f"shoal: {said} {path} (readable only by you); give it to workers with"
                   f" --token-file {path} and to clients as SHOAL_TOKEN")  # fmt: skip
        return value
    if token:
        return token
    if token_file:
        try:
            return read_token_file(token_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--token-file") from None
    return None


def frame_limits_option(text: str, defaults: dict[str, int]) -> dict[str, int]:
    try:
        return parse_frame_limits(text, defaults)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-frame-bytes") from None


@click.group()
def certs() -> None:
    """Make the TLS certificates of a cluster (needs: pip install 'shoal[tls]').

    Every process shows a certificate of its role, signed by the cluster's CA:
    scheduler.pem on the scheduler, worker.pem on workers, client.pem for clients.
    Keep ca-key.pem off the cluster's machines once the certificates are made.
    """


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True,
              help="A name or IP of the scheduler, put in its certificate (for browsers on"
                   " the HTTPS dashboard); repeat for several.")
@click.option("--days", default=365, show_default=True, type=int,
              help="Days the role certificates are valid.")
def certs_init(directory: str, hosts: tuple[str, ...], days: int) -> None:
    """Make a CA and one certificate per role in DIRECTORY."""
    from .certs import make_cluster_certificates

    try:
        written = make_cluster_certificates(directory, hosts=hosts, days=days)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}{' (0600)' if path.name.endswith('-key.pem') else ''}")
    d = Path(directory)
    click.echo(f"\nscheduler: shoal scheduler --host HOST --tls-ca-file {d / 'ca.pem'}"
               f" --tls-cert {d / 'scheduler.pem'} --tls-key {d / 'scheduler-key.pem'}")
    click.echo(f"workers:   shoal worker tls://HOST:8786 --tls-ca-file {d / 'ca.pem'}"
               f" --tls-cert {d / 'worker.pem'} --tls-key {d / 'worker-key.pem'}")
    click.echo(f"clients:   {ENV_CA_FILE}={d / 'ca.pem'} {ENV_CERT}={d / 'client.pem'}"
               f" {ENV_KEY}={d / 'client-key.pem'}")  # fmt: skip


@certs.command("issue")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES),
              help="The role of the certificate; repeat to give it several (a worker whose"
                   " tasks launch tasks needs worker and client).")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="The directory with the CA (ca.pem, ca-key.pem); the files go there too.")
@click.option("--name", default=None, help="File name: NAME.pem, NAME-key.pem (default: the role).")
@click.option("--host", "hosts", multiple=True, help="A name or IP to put in the certificate.")
@click.option("--days", default=365, show_default=True, type=int, help="Days it is valid.")
def certs_issue(roles: tuple[str, ...], directory: str, name: str | None,
                hosts: tuple[str, ...], days: int) -> None:  # fmt: skip
    """Sign one more certificate with the CA in --dir."""
    from .certs import issue

    target = Path(directory) / f"{name or roles[0]}.pem"
    if target.exists():
        raise click.ClickException(f"{target} exists: choose another --name")
    try:
        cert, key = issue(directory, list(roles), name=name, hosts=hosts, days=days)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {cert}\nwrote {key} (0600)")


def check_key_permissions(key_file: str | None) -> None:
    """Warn when a private key is readable by others (ssh does the same)."""
    if key_file and os.path.exists(key_file) and os.stat(key_file).st_mode & 0o077:
        click.echo(f"shoal: warning: {key_file} is readable by other users (chmod 600 it)",
                   err=True)
