"""Virtual multi-host networks for tests: Linux network namespaces with real latency,
loss and partitions.

`VirtualNetwork` (a context manager) builds N "hosts", each a network namespace named
``shoal-t-<pid>-<i>`` with one interface ``eth0`` holding an address in a private test
subnet (``10.213.0.0/24`` by default; only these namespaces see it, nothing is routed out).
Frames between hosts take a random one-way delay (20-50 ms by default) and are lost with a
set probability (1% by default). Scheduler, workers and clients run as processes inside the
namespaces (`VirtualNetwork.popen`, `spawn_scheduler`, `spawn_worker`, `client_agent`), so
they talk real TCP over separate addresses. `cut` partitions a host from all the others and
`heal` joins it again. On the way out everything is removed, also when the body failed:
processes started inside (and anything else left running in the namespaces), interfaces and
namespaces::

    from shoal.testing.netns import VirtualNetwork, netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with VirtualNetwork(3) as net:
        scheduler = net.spawn_scheduler(0, extra_args=["--worker-ttl", "3"])
        worker = net.spawn_worker(1, scheduler.address)
        client = net.client_agent(0, scheduler.address)
        assert client.call(lambda c: c.submit(sum, [1, 2]).result()) == 3
        net.cut(1)   # host 1 hears nothing and is heard by nobody...
        net.heal(1)  # ...until now

Two ways to make the links, chosen by `netns_available` (or the ``backend`` argument, or
the ``SHOAL_NETNS_BACKEND`` environment variable):

- ``"kernel"``: a bridge in its own namespace and a veth pair per host, with ``tc netem`` on
  the bridge end of each veth (egress towards the host, so a frame is delayed and dropped once
  per hop). `cut` sets the bridge end down. Needs the kernel's ``sch_netem``.
- ``"userspace"``: when there is no netem (many CI and VM kernels leave it out), each host
  gets a TAP device and a learning switch in a thread of this process forwards frames between
  them, applying the delay and loss itself (keeping each host pair's frames in order, as a
  real path does). `cut` drops every frame to and from the host.

`netns_available` needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), the ``ip`` command and
either netem or ``/dev/net/tun``; it tries once and says why not, so tests can skip with
that reason.

`client_agent` starts a process in a namespace that holds one `shoal.Client` and runs
functions sent to it (``fn(client, *args)``, pickled with cloudpickle; functions of the
calling test module travel by value), answering with their results: a way to drive a
client that lives on another "host" from the test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import fcntl
import functools
import heapq
import itertools
import os
import pickle
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from .cluster import ShoalProcess

__all__ = [
    "NETNS_PREFIX",
    "RemoteCallError",
    "RemoteClient",
    "VirtualNetwork",
    "netns_available",
    "stale_namespaces",
]

#: every namespace this module makes is named ``shoal-t-<pid>-...``
NETNS_PREFIX = "shoal-t-"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21

_counter = itertools.count()


def _ip(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; on failure raise ``RuntimeError`` with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
    return done


def _tc(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    if check and done.returncode != 0:
        raise RuntimeError(f"`tc {' '.join(args)}` in {netns} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")  # fmt: skip
    return done


def _netns_names() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces(mine: bool = False) -> list[str]:
    """Namespaces this module made that are still there: those of processes that are gone
    (a test run that was killed), or with ``mine`` those of this process."""
    out = []
    for name in _netns_names():
        match = re.match(re.escape(NETNS_PREFIX) + r"(\d+)-", name)
        if not match:
            continue
        pid = int(match.group(1))
        if (pid == os.getpid()) if mine else not _pid_alive(pid):
            out.append(name)
    return out


def _kill_namespace_processes(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL whatever still runs in ``netns`` (processes our tests started there) and wait
    for them to go."""
    deadline = time.monotonic() + timeout
    while True:
        done = _ip("netns", "pids", netns, check=False)
        pids = [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"processes {pids} in {netns} did not exit after SIGKILL")
        time.sleep(0.05)


def _delete_namespace(netns: str) -> None:
    _kill_namespace_processes(netns)
    _ip("netns", "del", netns, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces (and their processes) left by test processes that no longer run."""
    stale = stale_namespaces()
    for name in stale:
        _delete_namespace(name)
    return stale


# ------------------------------------------------------------------- availability


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str | None, str]:
    """(backend or None, reason). Makes a namespace, a veth pair and a netem qdisc once."""
    if not sys.platform.startswith("linux"):
        return None, f"network namespaces need Linux (this is {sys.platform})"
    caps = _capabilities()
    if os.geteuid() != 0 and not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
        return None, "network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    if not caps >> _CAP_NET_ADMIN & 1:
        return None, "this process lacks CAP_NET_ADMIN (e.g. a container without --cap-add)"
    if shutil.which("ip") is None:
        return None, "the `ip` command (iproute2) is not installed"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe{next(_counter)}"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return None, f"cannot create a network namespace: {done.stderr.strip()}"
        try:
            _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
        except RuntimeError as exc:
            return None, f"cannot create a veth pair: {exc}"
        netem_error = "the `tc` command is not installed"
        if shutil.which("tc") is not None:
            done = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev",
                                   "pa", "root", "netem", "delay", "1ms", "loss", "1%"],
                                  capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            if done.returncode == 0:
                _ip("-n", probe, "link", "add", "pbr", "type", "bridge", check=False)
                return "kernel", "veth pairs on a bridge, tc netem"
            netem_error = done.stderr.strip() or f"tc exited with {done.returncode}"
        # No netem: a TAP per host and a switch in this process will do.
        name = f"shp{os.getpid() % 10**7}"
        try:
            fd = _open_tap(name)
        except OSError as exc:
            return None, (f"no tc netem ({netem_error}; sch_netem missing from this kernel?)"
                          f" and no TAP devices (/dev/net/tun: {exc})")  # fmt: skip
        try:
            _ip("link", "set", name, "netns", probe)
        except RuntimeError as exc:
            return None, f"no tc netem ({netem_error}) and cannot move a TAP device: {exc}"
        finally:
            os.close(fd)
        return "userspace", f"TAP devices and a switch in the test process (no tc netem: {netem_error})"
    finally:
        _ip("netns", "del", probe, check=False)


def netns_available() -> tuple[bool, str]:
    """Whether `VirtualNetwork` can be built here, and how (or why not, to skip with).

    Tried once per process: it makes a namespace, a veth pair and a netem qdisc, and falls
    back to TAP devices when the kernel has no netem."""
    backend, reason = _probe()
    return backend is not None, reason


# ------------------------------------------------------------- userspace switch


class _Switch:
    """A learning Ethernet switch between TAP file descriptors, with delay, loss and cuts.

    Runs in a daemon thread. Each frame (each copy, when flooded) is dropped with probability
    ``loss`` or else delivered after a uniform random delay in ``delay``; frames from one port
    to another keep their order. Frames from or to a cut port are dropped.
    """

    def __init__(self, delay: tuple[float, float], loss: float, seed: int | None) -> None:
        self.delay = delay
        self.loss = loss
        self.rng = random.Random(seed)
        self.ports: list[int] = []
        self.cut: set[int] = set()
        self._macs: dict[bytes, int] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.frames = self.dropped = 0

    def add_port(self, fd: int) -> int:
        self.ports.append(fd)
        return len(self.ports) - 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shoal-netns-switch", daemon=True)
        self._thread.start()

    def set_cut(self, port: int, cut: bool) -> None:
        with self._lock:
            if cut:
                self.cut.add(port)
                # Frames already on the wire to or from it are lost too.
                self._heap = [e for e in self._heap
                              if e[2] != port and self._macs.get(e[3][6:12]) != port]
                heapq.heapify(self._heap)
            else:
                self.cut.discard(port)
        os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, -1)
        for i, fd in enumerate(self.ports):
            sel.register(fd, selectors.EVENT_READ, i)
        try:
            while not self._stopping:
                with self._lock:
                    timeout = (max(0.0, self._heap[0][0] - time.monotonic())
                               if self._heap else None)  # fmt: skip
                for key, _ in sel.select(timeout):
                    if key.data == -1:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        continue
                    self._receive(key.data)
                self._deliver_due()
        finally:
            sel.close()

    def _receive(self, port: int) -> None:
        fd = self.ports[port]
        for _ in range(256):  # then give the other ports a turn
            try:
                frame = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the device went away (teardown)
                return
            if len(frame) < 14:
                continue
            self.frames += 1
            with self._lock:
                if port in self.cut:
                    self.dropped += 1
                    continue
                dst, src = frame[0:6], frame[6:12]
                self._macs[src] = port
                out = self._macs.get(dst)
                targets = ([out] if out is not None and not dst[0] & 1 else
                           [p for p in range(len(self.ports)) if p != port])  # fmt: skip
                now = time.monotonic()
                for target in targets:
                    if target == port or target in self.cut:
                        continue
                    if self.loss and self.rng.random() < self.loss:
                        self.dropped += 1
                        continue
                    when = now + self.rng.uniform(*self.delay)
                    when = max(when, self._last.get((port, target), 0.0))
                    self._last[(port, target)] = when
                    heapq.heappush(self._heap, (when, next(self._seq), target, frame))

    def _deliver_due(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    return
                _, _, target, frame = heapq.heappop(self._heap)
                if target in self.cut:
                    continue
            try:
                os.write(self.ports[target], frame)
            except OSError:  # its queue is full, or it is going away: lost, as on a wire
                self.dropped += 1


# ------------------------------------------------------------------ the network


class Host:
    """One namespace on the network: ``netns`` (its name), ``address`` (its IP)."""

    def __init__(self, index: int, netns: str, address: str) -> None:
        self.index = index
        self.netns = netns
        self.address = address

    def __repr__(self) -> str:
        return f"Host({self.index}, {self.netns!r}, {self.address!r})"


class VirtualNetwork:
    """``n_hosts`` namespaces joined by a switch with ``delay`` (seconds, uniform between
    the two) and ``loss`` (probability per frame), one way. See the module's docstring."""

    def __init__(self, n_hosts: int, *, delay: tuple[float, float] = (0.020, 0.050),
                 loss: float = 0.01, subnet: str = "10.213.0", backend: str | None = None,
                 seed: int | None = None) -> None:  # fmt: skip
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be 1..250")
        self.n_hosts = n_hosts
        self.delay = delay
        self.loss = loss
        self.subnet = subnet
        self.seed = seed
        self.backend = backend or os.environ.get("SHOAL_NETNS_BACKEND") or _probe()[0]
        if self.backend not in ("kernel", "userspace"):
            raise RuntimeError(f"cannot build a virtual network here: {_probe()[1]}")
        self.hosts: list[Host] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.agents: list[RemoteClient] = []
        self.shoal_processes: list[ShoalProcess] = []
        self._bridge_ns: str | None = None
        self._switch: _Switch | None = None
        self._taps: list[int] = []
        self._cut: set[int] = set()
        self._closed = False

    # ------------------------------------------------------------- build, tear down

    def __enter__(self) -> VirtualNetwork:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> VirtualNetwork:
        remove_stale_namespaces()
        pid = os.getpid()
        netid = next(_counter)
        if self.backend == "kernel":
            self._bridge_ns = f"{NETNS_PREFIX}{pid}-br{netid}"
            _ip("netns", "add", self._bridge_ns)
            _ip("-n", self._bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._bridge_ns, "link", "set", "br0", "up")
        else:
            self._switch = _Switch(self.delay, self.loss, self.seed)
        for i in range(self.n_hosts):
            netns = f"{NETNS_PREFIX}{pid}-{next(_counter)}"
            _ip("netns", "add", netns)
            host = Host(i, netns, f"{self.subnet}.{i + 1}")
            self.hosts.append(host)
            _ip("-n", netns, "link", "set", "lo", "up")
            if self.backend == "kernel":
                assert self._bridge_ns is not None
                port = f"p{i}"
                _ip("-n", self._bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", netns)  # fmt: skip
                _ip("-n", self._bridge_ns, "link", "set", port, "master", "br0")
                _ip("-n", self._bridge_ns, "link", "set", port, "up")
                if self.delay[1] > 0 or self.loss > 0:
                    low, high = (d * 1000 for d in self.delay)
                    _tc(self._bridge_ns, "qdisc", "add", "dev", port, "root", "netem",
                        "delay", f"{(low + high) / 2:.3f}ms", f"{(high - low) / 2:.3f}ms",
                        "loss", f"{self.loss * 100:g}%", "limit", "10000")  # fmt: skip
            else:
                assert self._switch is not None
                tap = f"sht{next(_counter)}-{pid % 10**6}"[:15]  # unique while in the root ns
                fd = _open_tap(tap)
                self._taps.append(fd)
                self._switch.add_port(fd)
                _ip("link", "set", tap, "netns", netns)
                _ip("-n", netns, "link", "set", tap, "name", "eth0")
            _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
        if self._switch is not None:
            self._switch.start()
        return self

    def close(self) -> None:
        """Stop every process, then remove the interfaces and namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.close(timeout=5)
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for process in self.shoal_processes:
            process.kill()  # it has exited: this reaps it and joins its output readers
        for host in self.hosts:
            try:
                _kill_namespace_processes(host.netns)
            except Exception as exc:  # noqa: BLE001 - keep tearing down, report at the end
                errors.append(str(exc))
        if self._switch is not None:
            self._switch.stop()
        for fd in self._taps:  # closing a TAP's descriptor deletes the device
            os.close(fd)
        self._taps.clear()
        for host in self.hosts:
            _ip("netns", "del", host.netns, check=False)
        if self._bridge_ns is not None:
            _ip("netns", "del", self._bridge_ns, check=False)
        left = [n for n in self._namespaces() if n in _netns_names()]
        if left:
            errors.append(f"namespaces still there: {left}")
        if errors:
            raise RuntimeError("tearing down the virtual network: " + "; ".join(errors))

    def _namespaces(self) -> list[str]:
        names = [h.netns for h in self.hosts]
        return names + ([self._bridge_ns] if self._bridge_ns else [])

    def _host(self, host: int | Host) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    # ------------------------------------------------------------------- faults

    def cut(self, host: int | Host) -> None:
        """Partition ``host`` from every other host (frames both ways are dropped)."""
        h = self._host(host)
        if self.backend == "kernel":
            assert self._bridge_ns is not None
            _ip("-n", self._bridge_ns, "link", "set", f"p{h.index}", "down")
        else:
            assert self._switch is not None
            self._switch.set_cut(h.index, True)
        self._cut.add(h.index)

    def heal(self, host: int | Host) -> None:
        """Join ``host`` to the network again."""
        h = self._host(host)
        if self.backend == "kernel":
            assert self._bridge_ns is not None
            _ip("-n", self._bridge_ns, "link", "set", f"p{h.index}", "up")
        else:
            assert self._switch is not None
            self._switch.set_cut(h.index, False)
        self._cut.discard(h.index)

    @contextlib.contextmanager
    def partitioned(self, host: int | Host) -> Iterator[None]:
        """`cut` ``host`` for the duration of the block, then `heal` it."""
        self.cut(host)
        try:
            yield
        finally:
            self.heal(host)

    # ---------------------------------------------------------------- processes

    def command(self, host: int | Host, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self._host(host).netns, *argv]

    def popen(self, host: int | Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``'s namespace (`subprocess.Popen` ``kwargs``); it is
        stopped when the network closes. ``ip netns exec`` execs the command, so the
        returned process is the command itself."""
        if self._closed:
            raise RuntimeError("the virtual network is closed")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self.processes.append(proc)
        return proc

    def run(self, host: int | Host, argv: Sequence[str],
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ``argv`` in ``host``'s namespace to completion; returns its output."""
        return subprocess.run(self.command(host, argv), capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def _shoal(self, host: int | Host, args: list[str], what: str,
               start_timeout: float) -> ShoalProcess:  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SHOAL_TOKEN", None)
        proc = self.popen(host, [sys.executable, "-m", "shoal.cli", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        process = ShoalProcess(proc, what)
        self.shoal_processes.append(process)
        try:
            process.address = process.wait_for_line(r"listening at (\S+)", start_timeout).group(1)
        except BaseException:
            process.kill()
            raise
        return process

    def spawn_scheduler(self, host: int | Host, port: int = 8786,
                        extra_args: Sequence[str] = (), start_timeout: float = 30.0) -> ShoalProcess:  # fmt: skip
        """``shoal scheduler`` on ``host``'s address; returned once it listens."""
        h = self._host(host)
        # --insecure: the namespaces' own network, no token (a non-loopback bind needs one)
        return self._shoal(h, ["scheduler", "--host", h.address, "--port", str(port),
                               "--insecure", *extra_args], f"shoal scheduler on {h.netns}",
                           start_timeout)  # fmt: skip

    def spawn_worker(self, host: int | Host, scheduler_address: str, nthreads: int = 1,
                     extra_args: Sequence[str] = (), start_timeout: float = 30.0) -> ShoalProcess:  # fmt: skip
        """``shoal worker`` on ``host``'s address; returned once it has joined."""
        h = self._host(host)
        return self._shoal(h, ["worker", scheduler_address, "--host", h.address,
                               "--nthreads", str(nthreads), "--name", f"worker-{h.index}",
                               "--insecure", *extra_args], f"shoal worker on {h.netns}", start_timeout)  # fmt: skip

    def client_agent(self, host: int | Host, scheduler_address: str,
                     timeout: float = 30.0) -> RemoteClient:  # fmt: skip
        """A `RemoteClient`: a process in ``host``'s namespace with a `shoal.Client`
        connected to ``scheduler_address``; returned once it has connected."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = self.popen(host, [sys.executable, "-m", "shoal.testing.netns", "agent",
                                 scheduler_address, str(timeout)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env)  # fmt: skip
        agent = RemoteClient(proc, f"client agent on {self._host(host).netns}")
        self.agents.append(agent)
        agent.wait_ready(timeout + 30)
        return agent


# ------------------------------------------------------------------ client agent


class RemoteCallError(Exception):
    """A function run by the client agent raised; the message holds its traceback."""


_FRAME = struct.Struct("!Q")


def _write_frame(stream: IO[bytes], payload: bytes, lock: threading.Lock) -> None:
    with lock:
        stream.write(_FRAME.pack(len(payload)) + payload)
        stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return body


def _by_value(fn: Any) -> None:
    """Have cloudpickle send the functions of ``fn``'s module by value, unless that module is
    one every process can import (shoal's own, the standard library's, installed packages')."""
    import cloudpickle

    name = getattr(fn, "__module__", None) or ""
    top = name.split(".")[0]
    module = sys.modules.get(name)
    if module is None or name == "__main__" or top in sys.stdlib_module_names or top == "shoal":
        return
    path = getattr(module, "__file__", "") or ""
    if "site-packages" in path or "dist-packages" in path:
        return
    with contextlib.suppress(ValueError):  # already registered
        cloudpickle.register_pickle_by_value(module)


class RemoteClient:
    """Talks to a client agent process (see `VirtualNetwork.client_agent`): `call` runs
    ``fn(client, *args, **kwargs)`` there and returns its result; `submit` does it in the
    background and returns a `concurrent.futures.Future`."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self.proc = proc
        self.what = what
        self.stderr: list[str] = []
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._ready: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._pending[0] = self._ready
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read, name=f"shoal-agent-out-{proc.pid}", daemon=True),
            threading.Thread(target=self._drain_stderr, name=f"shoal-agent-err-{proc.pid}",
                             daemon=True),
        ]  # fmt: skip
        for t in self._threads:
            t.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip("\n"))
        self.proc.stderr.close()

    def _read(self) -> None:
        import cloudpickle

        assert self.proc.stdout is not None
        while True:
            body = _read_frame(self.proc.stdout)
            if body is None:
                break
            rid, ok, payload = cloudpickle.loads(body)
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(payload)
            else:
                fut.set_exception(RemoteCallError(payload))
        self.proc.stdout.close()
        self.proc.wait()
        for t in self._threads[1:]:
            t.join(5)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(
                    f"{self.what} exited (code {self.proc.returncode}):\n{self.stderr_tail()}"))

    def dump_stacks(self, timeout: float = 5.0) -> str:
        """The agent's thread stacks (faulthandler, on SIGUSR1), for a call that hangs."""
        if self.proc.poll() is not None:
            return f"{self.what} has exited"
        before = len(self.stderr)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.stderr) == before:
            time.sleep(0.05)
        time.sleep(0.2)  # the rest of the dump
        return "\n".join(self.stderr[before:])

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr[-lines:])

    def wait_ready(self, timeout: float) -> None:
        try:
            self._ready.result(timeout)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{self.what} did not connect within {timeout}s:\n"
                                 f"{self.stderr_tail()}") from None  # fmt: skip

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        import cloudpickle

        _by_value(fn)
        rid = next(self._ids)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self.proc.poll() is not None and not self._pending:
                raise RuntimeError(f"{self.what} has exited:\n{self.stderr_tail()}")
            self._pending[rid] = fut
        assert self.proc.stdin is not None
        try:
            call = cloudpickle.dumps((fn, args, kwargs))
            _write_frame(self.proc.stdin, pickle.dumps((rid, call)), self._write_lock)
        except (BrokenPipeError, ValueError) as exc:
            with self._lock:
                self._pending.pop(rid, None)
            raise RuntimeError(f"{self.what} is gone: {exc}\n{self.stderr_tail()}") from None
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """``fn(client, *args, **kwargs)`` in the agent; its result, within ``timeout``."""
        fut = self.submit(fn, *args, **kwargs)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{getattr(fn, '__name__', fn)} did not return within"
                                 f" {timeout}s in {self.what}:\n{self.stderr_tail()}") from None  # fmt: skip

    def close(self, timeout: float = 15.0) -> int:
        """Close the agent's client and wait for the process (killed after ``timeout``)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError), self._write_lock:
                self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        for t in self._threads:
            t.join(5)
        return code


def _agent_main(address: str, timeout: float) -> int:
    """The client agent: one `shoal.Client`, and functions to run on it from stdin."""
    import cloudpickle

    import shoal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `RemoteClient.dump_stacks`
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints from the functions go to stderr, not into the frames
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def reply(rid: int, ok: bool, value: Any) -> None:
        try:
            payload = cloudpickle.dumps((rid, ok, value))
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is the caller's error
            payload = cloudpickle.dumps((rid, False, f"cannot pickle the result: {exc!r}"))
        _write_frame(out, payload, lock)

    client = shoal.Client(address, timeout=timeout)

    def run(rid: int, fn: Any, args: Any, kwargs: Any) -> None:
        try:
            value = fn(client, *args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported to the caller
            reply(rid, False, traceback.format_exc())
        else:
            reply(rid, True, value)

    reply(0, True, "ready")
    threads = []
    stdin = sys.stdin.buffer
    while True:
        body = _read_frame(stdin)
        if body is None:
            break
        rid, call = pickle.loads(body)
        try:
            fn, args, kwargs = cloudpickle.loads(call)
        except Exception:  # noqa: BLE001 - e.g. a module the agent cannot import
            reply(rid, False, traceback.format_exc())
            continue
        t = threading.Thread(target=run, args=(rid, fn, args, kwargs), daemon=True)
        t.start()
        threads.append(t)
    client.close(timeout=10)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    if len(sys.argv) == 4 and sys.argv[1] == "agent":
        sys.exit(_agent_main(sys.argv[2], float(sys.argv[3])))
    print(f"usage: {sys.argv[0]} agent SCHEDULER_ADDRESS TIMEOUT", file=sys.stderr)
    sys.exit(2)
