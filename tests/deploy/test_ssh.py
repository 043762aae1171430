"""SSHCluster against real sshd servers in network namespaces (shoal.testing.netns).

Host 0 runs the driver (an SSHCluster and a client, tests/deploy/ssh_driver.py), host 1 the
scheduler, hosts 2 and 3 the workers; each of hosts 1-3 runs its own ``sshd`` (Debian's
openssh-server) on its own address with a key made for the test. Needs root and network
namespaces: skips locally without them, fails under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.testing.netns import VirtualNetwork, netns_available

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"

SSHD_CONFIG = """\
ListenAddress {address}
Port 22
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd-{index}.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
"""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def _shoal_pids(net: VirtualNetwork, host: int) -> list[str]:
    """Processes running shoal in ``host``'s namespace."""
    done = subprocess.run(["ip", "netns", "pids", net.hosts[host].netns], capture_output=True,
                          text=True, timeout=10, check=False)
    out = []
    for pid in done.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "shoal.cli" in cmdline or "shoal.cluster" in cmdline:
            out.append(f"{pid}: {cmdline}")
    return out


@pytest.fixture
def ssh_network(require: Callable[[object, str], None],
                apt_install: Callable[[list[str], list[str]], str],
                ) -> Iterator[tuple[VirtualNetwork, Path]]:
    ok, why = netns_available()
    require(ok, f"network namespaces: {why}")
    if not os.path.exists(SSHD):
        problem = apt_install(["openssh-server"], [SSHD]) if os.geteuid() == 0 else "not root"
        require(os.path.exists(SSHD), f"sshd missing ({problem}): apt-get install openssh-server")
    directory = Path(tempfile.mkdtemp(prefix="shoal-ssh-test-"))
    try:
        _keygen(directory / "host_key")
        _keygen(directory / "client_key")
        shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        with VirtualNetwork(4, delay=(0.001, 0.003), loss=0.0) as net:
            for i in (1, 2, 3):
                config = directory / f"sshd_config_{i}"
                config.write_text(SSHD_CONFIG.format(address=net.hosts[i].address, dir=directory,
                                                     index=i))
                net.popen(i, [SSHD, "-D", "-e", "-f", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in (1, 2, 3):
                _wait_listening(net, i)
            yield net, directory
            for i in (1, 2, 3):  # the cluster stopped everything it started
                assert _shoal_pids(net, i) == [], f"left running on host {i}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(net: VirtualNetwork, host: int, timeout: float = 30.0) -> None:
    probe = ("import socket,sys; s=socket.create_connection((sys.argv[1], 22), 2);"
             " s.recv(64); s.close()")
    deadline = time.monotonic() + timeout
    while True:
        done = net.run(0, [sys.executable, "-c", probe, net.hosts[host].address], timeout=10)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"sshd on host {host} not up: {done.stderr}"
        time.sleep(0.2)


def _drive(net: VirtualNetwork, **config: Any) -> dict[str, Any]:
    """Run ssh_driver.py in host 0's namespace with ``config``; what it saw."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SHOAL_TOKEN", None)
    driver = net.popen(0, [sys.executable, str(Path(__file__).parent / "ssh_driver.py"),
                           json.dumps({**config, "python": sys.executable})],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = driver.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
        pytest.fail(f"the SSH driver hung:\n{err[-4000:]}")
    assert driver.returncode == 0, err[-4000:]
    seen: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return seen


def test_ssh_cluster_across_namespaces_computes_scales_and_closes(
        ssh_network: tuple[VirtualNetwork, Path]) -> None:
    net, directory = ssh_network
    hosts = [net.hosts[i].address for i in (1, 2, 3)]
    seen = _drive(net, hosts=hosts, key=str(directory / "client_key"))
    assert seen["scheduler_address"] == f"tcp://{hosts[0]}:8786"
    assert seen["worker_hosts"] == sorted(hosts[1:])  # one worker on each worker host
    assert seen["total"] == sum(range(1, 65))
    assert seen["after_scale_up"] == 4 and seen["after_scale_down"] == 2
    assert seen["kept"] == list(range(1, 21))  # results of retired workers moved
    assert seen["burst"] == seen["burst_after_scale_down"] == list(range(80))  # adaptive
    assert "SSHCluster running" in seen["repr"] and hosts[0] in seen["repr"]
    assert "scheduler" in seen["logs"] and seen["status"] == "closed"


def test_unreachable_worker_host_fails_fast_naming_it_and_leaves_nothing(
        ssh_network: tuple[VirtualNetwork, Path]) -> None:
    net, directory = ssh_network
    nowhere = net.hosts[1].address.rsplit(".", 1)[0] + ".250"  # no host there
    seen = _drive(net, hosts=[net.hosts[1].address], unreachable=nowhere,
                  key=str(directory / "client_key"))
    assert "error" in seen, seen
    assert f"ended before it joined the scheduler: on {nowhere}" in seen["error"]
    assert "port 22" in seen["error"]  # ssh's own message
    assert seen["seconds"] < 45
