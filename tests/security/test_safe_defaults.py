"""Safe by default: a server bound beyond loopback with neither TLS nor a token refuses to
start and says why; ``--insecure`` allows it; ``--token auto`` generates a token into a file
only its user can read. And frame limits: an authenticated client that sends a frame over
its role's cap is closed with a log line naming it, while others keep working."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import shoal
from shoal.comm.core import HandshakeRejected
from shoal.security.policy import InsecureBindError, check_bind, is_loopback_host, parse_frame_limits
from shoal.testing import spawn_scheduler, spawn_worker, wait_until


def shoal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_TLS_", "SHOAL_TOKEN"))}
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)  # fmt: skip


def test_scheduler_beyond_loopback_without_tls_or_token_refuses_to_start() -> None:
    result = shoal_cli("scheduler", "--host", "0.0.0.0", "--port", "0", "--no-dashboard")
    assert result.returncode != 0
    assert "would listen at tcp://0.0.0.0:0, beyond this machine" in result.stderr
    assert "neither TLS nor a token" in result.stderr and "--insecure" in result.stderr
    assert "listening at" not in result.stdout


def test_worker_beyond_loopback_without_tls_or_token_refuses_to_start() -> None:
    # Refused before it tries the scheduler (nothing listens at that address).
    result = shoal_cli("worker", "tcp://127.0.0.1:9", "--host", "0.0.0.0", "--no-dashboard",
                       "--connect-timeout", "1")  # fmt: skip
    assert result.returncode != 0
    assert "the worker would listen at tcp://0.0.0.0:0, beyond this machine" in result.stderr


def test_insecure_allows_a_bind_beyond_loopback() -> None:
    with spawn_scheduler(host="0.0.0.0", extra_args=["--no-dashboard", "--insecure"]) as s:
        assert s.address.startswith("tcp://0.0.0.0:")


def test_token_auto_writes_a_private_token_file_and_the_scheduler_requires_it(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "secrets" / "token"
    with spawn_scheduler(host="0.0.0.0", extra_args=["--no-dashboard", "--token", "auto",
                                                     "--token-file", str(token_file)]) as s:  # fmt: skip
        assert f"generated a token into {token_file}" in s.output()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        port = s.address.rsplit(":", 1)[1]
        with shoal.Client(f"tcp://127.0.0.1:{port}", token=token, timeout=10) as client:
            assert client.scheduler_info()["address"]
        with pytest.raises(HandshakeRejected, match="invalid authentication token"):
            shoal.Client(f"tcp://127.0.0.1:{port}", token="wrong", timeout=5)
    # A restarted scheduler keeps the token its workers have...
    with spawn_scheduler(extra_args=["--no-dashboard", "--token", "auto",
                                     "--token-file", str(token_file)]) as s:  # fmt: skip
        assert f"using the token in {token_file}" in s.output()
        with shoal.Client(s.address, token=token, timeout=10) as client:
            assert client.scheduler_info()["address"]
    # ...unless others could read it.
    token_file.chmod(0o644)
    result = shoal_cli("scheduler", "--token", "auto", "--token-file", str(token_file))
    assert result.returncode != 0 and "is readable by other users" in result.stderr


def test_a_token_file_alone_lets_the_scheduler_bind_beyond_loopback(tmp_path: Path) -> None:
    # The bind check used to run before the file was read: --token-file alone was refused
    # (the Kubernetes manifests had to pass SHOAL_TOKEN instead).
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")
    token_file.chmod(0o600)
    with spawn_scheduler(host="0.0.0.0", extra_args=["--no-dashboard",
                                                     "--token-file", str(token_file)]) as s:  # fmt: skip
        port = s.address.rsplit(":", 1)[1]
        with shoal.Client(f"tcp://127.0.0.1:{port}", token="file-token-0123456789",
                          timeout=10) as client:  # fmt: skip
            assert client.scheduler_info()["address"]


def test_a_worker_reads_its_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    with spawn_scheduler(token="s3cret-token", extra_args=["--no-dashboard"]) as s, \
         spawn_worker(s.address, extra_args=["--no-dashboard", "--token-file", str(token_file)]):  # fmt: skip
        with shoal.Client(s.address, token="s3cret-token", timeout=10) as client:
            assert client.submit(lambda: 7).result(timeout=30) == 7


def test_the_python_api_refuses_too() -> None:
    async def start() -> None:
        scheduler = shoal.Scheduler("0.0.0.0", 0)
        await scheduler.start()

    with pytest.raises(InsecureBindError, match="neither TLS nor a token"):
        asyncio.run(start())
    with pytest.raises(InsecureBindError, match="the scheduler would listen at tcp://0.0.0.0"):
        shoal.Client(host="0.0.0.0", n_workers=1, processes=False, dashboard_address=None)
    with shoal.Client(host="0.0.0.0", n_workers=1, processes=False, dashboard_address=None,
                      insecure=True) as client:  # fmt: skip
        assert client.submit(lambda: 1).result(timeout=30) == 1


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False),
])  # fmt: skip
def test_which_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_check_bind_rules() -> None:
    check_bind("tcp://127.0.0.1:0", tls=False, token=None, insecure=False, what="x")
    check_bind("tcp://[::1]:0", tls=False, token=None, insecure=False, what="x")
    check_bind("tls://0.0.0.0:0", tls=True, token=None, insecure=False, what="x")
    check_bind("tcp://0.0.0.0:0", tls=False, token="t", insecure=False, what="x")
    check_bind("tcp://0.0.0.0:0", tls=False, token=None, insecure=True, what="x")
    with pytest.raises(InsecureBindError, match="x would listen at tcp://\\[::\\]:1"):
        check_bind("tcp://[::]:1", tls=False, token=None, insecure=False, what="x")


def test_frame_limit_options_are_checked() -> None:
    assert parse_frame_limits("client=1MiB, worker=2e6", {"client": 5}) == {
        "client": 1024**2, "worker": 2_000_000}
    for bad, why in [("client", "not ROLE=SIZE"), ("admin=1MiB", "unknown role"),
                     ("client=lots", "not a size"), ("client=0", "positive")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_frame_limits(bad, {})
    result = shoal_cli("scheduler", "--max-frame-bytes", "client=huge")
    assert result.returncode != 0 and "--max-frame-bytes" in result.stderr


def test_an_over_limit_frame_closes_only_that_client() -> None:
    with spawn_scheduler(extra_args=["--no-dashboard", "--max-frame-bytes", "client=1MiB"]) as s, \
         spawn_worker(s.address, extra_args=["--no-dashboard"]):  # fmt: skip
        with shoal.Client(s.address, timeout=10) as good, \
             shoal.Client(s.address, timeout=10, name="greedy") as greedy:  # fmt: skip
            assert good.submit(len, b"x" * 500_000).result(timeout=30) == 500_000
            # 2 MB inline in the graph: one frame over the client cap of 1 MiB.
            big = greedy.submit(len, b"x" * 2_000_000)
            with pytest.raises(shoal.SchedulerGoneError, match="lost the scheduler"):
                big.result(timeout=30)
            wait_until(lambda: "exceeds the limit of 1048576 bytes" in s.output(), timeout=10,
                       message="the scheduler's log line")  # fmt: skip
            assert "(client 'greedy')" in s.output()
            # The good client and the worker were not touched.
            assert good.submit(sum, good.map(lambda x: x + 1, range(10))).result(timeout=30) == 55
            assert len(good.nthreads()) == 1


def test_a_worker_caps_the_frames_of_its_peers(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from shoal.comm.core import CommClosedError
    from shoal.comm.registry import connect
    from shoal.protocol.messages import PROTOCOL_VERSION, DataReply, GetData, Hello

    async def scenario() -> None:
        scheduler = await shoal.Scheduler(port=0)
        worker = shoal.Worker(scheduler.address, in_process=True, frame_limits={"peer": 2**20})
        await worker.start()
        try:
            greedy = await connect(worker.address, Hello(PROTOCOL_VERSION, "peer", "greedy"))
            polite = await connect(worker.address, Hello(PROTOCOL_VERSION, "peer", "polite"))
            await greedy.write([GetData(1, ["k" * 2_000_000])])  # one 2 MB frame
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(greedy.read(), 10)
            await polite.write([GetData(2, ["no-such-key"])])
            (reply,) = await asyncio.wait_for(polite.read(), 10)
            assert isinstance(reply, DataReply) and reply.missing == ["no-such-key"]
            polite.abort()
        finally:
            await worker.close("test over")
            await scheduler.close()

    with caplog.at_level(logging.WARNING, logger="shoal.comm"):
        asyncio.run(scenario())
    assert any("(peer 'greedy')" in r.message and "exceeds the limit of 1048576 bytes"
               in r.message for r in caplog.records), [r.message for r in caplog.records]  # fmt: skip
