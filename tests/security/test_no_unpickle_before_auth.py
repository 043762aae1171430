"""Nothing a peer sends is unpickled before it has authenticated (issue #12).

A cluster of real processes with a token: ``shoal scheduler`` and ``shoal worker`` (a nanny
with its worker in a child process), both with their HTTP servers (dashboard, /metrics). To
every port they listen on, a peer without the token sends a pickle that runs ``touch FILE``
when it is unpickled: as the first bytes, inside a well-formed frame, inside the messages
that carry user payloads (tasks, ``run``, data, actor calls), behind a Hello with a wrong
token, role or version, after the server's Reject, and as an HTTP body. The file never
appears, the peer is disconnected (or gets an HTTP 4xx), and a client keeps computing.

So that these tests can fail, each ends with a control: the same payload from a peer *with*
the token does create its file (a worker unpickles what authenticated peers send; that is
its job). The control is also the barrier after which a late unpickling would have shown.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
import pytest

import shoal
from shoal.protocol.codec import Codec
from shoal.protocol.messages import (
    PROTOCOL_VERSION,
    ActorCall,
    Hello,
    Msg,
    RunFunction,
    RunOnWorkers,
    SubmitTasks,
    TaskSpec,
    UpdateData,
)
from shoal.protocol.serialize import Serialized
from shoal.testing import ShoalProcess, no_leaks, spawn_scheduler, spawn_worker, wait_until

from fuzz_peers import (
    canary_pickle,
    connect_raw,
    frame,
    hello_frame,
    listening_ports,
    message_frame,
    port_of,
    read_until,
    read_until_closed,
    send_all,
)

TOKEN = "token-" + uuid.uuid4().hex
JOBS_APP_DIR = Path(__file__).resolve().parent.parent / "jobs"  # jobs_testapp.py


@dataclass
class Cluster:
    scheduler: ShoalProcess
    worker: ShoalProcess  #: the nanny; its worker runs in a child process
    client: shoal.Client
    canaries: Path  #: where the pickles would create their files
    shoal_ports: dict[str, str]  #: "scheduler" / "worker" -> tcp address
    http_ports: dict[str, str]  #: "scheduler dashboard" / "worker dashboard" -> URL
    rounds: int = 0

    def still_computes(self) -> None:
        self.rounds += 1
        assert self.client.submit(sum, [self.rounds, 1], pure=False).result(timeout=20) == (
            self.rounds + 1
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="shoal-canaries-") as canaries, no_leaks(20), \
            spawn_scheduler(port=0, token=TOKEN, extra_args=["--dashboard-address", ":0",
                                                             "--log-level", "error"]) as sched, \
            spawn_worker(sched.address, token=TOKEN, name="target",
                         extra_args=["--dashboard-address", ":0"]) as worker, \
            shoal.Client(sched.address, token=TOKEN, timeout=10,
                         set_as_default=False) as client:  # fmt: skip
        client.wait_for_workers(1, timeout=20)
        dashboard = sched.wait_for_line(r"shoal dashboard at (\S+)", 10).group(1)
        info = client.scheduler_info()["workers"]
        worker_dashboard = info[worker.address]["dashboard"]
        assert worker_dashboard, "the worker advertised no HTTP server"
        yield Cluster(sched, worker, client, Path(canaries),
                      {"scheduler": sched.address, "worker": worker.address},
                      {"scheduler dashboard": dashboard, "worker dashboard": worker_dashboard})


# ------------------------------------------------------------------ payloads


def pickle_messages(port: str, pickled: bytes) -> list[Msg]:
    """Every message that carries a user payload to ``port``, each carrying ``pickled``."""
    payload = Serialized([pickled])
    if port == "scheduler":
        key = f"canary-{uuid.uuid4().hex}"
        # A task whose function and arguments are the pickle (run on a worker), and a
        # function for every worker to run.
        return [SubmitTasks([TaskSpec(key, pickled, payload, [])], [key]),
                RunOnWorkers(1, payload)]  # fmt: skip
    return [RunFunction(1, payload), UpdateData(2, {"canary": payload}),
            ActorCall(3, "canary-actor", "method", payload)]  # fmt: skip


def hello_with_pickled_token(pickled: bytes) -> bytes:
    """A Hello whose token field is a serialized value (extension type 1) holding the pickle."""
    inner = msgspec.msgpack.encode([pickled])
    body = msgspec.msgpack.encode(
        [["hello", 1, "client", "hostile-peer", msgspec.msgpack.Ext(1, inner), os.getpid()]]
    )
    return frame(body)


def hello_and_payload_in_one_frame(port: str, pickled: bytes) -> bytes:
    """A valid Hello with the token, and the payload behind it in the same frame: a handshake
    frame must hold exactly one message."""
    msgs: list[Msg] = [Hello(PROTOCOL_VERSION, "client", "x", TOKEN, os.getpid()),
                       *pickle_messages(port, pickled)]  # fmt: skip
    return frame(*(bytes(memoryview(part)) for part in Codec().encode(msgs)))


#: role with the right token that each port refuses
REFUSED_ROLE = {"scheduler": "nanny", "worker": "nanny"}

Attack = Callable[[str, bytes], bytes]

#: What an unauthenticated peer sends, by name: f(port, pickle) -> bytes on the wire.
ATTACKS: dict[str, Attack] = {
    "the pickle as the first bytes": lambda port, p: p,
    "the pickle as a well-formed frame": lambda port, p: frame(p),
    "the payload messages instead of a hello": lambda port, p: message_frame(
        *pickle_messages(port, p)),
    "a hello without a token, then the payload": lambda port, p: hello_frame(None)
    + message_frame(*pickle_messages(port, p)),
    "a hello with a wrong token, then the payload": lambda port, p: hello_frame("wrong")
    + message_frame(*pickle_messages(port, p)),
    "a hello with the token minus its last character": lambda port, p: hello_frame(TOKEN[:-1])
    + message_frame(*pickle_messages(port, p)),
    "a hello with the token and a refused role": lambda port, p: hello_frame(
        TOKEN, role=REFUSED_ROLE[port]) + message_frame(*pickle_messages(port, p)),
    "a hello with the token and another protocol version": lambda port, p: hello_frame(
        TOKEN, version=999) + message_frame(*pickle_messages(port, p)),
    "a hello whose token is the pickle": lambda port, p: hello_with_pickled_token(p)
    + message_frame(*pickle_messages(port, p)),
    "the hello (with the token) and the payload in one frame": lambda port, p:
    hello_and_payload_in_one_frame(port, p),
    "a frame prefix claiming 8 GiB, then the pickle": lambda port, p: (
        (1).to_bytes(4, "little") + (8 << 30).to_bytes(8, "little") + p),
}


def attack_ids() -> list[tuple[str, str]]:
    return [(port, name) for port in ("scheduler", "worker") for name in ATTACKS]


# ------------------------------------------------------------------ the control


def control_unpickles(cluster: Cluster, port: str, name: str) -> None:
    """The same payload with the token does get unpickled: its file appears. Run after an
    attack, it is also the barrier behind which the attack's own unpickling would be done."""
    path = cluster.canaries / f"{name}.control"
    with connect_raw(cluster.shoal_ports[port]) as sock:
        assert send_all(sock, hello_frame(TOKEN))
        read_until(sock, b"welcome")
        assert send_all(sock, message_frame(*pickle_messages(port, canary_pickle(path))))
        wait_until(path.exists, timeout=20,
                   message=f"the control's file {path.name} (an authenticated payload)")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------ the tests


def test_every_listening_port_is_one_these_tests_attack(cluster: Cluster) -> None:
    """A port added later (a debug server, a new service) must be added to these tests."""
    known = {port_of(a): name for name, a in cluster.shoal_ports.items()}
    known |= {port_of(u): name for name, u in cluster.http_ports.items()}
    for process in (cluster.scheduler, cluster.worker):
        for port in listening_ports(process.pid):
            assert port in known, (
                f"{process.what} (and its children) listen on port {port}, which no test here"
                f" attacks; known: {known}")
    # the nanny itself listens on nothing: its worker (a child) owns both ports
    assert listening_ports(cluster.worker.pid) == {port_of(cluster.shoal_ports["worker"]),
                                                   port_of(cluster.http_ports["worker dashboard"])}
    nanny_own = {c.laddr.port for c in psutil.Process(cluster.worker.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}  # fmt: skip
    assert nanny_own == set(), f"the nanny process listens on {nanny_own}"


@pytest.mark.parametrize(("port", "attack"), attack_ids(),
                         ids=[f"{p}: {a}" for p, a in attack_ids()])  # fmt: skip
def test_no_pickle_is_unpickled_before_authentication(cluster: Cluster, port: str,
                                                      attack: str) -> None:  # fmt: skip
    # given a pickle that creates a file when unpickled, anywhere
    name = slug(f"{port}-{attack}")
    path = cluster.canaries / f"{name}.attack"
    # when an unauthenticated peer sends it to the port
    with connect_raw(cluster.shoal_ports[port]) as sock:
        send_all(sock, ATTACKS[attack](port, canary_pickle(path)))
        # then the server disconnects it (after a Reject, for a Hello it could read)
        closed, answer = read_until_closed(sock)
        assert closed, f"the {port} kept the connection open; it sent {answer!r}"
        assert b"welcome" not in answer
    # and once the same payload from an authenticated peer has been unpickled
    control_unpickles(cluster, port, name)
    # the attack's file does not exist
    assert not path.exists(), f"{attack!r} to the {port}: the pickle was unpickled"
    # and the cluster keeps computing
    cluster.still_computes()


def test_a_payload_after_the_servers_reject_is_never_unpickled(cluster: Cluster) -> None:
    for port in ("scheduler", "worker"):
        path = cluster.canaries / f"after-reject-{port}.attack"
        with connect_raw(cluster.shoal_ports[port]) as sock:
            # given a peer whose Hello was rejected
            assert send_all(sock, hello_frame("wrong"))
            read_until(sock, b"reject")
            # when it sends the payload anyway (the server may have closed already)
            send_all(sock, message_frame(*pickle_messages(port, canary_pickle(path))))
            # then it is disconnected, and nothing is unpickled
            closed, answer = read_until_closed(sock)
            assert closed, f"the {port} kept a rejected connection open"
        control_unpickles(cluster, port, f"after-reject-{port}")
        assert not path.exists(), f"the {port} unpickled a payload sent after its Reject"
    cluster.still_computes()


def http_exchange(url: str, request: bytes) -> tuple[bool, bytes]:
    with connect_raw(f"tcp://127.0.0.1:{port_of(url)}") as sock:
        send_all(sock, request)
        return read_until_closed(sock)


def http_status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, f"not an HTTP response: {answer[:200]!r}"
    return int(match.group(1))


HTTP_REQUESTS = [("POST", "/"), ("POST", "/api/info"), ("PUT", "/metrics"), ("POST", "/health"),
                 ("PATCH", "/api/logs"), ("POST", "/api/unknown")]  # fmt: skip


@pytest.mark.parametrize("server", ["scheduler dashboard", "worker dashboard"])
def test_http_servers_never_unpickle_a_body(cluster: Cluster, server: str) -> None:
    url = cluster.http_ports[server]
    owner = "scheduler" if server.startswith("scheduler") else "worker"
    paths = []
    for method, route in HTTP_REQUESTS:
        # given a pickle as the body of a request no route accepts
        path = cluster.canaries / f"{slug(server)}-{method}-{slug(route) or 'root'}.attack"
        paths.append(path)
        body = canary_pickle(path)
        request = (f"{method} {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                   f"Content-Type: application/python-pickle\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
        # then the answer is a 4xx and the connection ends
        closed, answer = http_exchange(url, request)
        assert closed, f"{server} kept the connection open after {method} {route}"
        assert 400 <= http_status(answer) < 500, f"{method} {route}: {answer[:200]!r}"
    # and the pickle as the first bytes on the connection is not HTTP: 400, then closed
    path = cluster.canaries / f"{slug(server)}-raw.attack"
    paths.append(path)
    closed, answer = http_exchange(url, canary_pickle(path))
    assert closed, f"{server} kept a connection that sent a raw pickle"
    assert not answer or 400 <= http_status(answer) < 500, answer[:200]
    control_unpickles(cluster, owner, slug(server))
    assert [p.name for p in paths if p.exists()] == []
    cluster.still_computes()


def test_jobs_worker_listens_on_no_port(tmp_path: Path) -> None:
    """A job worker takes its work from the broker only: there is no port to attack. (What a
    writer of the broker's store can do is the signed-jobs tests' subject.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(JOBS_APP_DIR), os.environ.get("PYTHONPATH")])),  # fmt: skip
        SHOAL_JOBS_TEST_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "jobs", "worker",
                             "jobs_testapp:app", "--log-level", "warning"],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ready" in line, f"the job worker did not start: {line!r}"
        assert listening_ports(proc.pid) == set()
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
