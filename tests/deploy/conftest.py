"""Fixtures of the deploy tests: a real single-host Slurm (munge, slurmctld, slurmd).

`slurm` installs nothing itself when the daemons are there; when they are missing and we
are root on Debian it runs ``apt-get install munge slurmctld slurmd slurm-client`` (CI:
.ci/run provides them). It writes a slurm.conf for this host into a temporary directory
(``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, no cgroup.conf: Slurm
22.05 then runs as root without systemd or cgroups), starts the daemons it needs, points
``SLURM_CONF`` at it, waits for the node to be idle, and on the way out cancels every job,
stops the daemons it started and removes the directory. Without root or the packages it
skips (fails under CI) with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SLURM_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]

#: CPUs the test node claims (SlurmdParameters=config_overrides): more than this machine
#: has, so several 1-core worker jobs run at once
NODE_CPUS = 16


def _install(packages: list[str], binaries: list[str]) -> str:
    """"" when every binary is there (installing with apt-get if need be), else why not."""
    if all(shutil.which(b) for b in binaries):
        return ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(binaries)} missing (apt-get install {' '.join(packages)} as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600,
                              check=False)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}"
    missing = [b for b in binaries if not shutil.which(b)]
    return f"still missing after apt-get: {missing}" if missing else ""


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


SLURM_CONF = """\
ClusterName=shoaltest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerParameters=sched_interval=1
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _munge_running() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True, timeout=10,
                          check=False).returncode == 0


class SlurmSite:
    """The running test Slurm: its config file and directory, and helpers for tests."""

    def __init__(self, directory: Path, conf: Path) -> None:
        self.directory = directory
        self.conf = conf

    def jobs(self) -> list[str]:
        """Ids of the jobs Slurm still lists (every user, every state)."""
        done = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True,
                              text=True, timeout=30, check=True)
        return done.stdout.split()

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30,
                       check=False)
        _wait(lambda: not self.jobs(), 60, "jobs still listed after scancel")


@pytest.fixture(scope="session")
def apt_install() -> Callable[[list[str], list[str]], str]:
    """``apt_install(packages, binaries)``: "" once the binaries are there (installing the
    packages with apt-get as root if need be), else why not."""
    return _install


@pytest.fixture(scope="session")
def slurm(require: Callable[[object, str], None]) -> Iterator[SlurmSite]:
    why = "" if os.geteuid() == 0 else "a single-host Slurm test cluster needs root"
    why = why or _install(SLURM_PACKAGES, ["munged", "slurmctld", "slurmd", "sbatch"])
    require(not why, f"Slurm: {why}")
    directory = Path(tempfile.mkdtemp(prefix="shoal-slurm-site-"))
    started: list[subprocess.Popen[bytes]] = []
    old_conf = os.environ.get("SLURM_CONF")
    try:
        if not _munge_running():
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            # -F: stays in the foreground, so it is our child and stops with us
            started.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait(_munge_running, 20, "munged did not answer")
        for sub in ("state", "spool"):
            (directory / sub).mkdir()
        node = socket.gethostname()
        conf = directory / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=node, node=node, dir=directory, cpus=NODE_CPUS,
                                          ctld_port=_free_port(), d_port=_free_port()))
        os.environ["SLURM_CONF"] = str(conf)
        started.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        started.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def idle() -> bool:
            for proc in started:
                if proc.poll() is not None:
                    log = "".join(p.read_text()[-2000:] for p in directory.glob("*.log"))
                    raise RuntimeError(f"{proc.args} exited ({proc.returncode}):\n{log}")
            done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                  timeout=10, check=False)
            return done.returncode == 0 and done.stdout.strip() in ("idle", "mix", "alloc")

        _wait(idle, 60, "the Slurm node did not come up idle")
        site = SlurmSite(directory, conf)
        yield site
        site.cancel_all()
    finally:
        for proc in reversed(started):
            _stop(proc)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def slurm_site(slurm: SlurmSite) -> Iterator[SlurmSite]:
    """The session's Slurm, with no job left over from this test."""
    yield slurm
    slurm.cancel_all()
