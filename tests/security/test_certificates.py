"""Certificates and `shoal.Security`: what ``shoal certs`` writes (roles, private keys),
errors that name the problem, temporary credentials that clean up after themselves, and a
local cluster that speaks only TLS (``Client(security=True)``)."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

import shoal
from shoal.cli import main
from shoal.security.credentials import SecurityError

ROLE_FILES = ["ca", "scheduler", "worker", "client"]


def roles_of(cert: Path) -> set[str]:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {uri.removeprefix("shoal-role:")
            for uri in san.get_values_for_type(x509.UniformResourceIdentifier)}  # fmt: skip


def test_certs_init_writes_a_ca_and_one_private_key_per_role(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    result = CliRunner().invoke(main, ["certs", "init", str(directory), "--host", "sched.example"])
    assert result.exit_code == 0, result.output
    for name in ROLE_FILES:
        assert (directory / f"{name}.pem").is_file()
        assert stat.S_IMODE((directory / f"{name}-key.pem").stat().st_mode) == 0o600
    for role in ("scheduler", "worker", "client"):
        assert roles_of(directory / f"{role}.pem") == {role}
    scheduler = x509.load_pem_x509_certificate((directory / "scheduler.pem").read_bytes())
    names = scheduler.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sched.example" in names.get_values_for_type(x509.DNSName)
    # A second init never replaces the CA (that would orphan every certificate issued).
    again = CliRunner().invoke(main, ["certs", "init", str(directory)])
    assert again.exit_code != 0 and "already has a CA" in again.output


def test_certs_issue_adds_certificates_with_the_roles_asked(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", str(tmp_path)]).exit_code == 0
    result = runner.invoke(main, ["certs", "issue", "--role", "worker", "--role", "client",
                                  "--dir", str(tmp_path), "--name", "gpu-7",
                                  "--host", "10.0.0.7"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert roles_of(tmp_path / "gpu-7.pem") == {"worker", "client"}
    assert stat.S_IMODE((tmp_path / "gpu-7-key.pem").stat().st_mode) == 0o600
    taken = runner.invoke(main, ["certs", "issue", "--role", "worker", "--dir", str(tmp_path),
                                 "--name", "gpu-7"])  # fmt: skip
    assert taken.exit_code != 0 and "exists" in taken.output
    bad_role = runner.invoke(main, ["certs", "issue", "--role", "admin", "--dir", str(tmp_path)])
    assert bad_role.exit_code != 0 and "admin" in bad_role.output
    no_ca = runner.invoke(main, ["certs", "issue", "--role", "worker",
                                 "--dir", str(tmp_path / "nowhere")])  # fmt: skip
    assert no_ca.exit_code != 0 and "no CA in" in no_ca.output and "certs init" in no_ca.output


def test_security_errors_name_the_problem(tmp_path: Path) -> None:
    sec = shoal.Security.temporary()
    with pytest.raises(SecurityError, match="cert_file: no such file '/nonexistent.pem'"):
        shoal.Security(sec.ca_file, "/nonexistent.pem", sec.key_file)
    worker = sec.for_role("worker")
    with pytest.raises(SecurityError, match="cannot load the certificate"):
        shoal.Security(sec.ca_file, sec.cert_file, worker.key_file)  # a key of another cert
    with pytest.raises(SecurityError, match="no scheduler.pem"):
        shoal.Security.from_directory(tmp_path, "scheduler")


def test_security_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    sec = shoal.Security.temporary()
    for name in ("SHOAL_TLS_CA_FILE", "SHOAL_TLS_CERT", "SHOAL_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert shoal.Security.from_env() is None
    monkeypatch.setenv("SHOAL_TLS_CA_FILE", sec.ca_file)
    with pytest.raises(SecurityError, match="SHOAL_TLS_CERT, SHOAL_TLS_KEY not set"):
        shoal.Security.from_env()
    for name, value in sec.env().items():
        monkeypatch.setenv(name, value)
    from_env = shoal.Security.from_env()
    assert from_env is not None and from_env.cert_file == sec.cert_file


def test_a_temporary_security_removes_its_files_once_unused() -> None:
    sec = shoal.Security.temporary()
    directory = Path(sec.ca_file).parent
    worker = sec.for_role("worker")
    assert roles_of(Path(sec.cert_file)) == {"client"}
    assert roles_of(Path(sec.for_role("scheduler").cert_file)) == {"scheduler"}
    assert roles_of(Path(worker.cert_file)) == {"worker", "client"}  # tasks launch tasks
    assert stat.S_IMODE(os.stat(worker.key_file).st_mode) == 0o600
    del sec
    gc.collect()
    assert directory.is_dir()  # the worker's credentials still use it
    del worker
    gc.collect()
    assert not directory.exists()


def test_a_plaintext_address_with_credentials_is_an_error() -> None:
    sec = shoal.Security.temporary()
    with pytest.raises(ValueError, match="is not a tls:// address: refusing to fall back"):
        shoal.Client("tcp://127.0.0.1:9", security=sec, timeout=1)


@pytest.mark.parametrize("processes", [False, True])
def test_a_local_cluster_with_security_true_speaks_only_tls(processes: bool) -> None:
    with shoal.Client(security=True, n_workers=2, threads_per_worker=1, processes=processes,
                      dashboard_address=None) as client:  # fmt: skip
        assert client.scheduler_address.startswith("tls://")
        assert all(address.startswith("tls://") for address in client.nthreads())
        parts = client.map(lambda x: x * 2, range(10))
        assert client.submit(sum, parts).result(timeout=30) == 90

        def launch(x: int) -> int:  # a task that launches a task, through TLS
            return int(shoal.get_client().submit(lambda y: y + 1, x).result(timeout=30))

        assert client.submit(launch, 41).result(timeout=30) == 42
        # Direct actor calls go client -> worker over TLS too. (A local class: pickled by
        # value, so worker processes need not import this test module.)
        class Tally:
            def __init__(self) -> None:
                self.total = 0

            def add(self, n: int) -> int:
                self.total += n
                return self.total

        tally = client.submit(Tally, actor=True).result(timeout=30)
        assert [tally.add(n).result(timeout=30) for n in (1, 2, 3)] == [1, 3, 6]
        assert set(client.run(os.getpid).values()) and len(client.run(os.getpid)) == 2
        if not processes:  # every part holds its own role's certificate
            cluster = client.cluster
            assert cluster.scheduler.security.cert_file.endswith("scheduler.pem")
            assert all(w.security.cert_file.endswith("worker.pem") for w in cluster.workers)
            assert client.security is not None and client.security.cert_file.endswith("client.pem")


def test_a_local_cluster_from_a_certs_directory(tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["certs", "init", str(tmp_path)]).exit_code == 0
    security = shoal.Security.from_directory(tmp_path)  # client first, the others for_role
    with shoal.Client(security=security, n_workers=1, processes=False,
                      dashboard_address=None) as client:  # fmt: skip
        assert client.submit(lambda: 3).result(timeout=30) == 3
        assert client.cluster.scheduler.security.cert_file == str(tmp_path / "scheduler.pem")
        # certs init makes a worker certificate without the client role: tasks cannot
        # launch tasks with it, and are told why.
        def launch() -> int:
            return int(shoal.get_client().submit(lambda: 1).result(timeout=30))

        with pytest.raises(Exception, match="a worker certificate may not connect as 'client'"):
            client.submit(launch).result(timeout=30)
