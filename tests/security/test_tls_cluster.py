"""A TLS cluster started from the CLI (real `shoal scheduler` and 2 `shoal worker`
processes), and everyone who must not get in: no certificate, another CA's certificate, a
worker certificate used as a client, a client certificate registering as a worker,
plaintext to the TLS port. The good client keeps working throughout."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import shoal
from shoal.cli import main
from shoal.comm.core import HandshakeRejected, ShoalConnectionError
from shoal.comm.registry import connect
from shoal.protocol.messages import PROTOCOL_VERSION, Hello
from shoal.testing import spawn_scheduler, spawn_worker
from shoal.testing.cluster import ShoalProcess


def make_certs(prefix: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix)) / "certs"
    result = CliRunner().invoke(main, ["certs", "init", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    directory = make_certs("shoal-certs-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def other_certs() -> Iterator[Path]:
    directory = make_certs("shoal-other-certs-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory.parent, ignore_errors=True)


def tls_args(certs: Path, role: str) -> list[str]:
    return ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{role}.pem"),
            "--tls-key", str(certs / f"{role}-key.pem")]  # fmt: skip


def clean_env() -> dict[str, str]:
    """This environment without TLS settings: only the options given count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_TLS_")}


def security(certs: Path, role: str, ca: Path | None = None) -> shoal.Security:
    return shoal.Security(str((ca or certs) / "ca.pem"), str(certs / f"{role}.pem"),
                          str(certs / f"{role}-key.pem"))  # fmt: skip


def still_serves(client: shoal.Client, n: int) -> None:
    """A graph with transfers between the workers: the good client is still served."""
    parts = client.map(lambda x, n=n: x * n, range(20), pure=False)
    assert client.submit(sum, parts, pure=False).result(timeout=30) == n * sum(range(20))


def try_connect(address: str, role: str, sec: shoal.Security | None,
                server_role: str = "scheduler", timeout: float = 5) -> BaseException:  # fmt: skip
    """Connect with shoal's own handshake; return the error (the test fails if none)."""
    async def attempt() -> BaseException:
        try:
            comm = await connect(address, Hello(PROTOCOL_VERSION, role, "intruder"),  # type: ignore[arg-type]
                                 timeout=timeout, security=sec, server_role=server_role)
        except (ConnectionError, ValueError) as exc:
            return exc
        comm.abort()
        raise AssertionError(f"{role} with {sec} got in")

    return asyncio.run(attempt())


def test_tls_cluster_from_the_cli_serves_only_its_own(certs: Path, other_certs: Path) -> None:
    env = clean_env()
    with spawn_scheduler(extra_args=["--no-dashboard", *tls_args(certs, "scheduler")],
                         env=env) as scheduler, \
         spawn_worker(scheduler.address, name="w1", env=env,
                      extra_args=["--no-dashboard", *tls_args(certs, "worker")]) as w1, \
         spawn_worker(scheduler.address, name="w2", env=env,
                      extra_args=["--no-dashboard", *tls_args(certs, "worker")]) as w2:  # fmt: skip
        address = scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        with shoal.Client(address, security=security(certs, "client"), timeout=10) as client:
            client.wait_for_workers(2, timeout=30)
            assert all(a.startswith("tls://") for a in client.nthreads())
            still_serves(client, 1)

            # No certificate: the client cannot even try, and says what it lacks...
            with pytest.raises(ValueError, match="tls:// addresses need TLS credentials"):
                shoal.Client(address, timeout=5, security=None)
            # ...and a TLS connection that shows none is dropped by the TLS layer.
            assert _tls_without_certificate_is_dropped(address, certs)
            still_serves(client, 2)

            # A certificate from another CA: we refuse the server's, it refuses ours.
            error = try_connect(address, "client", security(other_certs, "client"))
            assert isinstance(error, ShoalConnectionError)
            assert "not signed by our CA" in str(error)
            error = try_connect(address, "client", security(other_certs, "client", ca=certs))
            assert isinstance(error, ShoalConnectionError)
            assert "refused our certificate" in str(error)
            still_serves(client, 3)

            # A worker's certificate cannot act as a client (through the public API too).
            with pytest.raises(HandshakeRejected,
                               match="a worker certificate may not connect as 'client'"):
                shoal.Client(address, security=security(certs, "worker"), timeout=5)
            # A client's certificate cannot register a worker...
            error = try_connect(address, "worker", security(certs, "client"))
            assert isinstance(error, HandshakeRejected)
            assert "a client certificate may not connect as 'worker'" in str(error)
            # ...and `shoal worker` with it says so and exits.
            _worker_with_client_certificate_fails(address, certs, env)
            still_serves(client, 4)

            # A worker's listener takes the scheduler's certificate as a peer, never a
            # client's certificate posing as a peer; and a client will not take a worker's
            # listener for the scheduler.
            worker_address = next(iter(client.nthreads()))
            error = try_connect(worker_address, "peer", security(certs, "client"),
                                server_role="worker")  # fmt: skip
            assert "a client certificate may not connect as 'peer'" in str(error)
            error = try_connect(worker_address, "client", security(certs, "client"))
            assert "not a scheduler certificate" in str(error)
            # A worker's certificate gets in as a peer, to fetch data, but cannot make
            # another worker run code (only the scheduler forwards `run`).
            marker = Path(tempfile.mkdtemp(prefix="shoal-run-")) / "ran"
            try:
                assert not _peer_run_function(worker_address, certs, marker)
                assert not marker.exists()
            finally:
                shutil.rmtree(marker.parent, ignore_errors=True)
            assert client.run(lambda: 5) == {a: 5 for a in client.nthreads()}  # the real one

            # Plaintext to the TLS port: refused, nothing breaks.
            error = try_connect(address.replace("tls://", "tcp://"), "client", None)
            assert isinstance(error, ShoalConnectionError)
            _plaintext_is_dropped(address)
            still_serves(client, 5)

        log = scheduler.output()
        assert "a worker certificate may not connect as 'client'" in log
        assert "a client certificate may not connect as 'worker'" in log
        assert "Traceback" not in log
        # Refusals at the TLS layer are logged by the listener too, with the reason.
        assert "refused a TLS connection: the peer showed no certificate" in log
        assert "refused a TLS connection: the peer's certificate is not signed by our CA" in log
        assert "refused a TLS connection: the peer does not speak TLS (plaintext?)" in log
        assert "a worker certificate may not send RunFunction" in w1.output() + w2.output()


def _peer_run_function(worker_address: str, certs: Path, marker: Path) -> bool:
    """Send `RunFunction` as a worker-certificate peer; whether it got an answer."""
    from shoal.comm.core import CommClosedError
    from shoal.protocol.messages import RunFunction
    from shoal.protocol.serialize import serialize

    async def attempt() -> bool:
        comm = await connect(worker_address, Hello(PROTOCOL_VERSION, "peer", "w"), timeout=10,
                             security=security(certs, "worker"), server_role="worker")
        try:
            await comm.write([RunFunction(1, serialize(lambda: marker.touch(), "function"))])
            await asyncio.wait_for(comm.read(), 10)
            return True
        except CommClosedError:
            return False
        finally:
            comm.abort()

    return asyncio.run(attempt())


def _tls_without_certificate_is_dropped(address: str, certs: Path) -> bool:
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"\x01" + b"\x00" * 64)
                # TLS 1.3: the server checks our (missing) certificate after our side of
                # the handshake; it answers with an alert and closes.
                return tls.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError):
            return True


def _plaintext_is_dropped(address: str) -> None:
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x01\x00\x00\x00" + b"plain hello, no TLS" * 10)
        sock.settimeout(10)
        try:
            while sock.recv(4096):  # whatever alert comes back, then the close
                pass
        except ConnectionResetError:
            pass


def _worker_with_client_certificate_fails(address: str, certs: Path,
                                          env: dict[str, str]) -> None:  # fmt: skip
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "worker", address, "--no-dashboard",
                             "--connect-timeout", "5", *tls_args(certs, "client")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    process = ShoalProcess(proc, "shoal worker with a client certificate")
    try:
        code = proc.wait(60)
    finally:
        process.kill()
    assert code != 0
    assert "a client certificate may not connect as 'worker'" in process.output()
